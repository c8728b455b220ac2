"""One task per gateway that watches every attached session: heartbeat, queue, lag, model.

Once a second it reads every session's owner epoch and transcribed position in one
Redis pipeline (and refreshes the heartbeats every ``HEARTBEAT_S`` in the same
pipeline), then tells each client what changed: its position in its model's queue while
no transcriber has it, a ``model_unavailable`` warning while no worker serves its model,
a ``lag`` warning when transcription falls ``LAG_WARNING_S`` behind, and
``session_not_found`` when its session was deleted. The same pass refreshes the
autoscaling gauges (sessions waiting and the oldest wait per model queue, workers and
free slots per model from the worker registry), whether or not this gateway has sessions.
A task per session doing the same cost one Redis round trip and one wake-up per
socket per second (10 % of the gateway's CPU at 300
sockets, measured with py-spy).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from typing import Protocol

from common import keys
from common.audio import TARGET_RATE
from common.messages import Warning
from common.metrics import GatewayMetrics
from common.models import ServedModels
from common.redis_client import REDIS_DOWN
from common.sessions import GONE, Sessions
from common.tasks import LazyTask
from common.work_queue import queue_wait

log = logging.getLogger(__name__)

#: Seconds between two lag warnings of one session.
LAG_WARNING_EVERY_S = 5.0


class Watched(Protocol):
    """What the monitor needs of a session (``ListenSession``)."""

    sid: str
    model: str  # the model it asked for (its work queue)

    @property
    def samples_sent(self) -> int: ...

    def gone(self) -> None:
        """The session has no record any more (deleted, or expired): end its socket."""


class _State:
    __slots__ = ("owned", "position", "unserved", "warned_at")

    def __init__(self) -> None:
        self.owned = False
        self.position: int | None = None
        self.warned_at = -LAG_WARNING_EVERY_S
        self.unserved = False  # told model_unavailable (again once served and gone again)


class SessionMonitor:
    def __init__(self, store: Sessions, heartbeat_s: float, lag_warning_s: float,
                 on_redis_error: Callable[[], None] | None = None,
                 interval_s: float = 1.0, models: ServedModels | None = None,
                 metrics: GatewayMetrics | None = None) -> None:
        """``models``: the worker registry's view (model_unavailable warnings and the
        gauges); ``metrics``: where the autoscaling gauges go."""
        self.store = store
        self.heartbeat_s = heartbeat_s
        self.lag_warning_s = lag_warning_s
        self.interval_s = interval_s
        self.on_redis_error = on_redis_error
        self.models = models
        self.metrics = metrics
        self._sessions: dict[Watched, _State] = {}
        self._task = LazyTask(self._run, "session-monitor")
        self._beat_at = 0.0
        self._gauged: set[str] = set()  # models the gauges have a series for

    def start(self) -> None:
        """Run from now on (the gauges are refreshed with no session watched too)."""
        self._task.ensure()

    def watch(self, session: Watched) -> None:
        self._sessions[session] = _State()
        self._task.ensure()

    def unwatch(self, session: Watched) -> None:
        self._sessions.pop(session, None)

    async def close(self) -> None:
        await self._task.close()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.tick()
            except REDIS_DOWN as exc:
                if self.on_redis_error is not None:
                    self.on_redis_error()
                log.warning("session monitor: redis unavailable: %s", exc)

    async def tick(self) -> None:
        """One pass over every watched session, and the gauges."""
        sessions = list(self._sessions.items())
        served: set[str] | None = None
        if self.models is not None:
            served = set((await self.models.registry()).served())
            if self.metrics is not None:
                await self.refresh_gauges({getattr(s, "model", keys.DEFAULT_MODEL)
                                           for s, _ in sessions})
        if not sessions:
            return
        now = time.monotonic()
        beat = now - self._beat_at >= self.heartbeat_s
        progress = await self._read(sessions, beat)
        if beat:
            self._beat_at = now
        positions: dict[str, dict[str, int]] = {}  # by model
        notices: list[tuple[str, Warning]] = []
        for (session, state), (epoch, processed) in zip(sessions, progress, strict=True):
            if epoch == GONE:
                self.unwatch(session)
                session.gone()
                continue
            if not state.owned:
                if epoch:
                    state.owned = True
                    continue
                model = getattr(session, "model", keys.DEFAULT_MODEL)
                if model not in positions:
                    positions[model] = await self.store.waiting_positions(model)
                position = positions[model].get(session.sid)
                if position is not None and position != state.position:
                    notices.append((session.sid, Warning(
                        session.sid, "queued",
                        f"waiting for a free transcriber (position {position} in queue)")))
                state.position = position
                unserved = served is not None and model not in served
                if unserved and not state.unserved:
                    notices.append((session.sid, Warning(
                        session.sid, "model_unavailable",
                        f"no transcriber serves the model {model!r} now; the session waits "
                        "for one")))
                state.unserved = unserved
                continue
            lag = (session.samples_sent - processed) / TARGET_RATE
            if lag >= self.lag_warning_s and now - state.warned_at >= LAG_WARNING_EVERY_S:
                state.warned_at = now
                notices.append((session.sid, Warning(
                    session.sid, "lag", f"transcription is {lag:.1f} s behind the audio")))
        for sid, warning in notices:
            await self.store.notice(sid, warning)

    async def refresh_gauges(self, also: Iterable[str] = ()) -> None:
        """The autoscaling gauges of every model known (the default, ``MODELS``, served now or
        within the grace) and of ``also`` (this gateway's sessions' models)."""
        assert self.models is not None and self.metrics is not None
        m = self.metrics
        registry = await self.models.registry()
        served = registry.served()
        names = await self.models.known() | set(also)
        total = 0
        for name in sorted(names):
            waiting, oldest = await queue_wait(self.store.redis, name, registry.now_ms)
            total += waiting
            status = served.get(name)
            m.sessions_waiting.labels(name).set(waiting)
            m.queue_oldest_wait.labels(name).set(oldest)
            m.workers.labels(name).set(status.workers if status else 0)
            m.worker_capacity.labels(name).set(status.capacity if status else 0)
            m.worker_free_slots.labels(name).set(status.free_slots if status else 0)
        for gone in self._gauged - names:
            for gauge in (m.sessions_waiting, m.queue_oldest_wait, m.workers,
                          m.worker_capacity, m.worker_free_slots):
                gauge.remove(gone)
        self._gauged = set(names)
        m.sessions_queued.set(total)

    async def _read(self, sessions: list[tuple[Watched, _State]],
                    beat: bool) -> list[tuple[int, int]]:
        """(owner epoch, samples processed) of each session; heartbeats too when ``beat``."""
        return await self.store.progress_many([session.sid for session, _ in sessions], beat)
