"""One Redis reader per viewed session, shared by all its viewers in this process.

The hub reads a session's results stream with blocking XREAD and offers
each result to every viewer's small bounded queue without ever waiting: a
viewer whose queue is full is marked failed (and its connection dropped by
its handler), so a viewer that stops reading costs the others and the
session nothing.

Joining without gaps: a hub starts reading after the stream's last entry at
the moment it starts; a viewer registers its queue first, waits for the hub
to be ready, then reads the stored history itself (XRANGE). Anything newer
than that history reaches its queue; the overlap is removed by ``seq``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import redis.asyncio as aioredis

from common import keys
from common.backoff import until_up
from common.delivery import ResultQueue
from common.errors import SessionNotFound, SttError
from common.messages import Closed, unpack_result
from common.streams import read_stream

log = logging.getLogger(__name__)

#: Most results read per XREAD. A batch is offered to every queue at once, so
#: it is kept well under the viewer queue size (see ``Hubs``).
READ_BATCH = 100
#: Empty blocking reads between checks that the session still exists (a deleted session's
#: viewers are told within this many blocking reads; one EXISTS per hub, not per viewer).
EXISTS_EVERY = 10
#: Seconds ``Hubs.close`` waits for its hubs to end.
CLOSE_WAIT_S = 5.0


#: A viewer's side of the hub (the same bounded queue the client's own socket uses).
ViewerQueue = ResultQueue


class SessionHub:
    """Follows one session's results for the viewers attached to it."""

    def __init__(self, hubs: Hubs, sid: str) -> None:
        self.hubs = hubs
        self.sid = sid
        self.viewers: set[ViewerQueue] = set()
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        #: set when its last viewer left or the process closes: it reads no more (a
        #: cancellation alone can be lost inside redis-py, and the hub would read on)
        self.stopping = False
        self.task = asyncio.create_task(self._run(), name=f"hub-{sid}")
        hubs.running.add(self.task)
        self.task.add_done_callback(hubs.running.discard)

    def stop(self) -> None:
        self.stopping = True
        self.task.cancel()

    async def _run(self) -> None:
        try:
            await self._follow()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # never leave viewers waiting on a dead hub
            log.exception("session %s: viewer hub failed", self.sid)
            self._end(SttError("internal error"), exc)

    async def _follow(self) -> None:
        key = keys.results(self.sid)
        # start after the last stored entry: viewers read the history themselves
        last = await until_up(lambda: self.hubs.blocking.xrevrange(key, count=1),
                              f"session {self.sid}: hub start")
        cursor = last[0][0].decode() if last else "0-0"
        self.ready.set_result(None)
        idle = 0
        async for entries in read_stream(self.hubs.blocking, key, cursor,
                                         block_ms=self.hubs.block_ms, batch=self.hubs.batch,
                                         what=f"session {self.sid}: hub",
                                         stopped=lambda: self.stopping):
            if self.stopping:
                return
            if not entries:
                idle += 1
                if idle % EXISTS_EVERY == 0 and not await until_up(
                        lambda: self.hubs.blocking.exists(keys.meta(self.sid)),
                        f"session {self.sid}: hub check"):
                    self._end(SessionNotFound("the session no longer exists (deleted or expired)"))
                    return
                continue
            idle = 0
            for _entry_id, fields in entries:
                result = unpack_result(fields)
                for viewer in list(self.viewers):
                    viewer.offer(result)
                if isinstance(result, Closed):
                    self._end(None)
                    return

    def _end(self, exc: SttError | None, cause: BaseException | None = None) -> None:
        """The session ended (Closed was offered) or failed: detach every viewer."""
        self.hubs.forget(self)
        if not self.ready.done():
            if cause is not None:
                self.ready.set_exception(exc or cause)
            else:
                self.ready.set_result(None)
        if exc is not None:
            for viewer in self.viewers:
                viewer.fail(exc)
        self.viewers.clear()


class Hubs:
    """The hubs of this process, one per session with viewers."""

    def __init__(self, redis: aioredis.Redis, blocking: aioredis.Redis, block_ms: int,
                 viewer_queue: int) -> None:
        self.redis = redis
        self.blocking = blocking
        self.block_ms = block_ms
        # A burst (a backlog after an outage) reaches a viewer a quarter queue at a time,
        # with the event loop in between for its sender: only a stalled viewer overflows.
        self.batch = max(1, min(READ_BATCH, viewer_queue // 4))
        self._hubs: dict[str, SessionHub] = {}
        #: every hub task not yet finished, those whose last viewer left included
        self.running: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        return len(self._hubs)

    def viewer_count(self) -> int:
        return sum(len(hub.viewers) for hub in self._hubs.values())

    def forget(self, hub: SessionHub) -> None:
        if self._hubs.get(hub.sid) is hub:
            del self._hubs[hub.sid]

    @contextlib.asynccontextmanager
    async def attach(self, sid: str, viewer: ViewerQueue) -> AsyncIterator[None]:
        """Register ``viewer`` with the session's hub (starting one) until the block exits.

        On entry the hub is reading: every result stored after this point
        reaches the viewer's queue.
        """
        hub = self._hubs.get(sid)
        if hub is None:
            hub = self._hubs[sid] = SessionHub(self, sid)
        hub.viewers.add(viewer)
        try:
            await asyncio.shield(hub.ready)
            yield
        finally:
            hub.viewers.discard(viewer)
            if not hub.viewers and self._hubs.get(sid) is hub:
                del self._hubs[sid]
                hub.stop()

    async def close(self) -> None:
        """Stop every hub and wait for them (bounded: a hub inside a Redis call finishes
        that call, at most a blocking read, then sees it is stopping)."""
        hubs = list(self._hubs.values())
        self._hubs.clear()
        for hub in hubs:
            hub.stop()
        if self.running:
            await asyncio.wait(list(self.running), timeout=CLOSE_WAIT_S)
