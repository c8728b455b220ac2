"""The /v1/listen sessions of one gateway: the connection writing each, and the sessions
whose client vanished, waiting out their resume grace.

A connection registers with ``attached`` once it has opened or resumed its session (an
older connection of the same session here is then told ``session_taken``), leaves with
``unattached``, and hands a session whose socket dropped to ``detach_later``: after
``RESUME_GRACE_S`` without a resume its stream is closed and its cap slot released.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Protocol

from common.access import AccessGuard
from common.backoff import REDIS_DOWN, Backoff, until_up
from common.errors import SessionNotFound
from common.messages import AudioMarker
from common.sessions import Sessions
from common.settings import GatewaySettings
from ingest.writer import AudioWriter

log = logging.getLogger(__name__)

#: How long the close of a session whose grace ran out keeps trying through an outage.
CLOSE_RETRY_S = 30.0


class Connection(Protocol):
    """What this registry needs of a listen connection."""

    sid: str
    generation: int
    writer: AudioWriter | None

    def taken(self) -> None: ...


class LiveSessions:
    def __init__(self, settings: GatewaySettings, store: Sessions,
                 guard: AccessGuard) -> None:
        self.settings = settings
        self.store = store
        self.guard = guard
        self.stopping = False  # the gateway is shutting down: nothing waits for a resume
        self._live: dict[str, Connection] = {}
        self._detached: dict[str, asyncio.Task[None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def attached(self, conn: Connection) -> None:
        """``conn`` opened its session or took it over (a resume): an earlier connection
        or detached wait for it here is stale (it can no longer append), so it ends now and
        leaves the cap member to this one. Without this, resumes of one session (which share
        its cap slot) could pile up idle sockets."""
        task = self._detached.pop(conn.sid, None)
        if task is not None:
            task.cancel()
        previous = self._live.get(conn.sid)
        if previous is not None and previous is not conn:
            if previous.generation > conn.generation:  # two resumes raced: keep the newer
                conn.taken()
                return
            previous.taken()
        self._live[conn.sid] = conn

    def unattached(self, conn: Connection) -> None:
        if self._live.get(conn.sid) is conn:
            del self._live[conn.sid]

    def detach_later(self, sid: str, generation: int, samples: int, entry_seq: int,
                     writer: AudioWriter | None, lease: str | None = None) -> None:
        """The client vanished: keep the session (and its cap ``lease``) for the resume
        grace, then end its stream and release the lease."""
        task = asyncio.create_task(
            self._expire(sid, generation, samples, entry_seq, writer, lease),
            name=f"detached-{sid}")
        self._tasks.add(task)
        self._detached[sid] = task

        def done(t: asyncio.Task[None]) -> None:
            self._tasks.discard(t)
            if self._detached.get(sid) is t:
                del self._detached[sid]

        task.add_done_callback(done)

    async def drain_writers(self) -> None:
        """Before the 1012: store the audio the live sessions have buffered (a Redis outage
        may hold up to ``OUTAGE_BUFFER_S`` of it), for at most ``SHUTDOWN_DRAIN_S``, so a
        client resuming elsewhere finds it; what could not be stored the client sends again
        (``stored_samples``)."""
        writers = [c.writer for c in self._live.values() if c.writer is not None]
        if not writers:
            return
        drains = [asyncio.ensure_future(w.drain()) for w in writers]
        done, pending = await asyncio.wait(drains, timeout=self.settings.shutdown_drain_s)
        for fut in pending:
            fut.cancel()
        for fut in done:
            fut.exception()  # a failed writer (taken, closed) has nothing more to store
        if pending:
            log.warning("shutdown: %d session(s) still had audio buffered after %.0f s; "
                        "their clients send it again when they resume", len(pending),
                        self.settings.shutdown_drain_s)

    def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()

    async def _expire(self, sid: str, generation: int, samples: int, entry_seq: int,
                      writer: AudioWriter | None, lease: str | None) -> None:
        closed = False
        try:
            if writer is not None:
                try:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(writer.drain(), self.settings.outage_buffer_s)
                finally:
                    await writer.close()
            await asyncio.sleep(self.settings.resume_grace_s)
            marker = AudioMarker("close", entry_seq + 1, samples)
            try:
                closed = await until_up(lambda: self.store.append(sid, generation, [marker]),
                                        f"session {sid}: closing after the grace",
                                        deadline_s=CLOSE_RETRY_S, backoff=Backoff(0.2, 5.0))
                # not closed: its transcriber closed it meanwhile (idle), or a resume took it
                ended = closed or (await self.store.access(sid)).state != "active"
            except SessionNotFound:
                ended = True  # expired: nothing counts it any more
            except REDIS_DOWN:
                ended = False  # unknown: the member's lease runs out
            if closed:
                log.info("session %s: not resumed within %.0f s; closing it", sid,
                         self.settings.resume_grace_s)
            if ended and lease is not None:
                await self.guard.release(lease, session_closed=True)
        finally:
            # Not closed here: resumed on another connection (the attach generation moved;
            # that connection holds the member now), or Redis stayed down (the member's
            # lease runs out).
            if lease is not None:
                self.guard.forget(lease)
