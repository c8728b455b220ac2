"""The worker loop: take sessions from the queue up to capacity, stream each through the core.

Only bytes and messages move here; every decision is in ``streaming.py``.
Model inference (VAD and Whisper) runs on a thread pool, never on the event loop: a
session's core call (VAD, decisions, the decodes they need) runs on a thread of its own,
and its Whisper decodes pass a gate of ``lanes`` (CPU lanes, or with batching
(BATCH_SIZE > 1) batch rows, so decodes of different sessions meet in
transcriber.batching). A session's VAD never waits behind other sessions' decodes.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import functools
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np
from redis.exceptions import ResponseError

from common import keys
from common.errors import StaleLease
from common.messages import (
    AudioFrame,
    AudioMarker,
    Closed,
    Partial,
    Warning,
    Word,
    unpack_audio_entry,
)
from common.metrics import HealthServer, WorkerMetrics, worker_metrics
from common.redis_client import REDIS_DOWN, make_redis
from common.session_meta import SessionMeta
from common.settings import TranscriberSettings
from common.streams import waiting_entries
from transcriber.commit import CLIENT_BACK, DUPLICATE, SessionWriter, unpack_stable
from transcriber.endpointing import EndpointConfig
from transcriber.gate import DecodeGate
from transcriber.model import BUNDLED, WhisperDecoder, load_whisper, resolve_device
from transcriber.streaming import (
    RATE,
    Committed,
    Event,
    PartialJob,
    StreamConfig,
    StreamingTranscriber,
)
from transcriber.vad import SileroVad

log = logging.getLogger(__name__)
T = TypeVar("T")

#: ENCODER_TAIL_FRAMES=auto on CPU: 6 s of padding after the audio (docs/benchmarks.md)
AUTO_TAIL_FRAMES_CPU = 600
#: FINAL_ENCODER_TAIL_FRAMES=auto with short-context partials: 10 s of padding; half the
#: final decode time of the full window, +0.3 WER points on 474 words (docs/benchmarks.md)
AUTO_FINAL_TAIL_FRAMES = 1000
#: INFERENCE_THREADS=auto on CPU: two decodes at once do 1.3-1.6x the work of one on this
#: 2-core machine, and a lone decode is as fast as on one lane (docs/benchmarks.md)
AUTO_LANES_CPU = 2
#: How often a full worker checks that no share holds more than its quota while others wait.
SHARE_CHECK_S = 0.5


def stream_config(s: TranscriberSettings, interim: bool) -> StreamConfig:
    return StreamConfig(
        endpoint=EndpointConfig(
            threshold=s.vad_threshold,
            neg_threshold=s.vad_neg_threshold,
            min_silence_samples=int(s.min_silence_s * RATE),
            min_speech_samples=int(s.min_speech_s * RATE),
        ),
        pad_samples=int(s.speech_pad_s * RATE),
        partial_interval_samples=int(s.partial_interval_s * RATE),
        max_utterance_samples=int(s.max_utterance_s * RATE),
        prompt_chars=s.prompt_chars,
        interim_results=interim and s.interim_results,
        stable_min_probability=s.stable_min_probability,
        unsure_guard_samples=int(s.stable_unsure_after_s * RATE),
        speculative_samples=int(s.speculative_silence_s * RATE),
        short_silence_samples=int(s.short_silence_s * RATE),
    )


def resolve_tails(s: TranscriberSettings, cuda: bool) -> tuple[int, int]:
    """(encoder tail frames for partials, for finals), with the automatic values resolved."""
    tail = s.encoder_tail_frames if s.encoder_tail_frames >= -1 else \
        (-1 if cuda else AUTO_TAIL_FRAMES_CPU)
    final = s.final_encoder_tail_frames
    if final < -1:  # auto: short context when the partials have it, a little longer
        final = -1 if tail < 0 else max(tail, AUTO_FINAL_TAIL_FRAMES)
    return tail, final


def share_of(meta: SessionMeta) -> str:
    """Whose session it is, for the fair share of slots: its API key (a token's too), else
    its principal, else the client's address (AUTH=off)."""
    if meta.account or meta.principal:
        return meta.account or meta.principal
    return f"ip:{meta.address}" if meta.address else ""


@dataclasses.dataclass(eq=False)
class Lease:
    """One session this worker runs: its work-queue entry, its task, its fenced writer.

    Compared by identity: a finished task clears only its own record, never a newer one's.
    """

    sid: str
    entry_id: bytes
    task: asyncio.Task[None] | None = None
    writer: SessionWriter | None = None
    parked: bool = False  # gave its capacity slot back while its client is silent
    share: str = ""  # whose session (API key or principal) for the fair share of slots
    preempted: bool = False  # stopped to free a slot for another share: hand it back


class Worker:
    def __init__(self, settings: TranscriberSettings, model: Any = None,
                 vad: SileroVad | None = None) -> None:
        self.settings = settings
        self.consumer = settings.consumer or \
            f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.model = model
        self._models: dict[str, Any] = {}  # other models sessions asked for, loaded on demand
        self.vad = vad
        self.redis = make_redis(settings)
        self.blocking = make_redis(settings, blocking=True)
        self.probe = make_redis(settings, probe=True)
        cuda = resolve_device(settings.device, settings.compute_type)[0] == "cuda"
        # On a GPU the full window is cheap and batching pays; on a CPU, the reverse (measured)
        self.batch_size = settings.batch_size or (8 if cuda else 1)
        # Decodes that run at once, each on its own inference thread: a batching worker's
        # batch rows, or unbatched lanes (CTranslate2 workers), which pay on a CPU
        self.lanes = self.batch_size if self.batch_size > 1 else \
            (settings.inference_threads or (1 if cuda else AUTO_LANES_CPU))
        self.encoder_tail_frames, self._final_tail = resolve_tails(settings, cuda)
        self.gate = DecodeGate(self.lanes)
        # a thread for each session's core call and one for its detached partial (and for
        # loading models): only decodes queue, at the gate
        self.executor = ThreadPoolExecutor(max_workers=2 * settings.capacity + self.lanes,
                                           thread_name_prefix="inference")
        self._capacity = asyncio.Semaphore(settings.capacity)
        self._leases: dict[str, Lease] = {}  # the sessions running here, by id
        self._tasks: set[asyncio.Task[None]] = set()  # hand-backs under way
        # sessions the shutdown stopped, to put back on the queue
        self._handover: dict[str, Lease] = {}
        self.metrics: WorkerMetrics = worker_metrics()
        self._redis_ok_at = 0.0  # monotonic time of the last successful Redis ping
        # Redis server time minus this machine's: stream ids carry the server's time, and
        # ages computed from them must not depend on how far apart the two clocks are
        self.clock_offset_s = 0.0
        self._stopping = asyncio.Event()

    # ------------------------------------------------------------------ lifecycle

    def load(self) -> None:
        if self.model is None:
            s = self.settings
            self.model = self._load_whisper(s.model, self.encoder_tail_frames)
        if self.vad is None:
            self.vad = SileroVad()

    def _load_whisper(self, name: str, tail_frames: int) -> Any:
        s = self.settings
        return load_whisper(name, s.device, s.compute_type, s.cpu_threads, tail_frames,
                            max_batch=self.batch_size, batch_wait_s=s.batch_wait_ms / 1000.0,
                            on_batch=lambda op, rows: self.metrics.batch_rows.labels(op)
                            .observe(rows),
                            num_workers=1 if self.batch_size > 1 else self.lanes)

    async def ensure_group(self) -> None:
        try:
            await self.redis.xgroup_create(keys.SESSIONS, keys.GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def stop(self) -> None:
        self._stopping.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def readiness(self) -> tuple[bool, str]:
        """Ready = model loaded and Redis answered within the last few seconds."""
        if self.model is None or self.vad is None:
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

    async def run(self) -> None:
        self.load()
        await self.ensure_group()
        log.info("worker %s ready, capacity %d", self.consumer, self.settings.capacity)
        renew = asyncio.create_task(self._renew_leases())
        watch = asyncio.create_task(self._watch_redis())
        balance = asyncio.create_task(self._balance_shares())
        try:
            await self._take_sessions()
        finally:
            renew.cancel()
            watch.cancel()
            balance.cancel()
            await self._release_all()
            await asyncio.gather(renew, watch, balance, *self._tasks, return_exceptions=True)
            await self.redis.aclose()
            await self.blocking.aclose()
            await self.probe.aclose()
            self.executor.shutdown(wait=False, cancel_futures=True)

    async def _release_all(self) -> None:
        """Shutdown: stop our sessions and put them straight back on the queue.

        Another worker picks them up at once (no waiting for the lease to
        expire) and resumes from the commit point.
        """
        running = {lease.task for lease in self._leases.values() if lease.task is not None}
        for _ in range(10):  # a cancellation lost inside the Redis client is sent again
            if not running:
                break
            for task in running:
                task.cancel()
            _, running = await asyncio.wait(running, timeout=1.0)
        if running:  # the new owner's epoch fences out whatever these still write
            log.warning("%d session task(s) did not stop; handing over anyway", len(running))
        await asyncio.sleep(0)  # the stopped tasks' done callbacks have run
        handover = {**self._leases, **self._handover}  # stopped, and still running
        for lease in handover.values():
            await self._hand_back(lease)

    async def _hand_back(self, lease: Lease) -> None:
        """Put a session this worker stopped back on the queue: the next worker resumes it
        from its commit point at once, without waiting for the lease to expire."""
        try:
            if lease.writer is not None and not await lease.writer.release():
                return
            # A retried hand-back may queue a second entry: the first worker to take one
            # holds the lease, and the other entry is dropped as a duplicate.
            pipe = self.redis.pipeline(transaction=True)
            pipe.xack(keys.SESSIONS, keys.GROUP, lease.entry_id)
            pipe.xdel(keys.SESSIONS, lease.entry_id)
            pipe.xadd(keys.SESSIONS, {"sid": lease.sid})
            await pipe.execute()
            log.info("session %s: released for another worker", lease.sid)
        except REDIS_DOWN as exc:
            log.warning("session %s: could not release (%s); lease will expire", lease.sid, exc)

    async def _take_sessions(self) -> None:
        backoff = 0.1
        while not self._stopping.is_set():
            await self._capacity.acquire()
            if self._stopping.is_set():
                self._capacity.release()
                break
            started = False
            try:
                entry = await self._next_entry()
                backoff = 0.1
                if entry is not None:
                    entry_id, sid = entry
                    started = await self._start_session(entry_id, sid)
            except REDIS_DOWN as exc:
                log.warning("redis unavailable while waiting for sessions: %s", exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            finally:
                if not started:
                    self._capacity.release()

    async def _next_entry(self) -> tuple[bytes, str] | None:
        """A session idle past the lease (its owner died) first, else a new one."""
        taken = await self._expired_entry()
        if taken is not None:
            return taken
        resp = await self.blocking.xreadgroup(
            keys.GROUP, self.consumer, {keys.SESSIONS: ">"}, count=1,
            block=self.settings.redis_block_ms)
        for _stream, entries in resp or ():
            for entry_id, fields in entries:
                return entry_id, fields[b"sid"].decode()
        return None

    async def _expired_entry(self) -> tuple[bytes, str] | None:
        """Claim one work entry whose lease expired (its owner died or stalled).

        XPENDING with IDLE examines the whole pending list on the server, so an expired
        entry is found however many live sessions come before it (XAUTOCLAIM from 0-0 with
        COUNT 1 looked at the same ten oldest, live entries on every call); one call a tick
        returns at most ``takeover_scan`` of them. XCLAIM re-checks the idle time, so two
        workers cannot both claim one entry.
        """
        lease_ms = self.settings.lease_ms
        pending = await self.redis.xpending_range(
            keys.SESSIONS, keys.GROUP, min="-", max="+", count=self.settings.takeover_scan,
            idle=lease_ms)
        self.metrics.oldest_expired_lease.set(max(
            (max(0, p["time_since_delivered"] - lease_ms) / 1000.0 for p in pending),
            default=0.0))
        ours = {lease.entry_id for lease in self._leases.values()}
        for p in pending:
            entry_id = p["message_id"]
            if entry_id in ours:  # our own renewal is late; it is still ours
                continue
            claimed = await self.redis.xclaim(keys.SESSIONS, keys.GROUP, self.consumer,
                                              min_idle_time=lease_ms, message_ids=[entry_id])
            for claimed_id, fields in claimed:
                if not fields:  # deleted meanwhile: nothing to run
                    await self._finish_entry(claimed_id)
                    continue
                sid = fields[b"sid"].decode()
                log.info("session %s: taking over after lease expiry (%.1f s idle)", sid,
                         p["time_since_delivered"] / 1000.0)
                self.metrics.takeovers.inc()
                return claimed_id, sid
        return None

    async def _start_session(self, entry_id: bytes, sid: str) -> bool:
        """Run the session (True), unless this worker runs it already (False)."""
        running = self._leases.get(sid)
        if running is not None:  # a second entry for a session this worker already runs
            if running.entry_id != entry_id:
                log.warning("session %s: dropping a duplicate work entry", sid)
                await self._finish_entry(entry_id)
            return False
        lease = Lease(sid, entry_id)
        self._leases[sid] = lease
        lease.task = asyncio.create_task(self._session(lease), name=f"session-{sid}")
        self.metrics.sessions_started.inc()
        self.metrics.sessions_active.inc()

        def done(t: asyncio.Task[None]) -> None:
            if t.cancelled() and self._stopping.is_set():  # stopped by the shutdown: hand over
                self._handover[sid] = lease
            elif t.cancelled() and lease.preempted:
                self._background(self._hand_back(lease))
            self.metrics.sessions_active.dec()
            if lease.parked:
                self.metrics.sessions_parked.dec()
            if self._leases.get(sid) is lease:
                del self._leases[sid]
                with contextlib.suppress(KeyError):
                    self.metrics.lag_seconds.remove(sid)
            if not lease.parked:  # a parked session's slot was given back already
                self._capacity.release()
            if not t.cancelled() and t.exception() is not None:
                log.error("session %s: failed", sid, exc_info=t.exception())

        lease.task.add_done_callback(done)
        return True

    async def _renew_leases(self) -> None:
        """Re-claim our own work entries well inside the lease, so nobody takes them over.

        A session whose epoch moved on (we were paused past the lease and
        another worker took it) is stopped instead of re-claimed.
        """
        interval = self.settings.lease_ms / 3000.0
        while True:
            await asyncio.sleep(interval)
            try:
                ids = []
                for sid, lease in list(self._leases.items()):
                    if lease.writer is not None and not await lease.writer.renew():
                        log.warning("session %s: lease lost to another worker; stopping", sid)
                        if lease.task is not None:
                            lease.task.cancel()
                        await self._drop_if_duplicate(lease)
                        continue
                    ids.append(lease.entry_id)
                if ids:
                    await self.redis.xclaim(keys.SESSIONS, keys.GROUP, self.consumer,
                                            min_idle_time=0, message_ids=ids, justid=True)
            except REDIS_DOWN as exc:
                log.warning("lease renewal failed: %s", exc)

    # ------------------------------------------------------------------ one session

    async def _session(self, lease: Lease) -> None:
        sid, entry_id = lease.sid, lease.entry_id
        epoch = await SessionWriter.acquire(self.redis, sid, self.consumer, entry_id,
                                            self.settings.lease_ms)
        if epoch is None:
            log.warning("session %s: no metadata (expired?), dropping queue entry", sid)
            await self._finish_entry(entry_id)
            return
        if epoch == DUPLICATE:
            log.warning("session %s: another worker holds its lease; dropping a duplicate "
                        "work entry", sid)
            await self._finish_entry(entry_id)
            return
        meta = SessionMeta.decode(await self.redis.hgetall(keys.meta(sid)))
        if meta.closed:
            await self._finish_entry(entry_id)
            return
        writer = SessionWriter(self.redis, sid, epoch)
        lease.writer = writer
        lease.share = share_of(meta)
        if self._over_share(lease.share) and await self._others_waiting():
            await self._hand_back(lease)  # behind the others' sessions
            return
        language = meta.language or self.settings.language
        try:
            model = await self.model_for(meta.model)
        except Exception as exc:  # unknown name, missing files: the session cannot run here
            log.error("session %s: cannot load model %r: %s", sid, meta.model, exc)
            await writer.publish(Warning(sid, "model_unavailable",
                                         "the requested model is not available"))
            await writer.close(Closed(sid, 0, 0.0), self.settings.retention_s)
            await self._finish_entry(entry_id)
            return
        assert self.vad is not None
        core = StreamingTranscriber(
            sid,
            TimedDecoder(WhisperDecoder(model, language, self.settings.beam_size,
                                        self.settings.partial_beam_size,
                                        self.settings.prompt_tokens,
                                        self.settings.encoder_min_frames,
                                        self._final_tail if model is self.model else None,
                                        self.settings.final_retry_probability),
                         self.metrics, self.gate,
                         meta.account or meta.principal or sid),
            self.vad.stream(),
            stream_config(self.settings, meta.interim),
            start_sample=meta.commit_sample,
            next_utterance=meta.next_utterance,
            prompt=meta.prompt,
            stable=unpack_stable(meta.stable, meta.next_utterance),
        )
        cursor = meta.resume_id or "0-0"
        log.info("session %s: started (epoch %d, from sample %d)", sid, epoch, core.position)
        try:
            await _SessionRun(self, lease, core, writer, cursor).run()
            await self._finish_entry(entry_id)
            log.info("session %s: closed", sid)
        except HandBack as exc:
            log.info("session %s: %s; handing it on from its commit point", sid, exc)
            await self._hand_back(lease)
        except StaleLease:
            log.warning("session %s: lease lost to another worker; stopping", sid)
            await self._drop_if_duplicate(lease)

    async def _drop_if_duplicate(self, lease: Lease) -> None:
        """After losing a session: if the new owner holds it through another entry, ours is
        a duplicate (acknowledged and deleted, or it would expire and be taken over again);
        if the new owner claimed our entry, it is theirs now and stays."""
        with contextlib.suppress(*REDIS_DOWN):
            entry = await self.redis.hget(keys.meta(lease.sid), "lease_entry")
            if entry is not None and entry != lease.entry_id:
                await self._finish_entry(lease.entry_id)

    async def _finish_entry(self, entry_id: bytes) -> None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.xack(keys.SESSIONS, keys.GROUP, entry_id)
        pipe.xdel(keys.SESSIONS, entry_id)
        await pipe.execute()

    async def model_for(self, name: str) -> Any:
        """The worker's own model, or another one a session (e.g. a replay) asked for."""
        own = {"", self.settings.model} | ({BUNDLED} if self.settings.model in ("", BUNDLED)
                                           else set())
        if name in own:
            return self.model
        if name not in self._models:
            s = self.settings
            loop = asyncio.get_running_loop()
            model = await loop.run_in_executor(self.executor, self._load_whisper, name, -1)
            while len(self._models) >= s.max_extra_models:
                self._models.pop(next(iter(self._models)))
            self._models[name] = model
        return self._models[name]

    def _background(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @property
    def share_quota(self) -> int:
        """Slots one share may hold while sessions of a share under its quota wait."""
        share = self.settings.principal_share
        if share <= 0 or share >= 1:
            return self.settings.capacity
        return max(1, int(share * self.settings.capacity))

    def _held(self, share: str) -> list[Lease]:
        """The share's sessions that hold a slot here (not parked), oldest first."""
        return [lease for lease in self._leases.values()
                if lease.share == share and not lease.parked and lease.writer is not None]

    def _over_share(self, share: str, margin: int = 0) -> bool:
        return len(self._held(share)) > self.share_quota + margin

    async def _others_waiting(self) -> bool:
        """Whether a queued session of a share under its quota here waits (the first
        ``takeover_scan`` waiting entries are looked at)."""
        waiting = await waiting_entries(self.redis, self.settings.takeover_scan)
        if not waiting:
            return False
        pipe = self.redis.pipeline(transaction=False)
        for _entry_id, sid in waiting:
            pipe.hgetall(keys.meta(sid))
        for raw in await pipe.execute():
            if not self._over_share(share_of(SessionMeta.decode(raw)), margin=-1):
                return True
        return False

    async def _balance_shares(self) -> None:
        """While this worker is full and a session of another share waits, a share holding
        more than its quota gives its newest session back to the queue."""
        while True:
            await asyncio.sleep(SHARE_CHECK_S)
            if not self._capacity.locked() or self.share_quota >= self.settings.capacity:
                continue
            shares = {lease.share for lease in self._leases.values()}
            over = [share for share in shares if self._over_share(share)]
            if not over:
                continue
            try:
                if not await self._others_waiting():
                    continue
            except REDIS_DOWN:
                continue
            held = self._held(max(over, key=lambda share: len(self._held(share))))
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

    @property
    def busy(self) -> int:
        """Decodes waiting at the gate or running (all sessions share the lanes)."""
        return self.gate.active

    async def infer(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, functools.partial(fn, *args, **kwargs))


class TimedDecoder:
    """Passes the worker's decode gate and observes every decode's duration, by kind."""

    def __init__(self, decoder: WhisperDecoder, metrics: WorkerMetrics,
                 gate: DecodeGate | None = None, share: str = "") -> None:
        """``share``: whose decode this is for the gate's fair share (a principal, or the
        session when it has none)."""
        self.decoder = decoder
        self.metrics = metrics
        self.gate = gate
        self.share = share

    def decode(self, audio: np.ndarray, prompt: str, final: bool,
               shown: Sequence[str] = (), speculative: bool = False) -> list[Word]:
        if self.gate is None:
            return self._timed(audio, prompt, final, shown)
        asked = time.perf_counter()
        with self.gate.lane(DecodeGate.PARTIAL if not final else
                            DecodeGate.SPECULATIVE if speculative else DecodeGate.FINAL,
                            self.share):
            self.metrics.decode_wait_seconds.labels(
                "partial" if not final else "speculative" if speculative else "final").observe(
                time.perf_counter() - asked)
            return self._timed(audio, prompt, final, shown)

    def _timed(self, audio: np.ndarray, prompt: str, final: bool,
               shown: Sequence[str]) -> list[Word]:
        began = time.perf_counter()
        redos = dict(self.decoder.redos)
        try:
            return self.decoder.decode(audio, prompt, final, shown)
        finally:
            self.metrics.decode_seconds.labels("final" if final else "partial").observe(
                time.perf_counter() - began)
            for reason, n in self.decoder.redos.items():
                if n > redos.get(reason, 0):
                    self.metrics.full_window_redos.labels(reason).inc(n - redos.get(reason, 0))


def _reraise_cancel() -> None:
    """Re-raise a cancellation that the Redis client turned into a connection error.

    A task cancelled while redis-py waits on a socket may see a timeout or
    connection error instead of ``CancelledError`` (redis-py #2028, #2551); a
    retry loop would then keep a session running through a shutdown.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def with_retry(sid: str, what: str, call: Callable[[], Awaitable[Any]],
                     metrics: WorkerMetrics | None = None) -> Any:
    """Retry a write through a Redis outage (the fenced scripts make retries safe)."""
    backoff = 0.1
    while True:
        try:
            return await call()
        except REDIS_DOWN as exc:
            _reraise_cancel()
            if metrics is not None:
                metrics.redis_errors.labels("transcriber").inc()
            log.warning("session %s: %s failed (%s); retrying", sid, what, exc)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)


class HandBack(Exception):
    """The session goes back on the queue for whichever worker has room, from its commit
    point: an idle close found the client back, or a parked session speaks again while
    this worker has no free slot."""


class _SessionRun:
    """Reads one session's audio stream from its cursor and publishes what the core emits."""

    def __init__(self, worker: Worker, lease: Lease, core: StreamingTranscriber,
                 writer: SessionWriter, cursor: str) -> None:
        self.worker = worker
        self.lease = lease
        self.sid = lease.sid
        self._quiet_since: float | None = None  # monotonic: no utterance open since then
        self._finalize_due = False  # a client 'finalize' waits for FINALIZE_MIN_INTERVAL_S
        self._finalized_at = -float("inf")  # monotonic time of the last one applied
        self.core = core
        self.writer = writer
        self.cursor = cursor
        # (entry id, sample offset just after it) of recent entries, to find a resume point.
        self._recent: collections.deque[tuple[str, int]] = collections.deque(maxlen=4096)
        self._resume_id = cursor
        self._read_at = self._fed_at = 0.0  # wall times of the last read and feed (timing)
        self._xadd_ms = 0  # when the gateway appended the newest entry read
        # end sample → append time (ms) of recent entries, for the time-to-final metric
        self._appended_at: collections.OrderedDict[int, int] = collections.OrderedDict()
        self._core_lock = asyncio.Lock()
        self._partial_task: asyncio.Task[None] | None = None  # a detached partial decode

    async def run(self) -> None:
        try:
            await self._run()
        finally:
            if self._partial_task is not None:  # its words would come after the session
                self._partial_task.cancel()

    async def _run(self) -> None:
        s = self.worker.settings
        key = keys.audio(self.sid)
        last_audio = time.monotonic()
        while True:
            if self.worker.stopping:  # shutting down: the session is handed to another worker
                raise asyncio.CancelledError
            self._check_partial()
            try:
                resp = await self.worker.blocking.xread(
                    {key: self.cursor}, count=s.read_batch, block=s.redis_block_ms)
            except REDIS_DOWN as exc:
                _reraise_cancel()
                self.worker.metrics.redis_errors.labels("transcriber").inc()
                log.warning("session %s: redis read failed: %s", self.sid, exc)
                await asyncio.sleep(0.5)
                continue
            if resp:
                last_audio = time.monotonic()
            elif time.monotonic() - last_audio > s.idle_timeout_s and await self._abandoned():
                log.info("session %s: no audio and no client for %.0f s; closing",
                         self.sid, s.idle_timeout_s)
                self._queued()
                await self._call(self.core.finish)
                await self._close(AudioMarker("close", 0, self.core.position), idle=True)
                return
            pending: list[np.ndarray] = []
            self._read_at = self.worker.redis_now()
            for _stream, entries in resp or ():
                for entry_id, fields in entries:
                    self.cursor = entry_id.decode()
                    self._xadd_ms = int(self.cursor.split("-", 1)[0])
                    entry = unpack_audio_entry(fields)
                    if isinstance(entry, AudioFrame):
                        pending.append(self._new_samples(entry))
                        self._recent.append((self.cursor, entry.offset + entry.samples))
                        self._appended_at[entry.offset + entry.samples] = self._xadd_ms
                        if len(self._appended_at) > 4096:  # bounded through long silences
                            self._appended_at.popitem(last=False)
                        continue
                    await self._feed(pending)
                    pending = []
                    self._queued()
                    if entry.kind == "finalize":
                        self._finalize_due = True
                        await self._finalize_if_due()
                    elif entry.kind == "close":
                        await self._call(self.core.finish)
                        await self._close(entry)
                        return
            await self._feed(pending)
            await self._finalize_if_due()
            await self._slot()
            if resp:
                self.worker.metrics.lag_seconds.labels(self.sid).set(
                    max(0.0, self.worker.redis_now() - self._xadd_ms / 1000.0))

    async def _finalize_if_due(self) -> None:
        """Apply a client's ``finalize`` (end the open utterance now), at most one per
        ``finalize_min_interval_s``: one asked for sooner is applied when that has passed,
        so a client sending it every few hundred milliseconds cannot turn its session into
        a stream of final decodes (the audio it covers is decoded all the same)."""
        if not self._finalize_due:
            return
        now = time.monotonic()
        if now - self._finalized_at < self.worker.settings.finalize_min_interval_s:
            return
        self._finalize_due = False
        self._finalized_at = now
        await self._call(self.core.finalize)

    async def _slot(self) -> None:
        """Park after ``park_after_s`` with no utterance open (no speech, or no audio at
        all: a socket sending only keepalives); take a slot again when speech opens one."""
        after = self.worker.settings.park_after_s
        if after <= 0:
            return
        now = time.monotonic()
        if self.core.open_utterance_start is not None:
            self._quiet_since = None
            await self.worker.unpark(self.lease)
        elif self._quiet_since is None:
            self._quiet_since = now
        elif now - self._quiet_since >= after and not self.lease.parked:
            log.info("session %s: no speech for %.0f s; its slot is free for another session "
                     "until it speaks", self.sid, after)
            self.worker.park(self.lease)

    async def _abandoned(self) -> bool:
        """No client heartbeat for the idle time, measured on Redis time (the gateway that
        writes the heartbeat may run on a machine whose clock disagrees with ours)."""
        silence = await self.writer.client_silence_ms()
        return silence is None or silence > self.worker.settings.idle_timeout_s * 1000

    def _new_samples(self, frame: AudioFrame) -> np.ndarray:
        """Samples of a frame the core has not seen (a resumed session re-reads some)."""
        pcm = np.frombuffer(frame.pcm, dtype="<i2")
        skip = self.core.position - frame.offset
        return pcm[skip:] if skip > 0 else pcm

    async def _feed(self, parts: list[np.ndarray]) -> None:
        parts = [p for p in parts if len(p)]
        if not parts:
            return
        pcm = np.concatenate(parts)
        self._fed_at = self.worker.redis_now()
        # Load shedding: when other decodes wait for a lane, or this audio is already old,
        # skip partials (and speculation) so finals stay on time.
        s = self.worker.settings
        age = self._fed_at - self._xadd_ms / 1000.0
        queued = self._queued()
        shed = queued >= s.partial_max_queue or age >= s.partial_max_age_s
        partials = not shed and self._partial_task is None  # one partial decode at a time
        speculate = queued < s.speculate_max_queue
        if shed:
            self.worker.metrics.partials_skipped.inc()
        await self._call(self.core.feed, pcm, partials=partials, speculate=speculate,
                         detach=True)
        self.worker.metrics.audio_seconds.inc(len(pcm) / RATE)
        await with_retry(self.sid, "progress", lambda: self.writer.progress(self.core.position))

    def _queued(self) -> int:
        """Other sessions' inference calls waiting now; under load, finals go short too."""
        # the worker runs ``lanes`` calls at once (batch rows or CPU lanes): only the calls
        # beyond those wait
        queued = max(0, self.worker.busy - (self.worker.lanes - 1))
        n = self.worker.settings.short_finals_queue
        timed = self.core.decoder
        if isinstance(timed, TimedDecoder):
            timed.decoder.short_finals = n > 0 and queued >= n
        return queued

    def _observe_time_to_final(self, ev: Committed) -> None:
        """Commit time minus when the audio of the final's last word reached Redis."""
        if not ev.final.text:
            return
        end_sample = int(ev.final.end * RATE)
        for end, xadd_ms in self._appended_at.items():
            if end >= end_sample:
                self.worker.metrics.time_to_final.observe(
                    max(0.0, self.worker.redis_now() - xadd_ms / 1e3))
                break
        self.worker.metrics.finals.inc()

    def _resume_point(self, commit_sample: int) -> str:
        """The last entry that ends at or before the commit point: resume reading after it."""
        while self._recent and self._recent[0][1] <= commit_sample:
            self._resume_id = self._recent.popleft()[0]
        while self._appended_at and next(iter(self._appended_at)) <= commit_sample:
            self._appended_at.popitem(last=False)
        return self._resume_id

    async def _call(self, fn: Callable[..., list[Event]], *args: Any, **kwargs: Any) -> None:
        """One core call on an inference thread, and what it emits published, in order with
        the detached partials' (the lock keeps the core to one caller at a time)."""
        async with self._core_lock:
            await self._publish(await self.worker.infer(fn, *args, **kwargs))

    async def _run_partial(self, job: PartialJob) -> None:
        """A detached partial decode; the session goes on reading audio meanwhile."""
        try:
            words = await self.worker.infer(job.run)
            async with self._core_lock:
                partial = self.core.partial_done(job, words)
                if partial is not None:
                    await self._publish([partial])
        finally:
            self._partial_task = None

    def _check_partial(self) -> None:
        """A detached partial that failed fails the session, as a partial decoded inline
        would (a lost lease included)."""
        task = self._partial_task
        if task is not None and task.done() and not task.cancelled() and task.exception():
            raise task.exception()  # type: ignore[misc]

    async def _publish(self, events: list[Event]) -> None:
        for ev in events:
            if isinstance(ev, PartialJob):
                self._partial_task = asyncio.create_task(self._run_partial(ev))
            elif isinstance(ev, Partial):
                await with_retry(self.sid, "partial", functools.partial(
                    self.writer.publish, ev, self.core.stable_words))
            elif isinstance(ev, Committed):
                self._observe_time_to_final(ev)
                timing = {"xadd": self._xadd_ms / 1000.0, "read": self._read_at,
                          "fed": self._fed_at, "done": self.worker.redis_now(),
                          "decode": round(ev.decode_s, 4)}
                await with_retry(self.sid, "commit", functools.partial(
                    self.writer.commit, ev.final, ev.commit_sample, ev.next_utterance,
                    self.core.prompt, self._resume_point(ev.commit_sample), timing))

    async def _close(self, marker: AudioMarker, idle: bool = False) -> None:
        closed = Closed(session_id=self.sid, utterances=self.core.utterance,
                        duration=round(marker.offset / RATE, 3))
        idle_ms = int(self.worker.settings.idle_timeout_s * 1000) if idle else 0
        seq = await with_retry(self.sid, "close", lambda: self.writer.close(
            closed, self.worker.settings.retention_s, idle_ms, self.cursor))
        if seq == CLIENT_BACK:
            raise HandBack("the client came back while it was closed as idle")


async def serve(settings: TranscriberSettings) -> None:
    import signal

    worker = Worker(settings)
    health = HealthServer(worker.metrics.registry, worker.readiness, settings.metrics_host,
                          settings.metrics_port).start()
    log.info("metrics, healthz and readyz on port %d", health.port)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, worker.stop)
    try:
        await worker.run()
    finally:
        health.stop()
