"""One session's pump: read its audio from the cursor, feed the core, publish what it emits.

Only bytes and messages move here. What to emit is decided by the streaming core
(``streaming.py``); when to shed partials, apply a ``finalize`` or park, by
``policy.py``. Every write goes through the session's fenced ``SessionWriter``
(``commit.py``) and is retried through a Redis outage by ``with_retry`` (the fenced
scripts make retries safe).
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import numpy as np
import redis.asyncio as aioredis

from common import keys
from common.auth import DEFAULT_TENANT
from common.backoff import until_up
from common.messages import AudioFrame, AudioMarker, Closed, Partial, unpack_audio_entry
from common.metrics import WorkerMetrics
from common.session_meta import ChannelPoint, SessionMeta
from common.settings import TranscriberSettings
from common.streams import Entry, read_stream
from common.tenants import RECEIVED, TRANSCRIBED, Usage
from transcriber.channels import ChannelCores, ChannelPartials
from transcriber.commit import CLIENT_BACK, SessionWriter, unpack_stable
from transcriber.config import stream_config
from transcriber.inference import Inference, TimedDecoder
from transcriber.leases import Lease
from transcriber.policy import FinalizePacer, LoadPolicy, ParkTimer, Slot
from transcriber.speakers import Embedder, SpeakerConfig, SpeakerLabeler, SpeakerTracker
from transcriber.streaming import (
    RATE,
    Committed,
    Event,
    PartialJob,
    SpeechProbs,
    StreamingTranscriber,
)

log = logging.getLogger(__name__)

#: Recent audio entries remembered for resume points and time-to-final (bounded through
#: long silences).
READ_LOG_ENTRIES = 4096
#: A multichannel session's silent channel moves its stored commit point on once it is this
#: far behind where the channel could start over (``StreamingTranscriber.idle_point``): the
#: session's audio is re-read after a takeover from the earliest channel's point.
IDLE_ADVANCE_SAMPLES = 10 * 16000


class HandBack(Exception):
    """The session goes back on the queue for whichever worker has room, from its commit
    point: an idle close found the client back, or a parked session speaks again while
    this worker has no free slot."""


async def with_retry(sid: str, what: str, call: Callable[[], Awaitable[Any]],
                     metrics: WorkerMetrics | None = None) -> Any:
    """Retry a write through a Redis outage (the fenced scripts make retries safe); ``call``
    runs on a client that does not retry by itself (``make_redis(retries=False)``)."""
    def failed(_exc: BaseException) -> None:
        if metrics is not None:
            metrics.redis_errors.labels("transcriber").inc()

    return await until_up(call, f"session {sid}: {what}", on_error=failed)


def session_core(sid: str, meta: SessionMeta, decoder: TimedDecoder, vad: SpeechProbs,
                 settings: TranscriberSettings,
                 embedder: Embedder | None = None) -> StreamingTranscriber:
    """The streaming core of a session, resumed from the commit point in its record; with
    ``embedder`` (the session asked for ``diarize``) it labels speakers, with the speakers
    committed in the record."""
    speakers = None
    if embedder is not None:
        config = SpeakerConfig.from_settings(settings)
        speakers = SpeakerLabeler(embedder, config,
                                  SpeakerTracker.from_config(config, meta.speakers))
    return StreamingTranscriber(
        sid, decoder, vad, stream_config(settings, meta.interim, meta.endpointing),
        start_sample=meta.commit_sample,
        next_utterance=meta.next_utterance,
        prompt=meta.prompt,
        stable=unpack_stable(meta.stable, meta.next_utterance),
        speakers=speakers,
    )


def channel_cores(sid: str, meta: SessionMeta, points: list[ChannelPoint],
                  decoders: list[TimedDecoder], vads: list[SpeechProbs],
                  settings: TranscriberSettings) -> ChannelCores:
    """A multichannel session's cores, each resumed from its channel's commit point."""
    config = stream_config(settings, meta.interim, meta.endpointing)
    return ChannelCores([
        StreamingTranscriber(sid, decoder, vad, config, start_sample=point.commit_sample,
                             next_utterance=point.next_utterance, prompt=point.prompt,
                             stable=unpack_stable(point.stable, point.next_utterance),
                             channel=channel)
        for channel, (point, decoder, vad) in enumerate(zip(points, decoders, vads,
                                                            strict=True))],
        settings.crosstalk_db)


class Host(Protocol):
    """What the pump needs from its worker."""

    settings: TranscriberSettings
    metrics: WorkerMetrics
    inference: Inference
    policy: LoadPolicy  # load shedding
    blocking: aioredis.Redis  # XREAD BLOCK, retries=False: the pump waits outages out

    @property
    def stopping(self) -> bool: ...

    def redis_now(self) -> float: ...

    def park(self, lease: Lease) -> None: ...

    async def unpark(self, lease: Lease) -> None:
        """Take a slot back; ``HandBack`` when none is free."""


class ReadLog:
    """Where each recent audio entry ends (sample offset) and when it was appended: the
    entry a new owner resumes after, and the time-to-final of a final."""

    def __init__(self, cursor: str) -> None:
        self._recent: collections.deque[tuple[str, int]] = collections.deque(
            maxlen=READ_LOG_ENTRIES)
        self._resume_id = cursor
        # end sample → append time (ms) of recent entries
        self._appended_at: collections.OrderedDict[int, int] = collections.OrderedDict()

    def read(self, entry_id: str, end_sample: int, xadd_ms: int) -> None:
        self._recent.append((entry_id, end_sample))
        self._appended_at[end_sample] = xadd_ms
        if len(self._appended_at) > READ_LOG_ENTRIES:
            self._appended_at.popitem(last=False)

    def appended_at(self, sample: int) -> int | None:
        """Append time (ms) of the first entry that reaches ``sample``."""
        return next((ms for end, ms in self._appended_at.items() if end >= sample), None)

    def resume_point(self, commit_sample: int) -> str:
        """The last entry that ends at or before the commit point: resume reading after it."""
        while self._recent and self._recent[0][1] <= commit_sample:
            self._resume_id = self._recent.popleft()[0]
        while self._appended_at and next(iter(self._appended_at)) <= commit_sample:
            self._appended_at.popitem(last=False)
        return self._resume_id


class SessionPump:
    """Reads one session's audio stream from its cursor and publishes what the core emits."""

    def __init__(self, host: Host, lease: Lease, core: StreamingTranscriber | ChannelCores,
                 writer: SessionWriter, cursor: str, tenant: str = "",
                 model: str = keys.DEFAULT_MODEL, replay: bool = False) -> None:
        self.host = host
        #: whose usage its audio counts in, under which model; a replay's audio was not
        #: received from a client
        self.tenant = tenant or DEFAULT_TENANT
        self.model = model
        self.replay = replay
        self.usage = Usage(writer.redis, host.settings.usage_retention_days) \
            if writer is not None else None
        self._usage_at = 0.0  # monotonic time of the last usage report
        self.settings = host.settings
        self.metrics = host.metrics
        self.lease = lease
        self.sid = lease.sid
        self.core = core
        #: a multichannel session's cores (its audio interleaves ``width`` channels)
        self.channels = core if isinstance(core, ChannelCores) else None
        self.width = core.width if isinstance(core, ChannelCores) else 1
        #: each channel's commit point as published: the session resumes from the earliest
        self._committed = {getattr(c, "channel", None) or 0: getattr(c, "commit_sample", 0)
                           for c in self._cores()}
        self.writer = writer
        self.cursor = cursor
        self.log = ReadLog(cursor)
        self._park = ParkTimer(self.settings.park_after_s)
        self._finalize = FinalizePacer(self.settings.finalize_min_interval_s)
        self._read_at = self._fed_at = 0.0  # wall times of the last read and feed (timing)
        self._xadd_ms = 0  # when the gateway appended the newest entry read
        self._core_lock = asyncio.Lock()
        self._partial_task: asyncio.Task[None] | None = None  # a detached partial decode

    def _cores(self) -> list[StreamingTranscriber]:
        return self.channels.cores if self.channels is not None \
            else [self.core]  # type: ignore[list-item]

    async def run(self) -> None:
        try:
            await self._run()
        finally:
            if self._partial_task is not None:  # its words would come after the session
                self._partial_task.cancel()

    def _before_read(self) -> None:
        if self.host.stopping:  # shutting down: the session is handed to another worker
            raise asyncio.CancelledError
        self._check_partial()

    async def _run(self) -> None:
        s = self.settings
        last_audio = time.monotonic()
        errors = self.metrics.redis_errors.labels("transcriber")
        self._before_read()
        async for resp in read_stream(self.host.blocking, keys.audio(self.sid), self.cursor,
                                      block_ms=s.redis_block_ms, batch=s.read_batch,
                                      what=f"session {self.sid}: audio",
                                      on_error=lambda _exc: errors.inc()):
            if resp:
                last_audio = time.monotonic()
            elif time.monotonic() - last_audio > s.idle_timeout_s and await self._abandoned():
                log.info("session %s: no audio and no client for %.0f s; closing",
                         self.sid, s.idle_timeout_s)
                self._short_finals()
                await self._call(self.core.finish)
                await self._close(AudioMarker("close", 0, self.core.position), idle=True)
                return
            if await self._read(resp):
                return
            await self._finalize_if_due()
            await self._slot()
            if resp:
                self.metrics.lag_seconds.labels(self.sid).set(
                    max(0.0, self.host.redis_now() - self._xadd_ms / 1000.0))
            self._before_read()

    async def _read(self, entries: list[Entry]) -> bool:
        """Feed what one XREAD returned; True when it closed the session."""
        pending: list[np.ndarray] = []
        self._read_at = self.host.redis_now()
        for entry_id, fields in entries:
            self.cursor = entry_id.decode()
            self._xadd_ms = int(self.cursor.split("-", 1)[0])
            entry = unpack_audio_entry(fields)
            if isinstance(entry, AudioFrame):
                pending.append(self._new_samples(entry))
                self.log.read(self.cursor, entry.offset + entry.samples, self._xadd_ms)
                continue
            await self._feed(pending)
            pending = []
            self._short_finals()
            if entry.kind == "finalize":
                self._finalize.ask()
                await self._finalize_if_due()
            elif entry.kind == "close":
                await self._call(self.core.finish)
                await self._close(entry)
                return True
        await self._feed(pending)
        return False

    async def _finalize_if_due(self) -> None:
        """Apply a client's ``finalize`` (end the open utterance now) when the pacer allows."""
        if self._finalize.take(time.monotonic()):
            await self._call(self.core.finalize)

    async def _slot(self) -> None:
        """Park when the session has been silent long enough; take a slot again when it
        speaks (or hand it on when this worker has none free)."""
        step = self._park.step(time.monotonic(), self.core.open_utterance_start is not None,
                               self.lease.parked)
        if step is Slot.UNPARK:
            await self.host.unpark(self.lease)
        elif step is Slot.PARK:
            log.info("session %s: no speech for %.0f s; its slot is free for another session "
                     "until it speaks", self.sid, self._park.after_s)
            self.host.park(self.lease)

    async def _abandoned(self) -> bool:
        """No client heartbeat for the idle time, measured on Redis time (the gateway that
        writes the heartbeat may run on a machine whose clock disagrees with ours)."""
        silence = await with_retry(self.sid, "heartbeat check", self.writer.client_silence_ms,
                                   self.metrics)
        return silence is None or silence > self.settings.idle_timeout_s * 1000

    def _new_samples(self, frame: AudioFrame) -> np.ndarray:
        """Samples of a frame the core has not seen (a resumed session re-reads some)."""
        pcm = np.frombuffer(frame.pcm, dtype="<i2")
        skip = self.core.position - frame.offset
        return pcm[skip * self.width:] if skip > 0 else pcm

    async def _feed(self, parts: list[np.ndarray]) -> None:
        parts = [p for p in parts if len(p)]
        if not parts:
            return
        pcm = np.concatenate(parts)
        self._fed_at = self.host.redis_now()
        plan = self.host.policy.feed(self.host.inference.busy,
                                   age_s=self._fed_at - self._xadd_ms / 1000.0,
                                   partial_running=self._partial_task is not None)
        self._set_short_finals(plan.short_finals)
        if plan.shed:
            self.metrics.partials_skipped.inc()
        await self._call(self.core.feed, pcm, partials=plan.partials, speculate=plan.speculate,
                         detach=True)
        self.metrics.audio_seconds.inc(len(pcm) / RATE)
        await with_retry(self.sid, "progress", lambda: self.writer.progress(self.core.position))
        now = time.monotonic()
        if now - self._usage_at >= self.settings.usage_report_s:
            self._usage_at = now
            await self._report_usage(self.core.position)

    async def _report_usage(self, position: int, kind: str = TRANSCRIBED) -> None:
        """The session's audio transcribed (or ``kind``) up to ``position`` (samples),
        counted by position in its tenant's usage, after the fenced write that says this
        epoch still owns it (progress, close): a position counted before, by this worker,
        a failed one or the gateway, adds nothing."""
        usage = self.usage
        if usage is None:
            return
        added = await with_retry(self.sid, "usage", lambda: usage.report(
            self.tenant, self.sid, kind, self.model, position))
        if added:
            self.metrics.usage_seconds.labels(self.tenant, self.model, kind).inc(added / RATE)

    def _short_finals(self) -> None:
        """Before a final: short-context while other sessions' decodes wait."""
        self._set_short_finals(self.host.policy.short_finals(self.host.inference.busy))

    def _set_short_finals(self, short: bool) -> None:
        for core in self._cores():
            timed = core.decoder
            if isinstance(timed, TimedDecoder):
                timed.decoder.short_finals = short

    def _observe_time_to_final(self, ev: Committed) -> None:
        """Commit time minus when the audio of the final's last word reached Redis."""
        if not ev.final.text:
            return
        xadd_ms = self.log.appended_at(int(ev.final.end * RATE))
        if xadd_ms is not None:
            self.metrics.time_to_final.observe(
                max(0.0, self.host.redis_now() - xadd_ms / 1e3))
        self.metrics.finals.inc()

    async def _call(self, fn: Callable[..., list[Event]], *args: Any, **kwargs: Any) -> None:
        """One core call on an inference thread, and what it emits published, in order with
        the detached partials' (the lock keeps the core to one caller at a time)."""
        async with self._core_lock:
            if self.channels is not None:
                await self._publish(await self._call_channels(fn.__name__, *args, **kwargs))
                await self._advance_idle()
            else:
                await self._publish(await self.host.inference.run(fn, *args, **kwargs))

    async def _call_channels(self, name: str, *args: Any, **kwargs: Any) -> list[Event]:
        """A multichannel session's core call: each channel's on its own inference thread,
        at once (their decodes meet at the decode gate, and in one batch with batching on);
        what they emit merged in time order."""
        assert self.channels is not None
        run = self.host.inference.run
        if name == "feed":
            parts = self.channels.split(args[0])
            calls = [run(core.feed, part, **kwargs) for core, part
                     in zip(self.channels.cores, parts, strict=True) if len(part)]
        else:
            calls = [run(getattr(core, name)) for core in self.channels.cores]
        return self.channels.merge(list(await asyncio.gather(*calls)))

    async def _advance_idle(self) -> None:
        """Move a silent channel's stored commit point on (``IDLE_ADVANCE_SAMPLES``), so a
        channel that says nothing for long does not hold the session's resume point back."""
        for channel, core in enumerate(self._cores()):
            point = core.idle_point
            if point is None or point - self._committed[channel] < IDLE_ADVANCE_SAMPLES:
                continue
            self._committed[channel] = point
            done = min(self._committed.values())
            await with_retry(self.sid, "advance", functools.partial(
                self.writer.advance, channel, point, self.log.resume_point(done), done))

    async def _run_channel_partials(self, job: ChannelPartials) -> None:
        """Detached partial decodes of several channels, at once."""
        try:
            words = await asyncio.gather(*(self.host.inference.run(one.run)
                                           for one in job.jobs))
            async with self._core_lock:
                assert self.channels is not None
                partials = self.channels.partial_done(job, list(words))
                if partials:
                    await self._publish(list(partials))
        finally:
            self._partial_task = None

    async def _run_partial(self, job: PartialJob) -> None:
        """A detached partial decode; the session goes on reading audio meanwhile."""
        try:
            words = await self.host.inference.run(job.run)
            async with self._core_lock:
                core = self.core
                assert isinstance(core, StreamingTranscriber)  # a multichannel one: below
                partial = core.partial_done(job, words)
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

    async def _publish(self, events: list[Event] | list[Partial]) -> None:
        for ev in events:
            if isinstance(ev, ChannelPartials):
                self._partial_task = asyncio.create_task(self._run_channel_partials(ev))
            elif isinstance(ev, PartialJob):
                self._partial_task = asyncio.create_task(self._run_partial(ev))
            elif isinstance(ev, Partial):
                core = self._cores()[ev.channel or 0]
                await with_retry(self.sid, "partial", functools.partial(
                    self.writer.publish, ev, core.stable_words))
            elif isinstance(ev, Committed):
                self._observe_time_to_final(ev)
                timing = {"xadd": self._xadd_ms / 1000.0, "read": self._read_at,
                          "fed": self._fed_at, "done": self.host.redis_now(),
                          "decode": round(ev.decode_s, 4)}
                self._committed[ev.final.channel or 0] = ev.commit_sample
                done = min(self._committed.values())  # audio every channel has committed
                await with_retry(self.sid, "commit", functools.partial(
                    self.writer.commit, ev.final, ev.commit_sample, ev.next_utterance,
                    ev.prompt, self.log.resume_point(done), timing, done, ev.speakers))

    async def _close(self, marker: AudioMarker, idle: bool = False) -> None:
        closed = Closed(session_id=self.sid, utterances=self.core.utterance,
                        duration=round(marker.offset / RATE, 3))
        idle_ms = int(self.settings.idle_timeout_s * 1000) if idle else 0
        seq = await with_retry(self.sid, "close", lambda: self.writer.close(
            closed, self.settings.retention_s, idle_ms, self.cursor))
        if seq == CLIENT_BACK:
            raise HandBack("the client came back while it was closed as idle")
        await self._report_usage(marker.offset)
        if not self.replay:  # the whole stream was received: exact even when the gateway
            await self._report_usage(marker.offset, RECEIVED)  # died before its last report
