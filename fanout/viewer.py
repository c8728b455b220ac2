"""``GET /v1/sessions/{id}/results``: a read-only viewer of one session's results.

It sends the stored results after ``after`` (finals, warnings; partials when
asked), then the live ones through the session's hub, then ``closed`` and a
close 1000. With ``original_timing`` the stored results are first played
back with the gaps they were published with (scaled by ``speed``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

from common import errors
from common.errors import Overloaded, StorageUnavailable, SttError
from common.messages import Closed, Final, Partial, Result, ViewerStarted, to_json
from common.ratelimit import MessageLimits
from common.redis_client import REDIS_DOWN
from common.sessions import Sessions
from common.tasks import stop_tasks
from common.web import (
    Socket,
    SocketClosed,
    bool_param,
    drop,
    float_param,
    int_param,
    read_controls,
    send_error,
)
from fanout.hub import Hubs, ViewerQueue

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ViewerParams:
    after: int = 0
    partials: bool = False
    original_timing: bool = False
    speed: float = 1.0

    @classmethod
    def parse(cls, query: Mapping[str, list[str]]) -> ViewerParams:
        speed = float_param(query, "speed", 1.0, 0.1, 100.0)
        assert speed is not None
        return cls(
            after=int_param(query, "after", 0, 0, 2**62),
            partials=bool_param(query, "partials", False),
            original_timing=bool_param(query, "original_timing", False),
            speed=speed,
        )


class ViewerLimits:
    """What a viewer endpoint needs from the process: settings and a live viewer count."""

    def __init__(self, queue: int, max_viewers: int, grace_s: float) -> None:
        self.queue = queue
        self.max_viewers = max_viewers
        self.grace_s = grace_s
        self.active = 0


class _Sender:
    """Sends results in seq order, each at most once, and remembers where it is."""

    def __init__(self, ws: Socket, after: int) -> None:
        self.ws = ws
        self.last = after

    async def send(self, result: Result) -> bool:
        """Send unless already sent; True once ``closed`` went out."""
        if result.seq <= self.last:
            return False
        await self.ws.send(to_json(result))
        self.last = result.seq
        return isinstance(result, Closed)


class Viewer:
    """One viewer socket."""

    def __init__(self, records: Sessions, hubs: Hubs, limits: ViewerLimits,
                 ws: Socket, sid: str, params: ViewerParams,
                 inbound: MessageLimits | None = None) -> None:
        self.records = records
        self.hubs = hubs
        self.limits = limits
        self.ws = ws
        self.sid = sid
        self.params = params
        self.sender = _Sender(ws, params.after)
        self.queue = ViewerQueue(limits.queue, params.partials)
        self.inbound = inbound

    async def run(self) -> None:
        if self.limits.active >= self.limits.max_viewers:
            await send_error(self.ws, Overloaded("too many viewers; try again later"))
            return
        self.limits.active += 1
        try:
            await self._run()
        finally:
            self.limits.active -= 1

    async def _run(self) -> None:
        try:
            meta = await self.records.meta(self.sid)
        except SttError as exc:
            await send_error(self.ws, exc)
            return
        await self.ws.send(to_json(ViewerStarted(
            session_id=self.sid, state=meta.state, model=meta.model,
            language=meta.language, after=self.params.after,
            partials=self.params.partials, original_timing=self.params.original_timing,
            replay_of=meta.replay_of or None)))
        pump = asyncio.create_task(self._pump(), name=f"viewer-{self.sid}")
        incoming = asyncio.create_task(read_controls(self.ws, limits=self.inbound))
        waiters: set[asyncio.Future[Any]] = {pump, incoming, self.queue.failed}
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            await stop_tasks(pump, incoming)
        failure = None if pump.cancelled() else pump.exception()
        if pump.done() and not pump.cancelled() and failure is None:
            return  # closed was sent
        if isinstance(failure, REDIS_DOWN):
            failure = StorageUnavailable("storage unavailable; reconnect with after=<last seq>")
        if failure is not None:
            if isinstance(failure, SttError):
                await send_error(self.ws, failure)
            elif not isinstance(failure, SocketClosed):
                log.error("session %s: viewer failed", self.sid, exc_info=failure)
                await send_error(self.ws, failure)
        elif self.queue.failed.done():
            reason = self.queue.failed.result()
            log.info("session %s: dropping viewer: %s", self.sid, reason.code)
            await drop(self.ws, reason, self.limits.grace_s)

    async def _pump(self) -> None:
        """History (optionally with its original timing), then live results, then close."""
        if self.params.original_timing and await self._timed_history():
            await self.ws.close(errors.NORMAL, "closed")
            return
        meta = await self.records.meta(self.sid)
        if meta.closed:  # nothing live to wait for: no hub
            await self._history()
            await self.ws.close(errors.NORMAL, "closed")
            return
        async with self.hubs.attach(self.sid, self.queue):
            if not await self._history():
                while not await self.sender.send(await self.queue.queue.get()):
                    pass
        await self.ws.close(errors.NORMAL, "closed")

    async def _history(self) -> bool:
        """Stored results after the sender's position; True when ``closed`` was among them.

        Of the stored partials only the newest one of a still-open utterance is
        worth showing: the others were superseded before this viewer came (on each channel
        of a multichannel session). While a partial is held back, what follows it
        (warnings, other channels' results) waits too, to keep seq order.
        """
        held: dict[int | None, Partial] = {}  # by channel
        pending: list[Result] = []  # in seq order, from the first held partial on
        async for _id, result in self.records.results(self.sid):
            if result.seq <= self.sender.last:
                continue
            if isinstance(result, Partial | Final):
                # superseded: a newer partial, or the utterance's final, of its channel
                old = held.pop(result.channel, None)
                if old is not None:
                    pending.remove(old)
                if isinstance(result, Partial):
                    if not self.params.partials:
                        continue
                    held[result.channel] = result
            pending.append(result)
            if isinstance(result, Closed):
                for r in pending:
                    await self.sender.send(r)
                return True
            while pending and not (isinstance(pending[0], Partial)
                                   and held.get(pending[0].channel) is pending[0]):
                if await self.sender.send(pending.pop(0)):
                    return True
        for r in pending:
            await self.sender.send(r)
        return False

    async def _timed_history(self) -> bool:
        """Stored results paced as they were first published; True when ``closed`` was sent."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        first_ms: int | None = None
        async for entry_id, result in self.records.results(self.sid):
            if result.seq <= self.sender.last or (
                    isinstance(result, Partial) and not self.params.partials):
                continue
            ms = int(entry_id.split("-", 1)[0])  # a stream id starts with its XADD time in ms
            if first_ms is None:
                first_ms = ms
            delay = started + (ms - first_ms) / 1000.0 / self.params.speed - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            if await self.sender.send(result):
                return True
        return False
