"""The worker loop: take sessions from the queue up to capacity, run each, renew, stop.

In the manner of arq's Worker: a semaphore of CAPACITY slots; the loop takes a work
entry whenever a slot is free and runs its session as a task; a few chores run beside it
(lease renewal, the Redis clock probe, the fair-share check); SIGTERM stops intake, stops
the sessions and hands them back to the queue, so another worker resumes each from its
commit point at once.

Where the rest is: the work queue (``common/work_queue.py``), the leases (``leases.py``),
one session's pump (``session.py``), models, threads and the decode gate
(``inference.py``), settings resolved (``config.py``), every decision (``streaming.py``,
``policy.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from common import keys
from common.backoff import REDIS_DOWN, Backoff, reraise_cancel, until_up
from common.errors import StaleLease
from common.metrics import WorkerMetrics, serve_health, worker_metrics
from common.models import ANNOUNCE_TTL_INTERVALS, WorkerInfo, announce, model_name_ok, withdraw
from common.redis_client import make_redis
from common.session_meta import SessionMeta, channel_points
from common.sessions import Sessions
from common.settings import TranscriberSettings
from common.work_queue import WorkQueue
from transcriber.channels import ChannelCores
from transcriber.commit import DUPLICATE, OTHER_MODEL, SessionWriter
from transcriber.config import WorkerConfig, vad_level
from transcriber.inference import Inference
from transcriber.leases import Lease, Leases
from transcriber.policy import SharePolicy, share_of
from transcriber.session import HandBack, SessionPump, channel_cores, session_core
from transcriber.streaming import StreamingTranscriber
from transcriber.vad import SileroVad

log = logging.getLogger(__name__)
T = TypeVar("T")

#: How often a full worker checks that no share holds more than its quota while others wait.
SHARE_CHECK_S = 0.5
#: How long a one-off step (acquiring a lease, reading a session record, acknowledging or
#: handing back an entry) waits out a Redis outage before it fails.
ONE_OFF_S = 5.0
#: Largest wait between tries of the loop that takes sessions while Redis is down.
TAKE_BACKOFF_CAP_S = 5.0


class Worker:
    def __init__(self, settings: TranscriberSettings, model: Any = None,
                 vad: SileroVad | None = None) -> None:
        self.settings = settings
        self.consumer = settings.consumer or \
            f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.config = WorkerConfig.from_settings(settings)
        self.metrics: WorkerMetrics = worker_metrics()
        self.inference = Inference(settings, self.config, self.metrics, model, vad)
        self.policy = self.config.load_policy(settings)
        self.shares = SharePolicy(settings.capacity, settings.principal_share)
        # Who retries a failed Redis command (common/backoff.py): the loop around it, never
        # the client as well. So both clients are retries=False: every command the worker
        # sends is in a loop that waits outages out (taking sessions: Backoff; a session's
        # reads and fenced writes: Backoff, with_retry; lease renewal and the share check:
        # their next tick) or is a one-off step that ``_once`` tries for ONE_OFF_S (the
        # group at start, acquiring a lease, reading the session record, acknowledging or
        # handing back an entry). The probe never retries: the health check fails fast.
        self.redis = make_redis(settings, retries=False)
        self.blocking = make_redis(settings, blocking=True, retries=False)
        self.probe = make_redis(settings, probe=True)
        #: the model name this worker serves: it reads only that model's work queue
        self.model_name = self.inference.model_name
        if not model_name_ok(self.model_name):
            raise SystemExit(f"bad model name {self.model_name!r} (from STT_MODEL, or "
                             "STT_MODEL_PATH when STT_MODEL is empty): set STT_MODEL to "
                             "letters, digits and . _ : + -")
        self.queue = WorkQueue(self.redis, self.blocking, self.consumer, settings.lease_ms,
                               settings.takeover_scan, settings.redis_block_ms, self.metrics,
                               self.model_name)
        self.metrics_port = 0  # where /metrics is served (announced in the registry)
        self.leases = Leases()  # the sessions running here
        self._capacity = asyncio.Semaphore(settings.capacity)
        self._tasks: set[asyncio.Task[None]] = set()  # hand-backs under way
        self._compactions: set[asyncio.Task[None]] = set()  # closed sessions' audio
        self._compacting = asyncio.Semaphore(1)
        self.records = Sessions(self.redis)
        self._redis_ok_at = 0.0  # monotonic time of the last successful Redis ping
        # Redis server time minus this machine's: stream ids carry the server's time, and
        # ages computed from them must not depend on how far apart the two clocks are
        self.clock_offset_s = 0.0
        self._stopping = asyncio.Event()

    # ------------------------------------------------------------------ the loop

    async def run(self) -> None:
        # on an inference thread: the loop answers the health port meanwhile
        await self.inference.run(self.inference.load)
        await self._once(self.queue.ensure_group, "creating the work queue group")
        await self._once(self._announce_once, "announcing in the worker registry")
        log.info("worker %s ready, capacity %d, serving model %s (queue %s)", self.consumer,
                 self.settings.capacity, self.model_name, self.queue.stream)
        chores = [asyncio.create_task(c) for c in (
            self._renew_leases(), self._watch_redis(), self._balance_shares(),
            self._announce())]
        try:
            await self._take_sessions()
        finally:
            for chore in (*chores, *self._compactions):
                chore.cancel()
            await self._release_all()
            await asyncio.gather(*chores, *self._tasks, *self._compactions,
                                 return_exceptions=True)
            with contextlib.suppress(*REDIS_DOWN):  # or its record expires by itself
                await withdraw(self.redis, self.consumer)
            await self.redis.aclose()
            await self.blocking.aclose()
            await self.probe.aclose()
            self.inference.close()

    async def _take_sessions(self) -> None:
        backoff = Backoff(cap=TAKE_BACKOFF_CAP_S)
        while not self.stopping:
            await self._capacity.acquire()
            if self.stopping:
                self._capacity.release()
                break
            started = False
            try:
                entry = await self.queue.next_entry(self.leases.entry_ids())
                backoff.reset()
                if entry is not None:
                    started = await self._start_session(*entry)
            except REDIS_DOWN as exc:
                log.warning("redis unavailable while waiting for sessions: %s", exc)
                await backoff.wait()
            finally:
                if not started:
                    self._capacity.release()

    def stop(self) -> None:
        self._stopping.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    async def _release_all(self) -> None:
        """Shutdown: stop our sessions and put them straight back on the queue.

        Another worker picks them up at once (no waiting for the lease to
        expire) and resumes from the commit point.
        """
        running = {lease.task for lease in self.leases
                   if lease.task is not None and not lease.task.done()}
        for _ in range(10):  # a cancellation lost inside the Redis client is sent again
            if not running:
                break
            for task in running:
                task.cancel()
            _, running = await asyncio.wait(running, timeout=1.0)
        if running:  # the new owner's epoch fences out whatever these still write
            log.warning("%d session task(s) did not stop; handing over anyway", len(running))
        await asyncio.sleep(0)  # the stopped tasks' done callbacks have run
        for lease in self.leases:  # stopped, and still running
            await self._hand_back(lease)

    # ------------------------------------------------------------------ Redis

    async def _once(self, call: Callable[[], Awaitable[T]], what: str) -> T:
        """A one-off step, tried through an outage of up to ONE_OFF_S."""
        def failed(_exc: BaseException) -> None:
            reraise_cancel()
            self.metrics.redis_errors.labels("transcriber").inc()

        return await until_up(call, what, deadline_s=ONE_OFF_S, on_error=failed)

    def readiness(self) -> tuple[bool, str]:
        """Ready = model loaded and Redis answered within the last few seconds."""
        if not self.inference.loaded:
            return False, "model not loaded"
        if time.monotonic() - self._redis_ok_at > 5.0:
            return False, "redis unreachable"
        return True, "ready"

    def redis_now(self) -> float:
        """The Redis server's clock, as far as this worker can tell (unix seconds)."""
        return time.time() + self.clock_offset_s

    async def _watch_redis(self) -> None:
        while True:
            try:
                sent = time.time()
                seconds, micros = await self.probe.time()
                received = time.time()
                self.clock_offset_s = seconds + micros / 1e6 - (sent + received) / 2
                self._redis_ok_at = time.monotonic()
            except REDIS_DOWN:
                self.metrics.redis_errors.labels("transcriber").inc()
            await asyncio.sleep(1.0)

    def info(self) -> WorkerInfo:
        """What this worker serves now, for the registry (common/models.py)."""
        held = sum(1 for lease in self.leases if not lease.parked and not lease.handover)
        return WorkerInfo(self.consumer, self.model_name, self.inference.device,
                          self.settings.device_index, self.settings.capacity,
                          max(0, self.settings.capacity - held), socket.gethostname(),
                          self.metrics_port)

    async def _announce_once(self) -> None:
        await announce(self.redis, self.info(),
                       int(self.settings.announce_interval_s * ANNOUNCE_TTL_INTERVALS * 1000))

    async def _announce(self) -> None:
        """Tell the registry what this worker serves, every ``announce_interval_s`` (the
        first time before it says it is ready)."""
        while True:
            await asyncio.sleep(self.settings.announce_interval_s)
            try:
                await self._announce_once()
            except REDIS_DOWN as exc:
                log.warning("announcing in the worker registry failed: %s", exc)

    # ------------------------------------------------------------------ leases

    async def _start_session(self, entry_id: bytes, sid: str) -> bool:
        """Run the session (True), unless this worker runs it already (False)."""
        running = self.leases.get(sid)
        if running is not None:  # a second entry for a session this worker already runs
            if running.entry_id != entry_id:
                log.warning("session %s: dropping a duplicate work entry", sid)
                await self.queue.finish(entry_id)
            return False
        lease = Lease(sid, entry_id)
        self.leases.add(lease)
        lease.task = asyncio.create_task(self._session(lease), name=f"session-{sid}")
        lease.task.add_done_callback(lambda t: self._session_done(lease, t))
        self.metrics.sessions_started.inc()
        self.metrics.sessions_active.inc()
        return True

    def _session_done(self, lease: Lease, t: asyncio.Task[None]) -> None:
        if t.cancelled() and self.stopping:  # stopped by the shutdown: hand it over
            lease.handover = True
        elif t.cancelled() and lease.preempted:
            self._background(self._hand_back(lease))
        self.metrics.sessions_active.dec()
        if lease.parked:
            self.metrics.sessions_parked.dec()
        if not lease.handover:
            self.leases.discard(lease)
        with contextlib.suppress(KeyError):
            self.metrics.lag_seconds.remove(lease.sid)
        if not lease.parked:  # a parked session's slot was given back already
            self._capacity.release()
        if not t.cancelled() and t.exception() is not None:
            log.error("session %s: failed", lease.sid, exc_info=t.exception())

    async def _renew_leases(self) -> None:
        """Re-claim our own work entries well inside the lease, so nobody takes them over.

        A session whose epoch moved on (we were paused past the lease and
        another worker took it) is stopped instead of re-claimed.
        """
        while True:
            await asyncio.sleep(self.settings.lease_ms / 3000.0)
            try:
                ids = []
                for lease in self.leases:
                    if lease.writer is not None and not await lease.writer.renew():
                        log.warning("session %s: lease lost to another worker; stopping",
                                    lease.sid)
                        if lease.task is not None:
                            lease.task.cancel()
                        await self._drop_if_duplicate(lease)
                        continue
                    ids.append(lease.entry_id)
                await self.queue.renew(ids)
            except REDIS_DOWN as exc:
                log.warning("lease renewal failed: %s", exc)

    async def _hand_back(self, lease: Lease) -> None:
        """Put a session this worker stopped back on the queue: the next worker resumes it
        from its commit point at once, without waiting for the lease to expire."""
        sid = lease.sid
        try:
            if lease.writer is not None and not await self._once(
                    lease.writer.release, f"session {sid}: releasing its lease"):
                return
            await self._once(lambda: self.queue.hand_back(lease.entry_id, sid),
                             f"session {sid}: queueing it again")
            log.info("session %s: released for another worker", sid)
        except REDIS_DOWN as exc:
            log.warning("session %s: could not release (%s); lease will expire", sid, exc)

    async def _finish(self, lease: Lease) -> None:
        """The session ended here (or cannot run): its work entry is done."""
        await self._once(lambda: self.queue.finish(lease.entry_id),
                         f"session {lease.sid}: acknowledging its work entry")

    async def _drop_if_duplicate(self, lease: Lease) -> None:
        """After losing a session: if the new owner holds it through another entry, ours is
        a duplicate (acknowledged and deleted, or it would expire and be taken over again);
        if the new owner claimed our entry, it is theirs now and stays."""
        with contextlib.suppress(*REDIS_DOWN):
            entry = await self.redis.hget(keys.meta(lease.sid), "lease_entry")
            if entry is not None and entry != lease.entry_id:
                await self.queue.finish(lease.entry_id)

    def _compact_later(self, sid: str) -> None:
        """A closed session's audio stream is replaced by its compressed form
        (``COMPACT_CODEC``), one session at a time per worker, its encoding on a thread;
        cancelled at a stop (nothing is lost: the stream stays until a compaction
        completes, in one script)."""
        if self.settings.compact_codec == "off":
            return
        task = asyncio.create_task(self._compact(sid), name=f"compact-{sid}")
        self._compactions.add(task)
        task.add_done_callback(self._compactions.discard)

    async def _compact(self, sid: str) -> None:
        async with self._compacting:
            try:
                done = await self.records.compact(sid, self.settings.compact_codec,
                                                  self.settings.compact_opus_bitrate)
            except (*REDIS_DOWN, ValueError) as exc:
                log.warning("session %s: compaction failed (%s); its audio stays raw", sid, exc)
                return
        if done is not None:
            self.metrics.compactions.inc()
            self.metrics.compacted_bytes.labels("raw").inc(done.raw_bytes)
            self.metrics.compacted_bytes.labels("compacted").inc(done.compact_bytes)
            log.info("session %s: audio compacted (%s): %d -> %d bytes (%.1f s of audio)",
                     sid, self.settings.compact_codec, done.raw_bytes, done.compact_bytes,
                     done.samples / 16000)

    def _background(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ one session

    async def _session(self, lease: Lease) -> None:
        """Acquire the session's epoch, run its pump, then acknowledge or hand back."""
        sid, entry_id = lease.sid, lease.entry_id
        epoch = await self._once(lambda: SessionWriter.acquire(
            self.redis, sid, self.consumer, entry_id, self.settings.lease_ms, self.model_name),
            f"session {sid}: acquiring its lease")
        if epoch == OTHER_MODEL:  # queued here before queues were per model: move it
            model = SessionMeta.decode(await self._once(
                lambda: self.redis.hgetall(keys.meta(sid)),
                f"session {sid}: reading its record")).model
            log.warning("session %s: asks for model %s, not %s; moving it to that model's "
                        "queue", sid, model, self.model_name)
            await self._once(lambda: self.queue.reroute(entry_id, sid, model),
                             f"session {sid}: moving it to its model's queue")
            return
        if epoch is None:
            log.warning("session %s: no metadata (expired?), dropping queue entry", sid)
            await self._finish(lease)
            return
        if epoch == DUPLICATE:
            log.warning("session %s: another worker holds its lease; dropping a duplicate "
                        "work entry", sid)
            await self._finish(lease)
            return
        record = await self._once(lambda: self.redis.hgetall(keys.meta(sid)),
                                  f"session {sid}: reading its record")
        meta = SessionMeta.decode(record)
        if meta.closed:
            await self._finish(lease)
            return
        lease.writer = writer = SessionWriter(self.redis, sid, epoch,
                                              self.settings.redis_replica_acks,
                                              self.settings.redis_replica_ack_timeout_ms)
        lease.share = share_of(meta)
        if self.shares.over(self.leases.held(lease.share)) and await self._once(
                self._others_waiting, "looking at the work queue"):
            await self._hand_back(lease)  # behind the others' sessions
            return
        model = self.inference.model
        assert self.inference.vad is not None
        language, share = meta.language or self.settings.language, \
            meta.account or meta.principal or sid
        bias = (meta.keyterm_list, meta.user_prompt)  # keyterm= and prompt=
        core: StreamingTranscriber | ChannelCores
        if meta.multichannel:  # a core per channel: own VAD, decoder state, commit point
            n, level = meta.channels, vad_level(self.settings)
            core = channel_cores(sid, meta, channel_points(record, n),
                                 [self.inference.decoder(model, language, share, *bias)
                                  for _ in range(n)],
                                 [self.inference.vad.stream(level) for _ in range(n)],
                                 self.settings)
        else:
            # the speaker encoder is loaded by the first session that asks for speakers
            embedder = await self.inference.run(self.inference.embedder) \
                if meta.diarize else None
            core = session_core(sid, meta,
                                self.inference.decoder(model, language, share, *bias),
                                self.inference.vad.stream(vad_level(self.settings)),
                                self.settings, embedder)
        log.info("session %s: started (epoch %d, from sample %d%s)", sid, epoch,
                 core.position, f", {meta.channels} channels" if meta.multichannel else "")
        try:
            await SessionPump(self, lease, core, writer, meta.resume_id or "0-0",
                              tenant=meta.tenant, model=meta.model or self.model_name,
                              replay=bool(meta.replay_of)).run()
            await self._finish(lease)
            log.info("session %s: closed", sid)
            if not meta.multichannel:  # the codecs compact mono audio
                self._compact_later(sid)
        except HandBack as exc:
            log.info("session %s: %s; handing it on from its commit point", sid, exc)
            await self._hand_back(lease)
        except StaleLease:
            log.warning("session %s: lease lost to another worker; stopping", sid)
            await self._drop_if_duplicate(lease)

    # ------------------------------------------------------------------ slots

    async def _others_waiting(self) -> bool:
        """Whether a queued session of a share under its quota here waits (the first
        ``takeover_scan`` waiting entries are looked at)."""
        waiting = await self.queue.waiting()
        if not waiting:
            return False
        pipe = self.redis.pipeline(transaction=False)
        for _entry_id, sid in waiting:
            pipe.hgetall(keys.meta(sid))
        for raw in await pipe.execute():
            if self.shares.may_take(self.leases.held(share_of(SessionMeta.decode(raw)))):
                return True
        return False

    async def _balance_shares(self) -> None:
        """While this worker is full and a session of another share waits, a share holding
        more than its quota gives its newest session back to the queue."""
        while True:
            await asyncio.sleep(SHARE_CHECK_S)
            if not self._capacity.locked() or not self.shares.limited or \
                    not self.shares.most_over(self.leases.holdings()):
                continue
            try:
                if not await self._others_waiting():
                    continue
            except REDIS_DOWN:
                continue
            held = self.shares.most_over(self.leases.holdings())
            if not held:
                continue
            lease = held[-1]
            log.info("session %s: its principal holds %d of %d slots while others wait; "
                     "handing it back", lease.sid, len(held), self.settings.capacity)
            if lease.task is not None:
                lease.preempted = True
                lease.task.cancel()

    def park(self, lease: Lease) -> None:
        """Give a silent session's capacity slot back: the worker may take another session
        while this one only listens (VAD, no decodes) for its client to speak again."""
        if not lease.parked:
            lease.parked = True
            self.metrics.sessions_parked.inc()
            self._capacity.release()

    async def unpark(self, lease: Lease) -> None:
        """The session speaks again: it takes a free slot back, or, with none free, goes
        back on the queue for a worker with room (``HandBack``)."""
        if not lease.parked:
            return
        if self._capacity.locked():
            raise HandBack("it speaks again while this worker has no free slot")
        await self._capacity.acquire()
        lease.parked = False
        self.metrics.sessions_parked.dec()


async def serve(settings: TranscriberSettings) -> None:
    import signal

    worker = Worker(settings)
    try:
        health = await serve_health(worker.metrics.registry, worker.readiness,
                                    settings.metrics_host, settings.metrics_port)
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise
        # one line, no traceback: the usual cause is a second worker on this machine
        raise SystemExit(
            f"transcriber: metrics port {settings.metrics_port} on {settings.metrics_host} is "
            "already in use (another worker on this machine?): give each worker its own "
            "METRICS_PORT (--metrics-port), or METRICS_PORT=0 for any free port") from None
    worker.metrics_port = health.port
    log.info("metrics, healthz and readyz on port %d", health.port)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, worker.stop)
    try:
        await worker.run()
    finally:
        await health.close()
