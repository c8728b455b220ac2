"""Client audio into Redis: a bounded buffer per session, drained by one task per gateway.

Each /v1/listen connection queues its audio entries in its ``AudioWriter`` (bounded:
``OUTAGE_BUFFER_S`` of audio; a full buffer back-pressures the client, then refuses it).
One ``AudioFlusher`` per gateway sends every writer that has entries waiting, one script
call per writer, in one Redis pipeline per round (at most ``APPEND_BATCH`` writers per
pipeline), and rides out Redis outages with backoff. A frame costs its connection one
deque append; an earlier design gave each writer its own task and future, two extra
task wake-ups per frame (see docs/benchmarks.md, gateway load).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import time
from collections.abc import Callable
from typing import Any

from common.backoff import REDIS_FULL, Backoff
from common.errors import (
    SessionClosed,
    SessionNotFound,
    SessionTaken,
    StorageFull,
    StorageUnavailable,
    SttError,
)
from common.messages import AudioEntry, AudioFrame
from common.redis_client import REDIS_DOWN
from common.streams import CLOSED, GONE, AudioAppender
from common.tasks import LazyTask

log = logging.getLogger(__name__)

#: Entries of one session sent in one script call.
ENTRIES_PER_CALL = 64
#: Bounds of the delay before a failed round trip's entries are sent again (``Backoff``).
FIRST_BACKOFF_S = 0.05
MAX_BACKOFF_S = 2.0


class AudioWriter:
    """A bounded, ordered buffer of one session's audio entries, drained by the flusher."""

    def __init__(self, flusher: AudioFlusher, sid: str, generation: int,
                 max_samples: int, full_grace_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.flusher = flusher
        self.sid = sid
        self.generation = generation
        self.max_samples = max_samples
        self._pending: collections.deque[AudioEntry] = collections.deque()
        self._buffered = 0
        self._drained = asyncio.Event()
        self._drained.set()
        self._progress = asyncio.Event()
        self.failure: SttError | None = None
        self.on_redis_error: Callable[[], None] | None = None
        self.closed = False
        self.backoff = Backoff(FIRST_BACKOFF_S, MAX_BACKOFF_S)
        self.full_grace_s = full_grace_s
        self.clock = clock
        self._full_since: float | None = None  # Redis refusing appends for lack of memory

    async def put(self, entry: AudioEntry, wait_s: float) -> None:
        """Queue an entry; when the buffer is full, wait (back-pressuring the client) for room."""
        if self.failure is not None:
            raise self.failure
        samples = entry.samples if isinstance(entry, AudioFrame) else 0
        if self._buffered and self._buffered + samples > self.max_samples:
            try:
                await asyncio.wait_for(self._room(samples), wait_s)
            except TimeoutError:
                raise StorageUnavailable("audio storage is unavailable; try again later") \
                    from None
            if self.failure is not None:
                raise self.failure
        self._pending.append(entry)
        self._buffered += samples
        self._drained.clear()
        self.flusher.mark(self)

    async def _room(self, samples: int) -> None:
        while self._buffered and self._buffered + samples > self.max_samples \
                and self.failure is None:
            self._progress.clear()
            await self._progress.wait()

    async def drain(self) -> None:
        """Until every queued entry is stored (or the writer failed: raises its failure)."""
        await self._drained.wait()
        if self.failure is not None:
            raise self.failure

    async def close(self) -> None:
        """Stop writing; entries still queued are dropped (``drain`` first to keep them)."""
        self.closed = True
        self.flusher.forget(self)
        self._signal()

    # ------------------------------------------------------------------ the flusher's side

    def head(self) -> list[AudioEntry]:
        return list(itertools.islice(self._pending, ENTRIES_PER_CALL))

    @property
    def pending(self) -> int:
        return len(self._pending)

    def stored(self, count: int, reply: Any) -> None:
        """The flusher's result for this writer's first ``count`` entries."""
        if self.closed:
            return
        if isinstance(reply, BaseException):
            self.failed_round(reply)
            return
        self.backoff.reset()
        self._full_since = None
        if int(reply) < 0:
            self._fail(_refusal(int(reply)))
        else:
            for _ in range(count):
                entry = self._pending.popleft()
                if isinstance(entry, AudioFrame):
                    self._buffered -= entry.samples
        if self._pending:
            self.flusher.mark(self)
        self._signal()

    def failed_round(self, exc: BaseException) -> None:
        """Redis refused or could not take this writer's entries: they stay queued and are
        sent again after a backoff (``common.backoff``, at most ``MAX_BACKOFF_S``). Refused
        for lack of memory for ``full_grace_s`` on end, the writer fails with
        ``storage_full`` (the session may resume once there is room)."""
        if self.on_redis_error is not None:
            self.on_redis_error()
        if isinstance(exc, REDIS_FULL):
            now = self.clock()
            if self._full_since is None:
                self._full_since = now
            elif now - self._full_since >= self.full_grace_s:
                log.warning("session %s: Redis has had no room for its audio for %.0f s; "
                            "ending it (storage_full)", self.sid, now - self._full_since)
                self._fail(StorageFull("storage is full: the session's audio cannot be "
                                       "stored; resume it later"))
                return
        log.warning("session %s: audio append failed (%s); %d entries buffered",
                    self.sid, exc, len(self._pending))
        self.flusher.mark_later(self, self.backoff.next_delay())

    def _fail(self, failure: SttError) -> None:
        """No entry of this writer can be stored any more: ``put`` and ``drain`` raise it."""
        self.failure = failure
        self._pending.clear()
        self._buffered = 0
        self._signal()

    def _signal(self) -> None:
        self._progress.set()
        if not self._pending or self.failure is not None or self.closed:
            self._drained.set()


def _refusal(reply: int) -> SttError:
    """What the append script's refusal means to the client."""
    if reply == CLOSED:
        return SessionClosed("this session has ended; start a new one")
    if reply == GONE:
        return SessionNotFound("the session no longer exists (deleted or expired)")
    return SessionTaken("the session was resumed on another connection")


class AudioFlusher:
    """Sends the queued entries of every writer of this gateway to Redis, one pipeline per
    round: one task, whatever the number of sessions."""

    def __init__(self, appender: AudioAppender, max_batch: int) -> None:
        self.appender = appender
        self.max_batch = max(1, max_batch)
        self._dirty: dict[AudioWriter, None] = {}  # insertion-ordered set
        self._wake = asyncio.Event()
        self._task = LazyTask(self._run, "audio-flusher")

    def mark(self, writer: AudioWriter) -> None:
        """``writer`` has entries to send."""
        if writer.closed:
            return
        self._dirty[writer] = None
        self._wake.set()
        self._task.ensure()

    def mark_later(self, writer: AudioWriter, delay: float) -> None:
        asyncio.get_running_loop().call_later(delay, self.mark, writer)

    def forget(self, writer: AudioWriter) -> None:
        self._dirty.pop(writer, None)

    async def close(self) -> None:
        await self._task.close()

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._dirty:
                writers = list(itertools.islice(self._dirty, self.max_batch))
                for writer in writers:
                    del self._dirty[writer]
                writers = [w for w in writers if w.pending and not w.closed]
                if not writers:
                    continue
                batches = [writer.head() for writer in writers]
                try:
                    replies = await self.appender.append_many(
                        [(w.sid, w.generation, b) for w, b in zip(writers, batches, strict=True)])
                except REDIS_DOWN as exc:
                    for writer in writers:
                        writer.failed_round(exc)
                    continue
                except Exception as exc:  # a reply that is not a list of replies: a bug
                    log.exception("audio flush failed")
                    for writer in writers:
                        writer.failed_round(exc)
                    continue
                for writer, batch, reply in zip(writers, batches, replies, strict=True):
                    writer.stored(len(batch), reply)
