"""One /v1/listen connection: the asyncio adapter over ``ListenCore``.

The core (``listen_core.py``) decides; this adapter does the I/O: it reads the socket,
queues the core's audio entries in the session's bounded ``AudioWriter`` (the gateway's
one ``AudioFlusher`` drains them into Redis, riding out outages), and delivers the
session's results back to the socket. It gets its dependencies explicitly
(``ListenDeps``), never the gateway. The gateway's one ``SessionMonitor`` keeps the
heartbeat fresh and tells the client about queueing and lag.

What goes over the socket is spelled by a ``Wire``: how the client's text messages read
(controls) and how the session's messages are written (its start, each result, an error and
its close). ``NativeWire`` is /v1/listen's own protocol; a dialect (``ingest/dialects/``:
Deepgram's, Twilio's, OpenAI's) is another ``Wire`` over the same session machinery, so resume,
limits, auth, viewers and exports work the same for every dialect.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import Protocol

import redis.asyncio as aioredis
from aiohttp import web

from common import errors
from common.access import AccessGuard, address_bucket
from common.audio import TARGET_RATE
from common.auth import Principal
from common.backoff import REDIS_DOWN
from common.codecs import DecoderSlots
from common.delivery import ResultQueue
from common.errors import (
    Forbidden,
    QuotaExceeded,
    SessionClosed,
    SessionNotFound,
    SessionTaken,
    StorageUnavailable,
    SttError,
)
from common.messages import (
    AudioEntry,
    AudioMarker,
    Closed,
    Control,
    ErrorMessage,
    Result,
    SessionStarted,
    to_json,
)
from common.metrics import GatewayMetrics
from common.ratelimit import MessageLimits
from common.sessions import Sessions
from common.settings import GatewaySettings
from common.streams import follow_results
from common.tasks import stop_task
from common.tenants import RECEIVED, AudioQuota, Quotas, Usage, seconds_to_midnight, tenant_quotas
from common.web import Socket, SocketClosed, client_error, error_response
from ingest.limits import SessionClock
from ingest.listen_core import ListenCore, ListenLimits, ListenParams, Received, native_control
from ingest.live import LiveSessions
from ingest.monitor import SessionMonitor
from ingest.writer import AudioFlusher, AudioWriter

log = logging.getLogger(__name__)


class Wire(Protocol):
    """How one client protocol spells a listen session's messages. One per connection (a
    dialect may keep state: which utterance a ``Finalize`` ended, a hash of the audio)."""

    def inbound(self, message: str | bytes) -> str | bytes | list[str | bytes] | None:
        """A client message as the native one the core reads (a dialect that wraps audio
        in JSON, Twilio's, unwraps it here), or several; None: a message of the dialect's
        that this service has no use for (the wire bounds how many of those come)."""

    def control(self, text: str, max_bytes: int) -> Control | None:
        """A client text message as a control, or None when it is audio (base64)."""

    def opening(self, started: SessionStarted) -> list[str | bytes]:
        """What the client gets once the session is open (or resumed)."""

    def received(self, message: str | bytes, received: Received) -> None:
        """A client message the core accepted, and what it made of it."""

    def results(self, result: Result) -> list[str | bytes]:
        """A result of the session in this protocol: none, one or several messages."""

    def error(self, err: SttError) -> tuple[list[str | bytes], int, str]:
        """The messages that report ``err``, then the close code and reason."""

    # Optional: ``replies() -> list[str | bytes]``, messages that answer the client's last
    # message (sent right after ``inbound``; ``ListenSession._replies``).


class NativeWire:
    """/v1/listen's own protocol (docs/protocol.md)."""

    def inbound(self, message: str | bytes) -> str | bytes | None:
        return message

    def control(self, text: str, max_bytes: int) -> Control | None:
        return native_control(text, max_bytes)

    def opening(self, started: SessionStarted) -> list[str | bytes]:
        return [to_json(started)]

    def received(self, message: str | bytes, received: Received) -> None:
        pass

    def results(self, result: Result) -> list[str | bytes]:
        return [to_json(result)]

    def error(self, err: SttError) -> tuple[list[str | bytes], int, str]:
        return [to_json(ErrorMessage(err.code, err.message))], err.close_code, err.code


class Dialect(Protocol):
    """A listen endpoint's protocol, for the gateway: how it reads its query (the session's
    ``ListenParams`` and the connection's ``Wire``), how it refuses a request before the
    upgrade, and whether its clients can resume a session (``?session=``)."""

    path: str
    resumes: bool
    models: bool  # whether its ``model=`` selects the model (else it is accepted, ignored)

    def read(self, query: Mapping[str, list[str]]) -> tuple[ListenParams, Wire]: ...

    def plain_wire(self) -> Wire: ...

    def refused(self, exc: BaseException) -> web.Response: ...


class NativeDialect:
    """/v1/listen itself."""

    path = "/v1/listen"
    resumes = True
    models = True

    def read(self, query: Mapping[str, list[str]]) -> tuple[ListenParams, Wire]:
        return ListenParams(dict(query)), NativeWire()

    def plain_wire(self) -> Wire:
        return NativeWire()

    def refused(self, exc: BaseException) -> web.Response:
        return error_response(exc)


async def send_wire_error(ws: Socket, wire: Wire, exc: BaseException) -> None:
    """The answer to ``exc`` in ``wire``'s words: its messages, then the close with its code
    (``common.web.send_error`` for any protocol)."""
    messages, code, reason = wire.error(client_error(exc))
    with contextlib.suppress(SocketClosed):
        for message in messages:
            await ws.send(message)
        await ws.close(code, reason)


@dataclasses.dataclass(frozen=True)
class ListenDeps:
    """What a listen connection uses, shared by all of them in one gateway."""

    settings: GatewaySettings
    store: Sessions
    flusher: AudioFlusher
    blocking: aioredis.Redis  # for the blocking read of the results stream
    guard: AccessGuard
    live: LiveSessions
    monitor: SessionMonitor
    metrics: GatewayMetrics
    #: the gateway's compressed-audio decoders (threads), bounded by ``codec_max_streams``
    decoders: DecoderSlots | None = None


@contextlib.asynccontextmanager
async def clock_limit(clock: SessionClock) -> AsyncIterator[None]:
    """Raise ``TimeoutError`` in the body once ``clock.wake_at()`` has passed.

    A message only moves the clock: one timer per idle period, checked when it fires and
    set again if the clock moved. (An ``asyncio.timeout`` around each ``recv()`` was 11 %
    of the gateway's CPU at 300 sockets of 100 ms frames, measured with py-spy.)"""
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(None) as limit:
        timer: asyncio.TimerHandle | None = None

        def check() -> None:
            nonlocal timer
            now, wake = loop.time(), clock.wake_at()
            if now >= wake:
                limit.reschedule(now)
            else:
                timer = loop.call_at(wake, check)

        timer = loop.call_at(clock.wake_at(), check)
        try:
            yield
        finally:
            timer.cancel()


class ListenSession:
    """One /v1/listen connection, new or resumed.

    ``lease`` is the connection's cap lease (``AccessGuard``); its member is the session id
    (for a new session, the id admission counted). The session keeps it until the
    session's stream is closed: released once this connection appended the close marker,
    handed to the detached wait (``LiveSessions``) when the socket dropped, forgotten when
    another connection took the session over. Every session this creates ends on every
    exit path.
    """

    def __init__(self, deps: ListenDeps, ws: Socket, params: ListenParams,
                 principal: Principal, lease: str | None = None,
                 wire: Wire | None = None, resumable: bool = True) -> None:
        self.deps = deps
        #: whether its client can resume it (a dialect without resume: its stream ends as
        #: soon as its socket does, not after the resume grace)
        self.resumable = resumable
        self.wire: Wire = wire if wire is not None else NativeWire()
        self.settings = deps.settings
        self.store = deps.store
        self.ws = ws
        self.params = params
        self.lease = lease
        self.sid = params.session or deps.guard.member(lease) or uuid.uuid4().hex
        self._creating = False  # store.create was sent (the session may exist)
        self._taken = False  # a newer connection here took the session over
        self._taken_close: asyncio.Task[None] | None = None
        self._gone: asyncio.Task[None] | None = None  # the session was deleted meanwhile
        self.core = ListenCore(params, ListenLimits.from_settings(deps.settings),
                               time.monotonic(), self.wire.control, deps.decoders)
        self.generation = 0
        self.writer: AudioWriter | None = None
        self.principal = principal
        #: the model that transcribes it: the one asked for (model=, or the default), or a
        #: resumed session's own (only workers serving that name take it)
        self.model = params.model or deps.settings.model_name
        #: whose usage and quota its audio counts in (a resumed session's own)
        self.tenant = principal.tenant
        self.quota: AudioQuota | None = None  # the tenant's audio per day, when it has one
        self.usage = Usage(deps.store.redis, self.settings.usage_retention_days)
        self._usage_at = 0.0  # monotonic time of the last usage report

    @property
    def samples_sent(self) -> int:
        """Samples of the session's audio stream so far (read by the monitor)."""
        return self.core.samples_sent

    # ------------------------------------------------------------------ life cycle

    async def _fail(self, exc: BaseException) -> None:
        self.deps.metrics.rejections.labels(getattr(exc, "code", "internal_error")).inc()
        await send_wire_error(self.ws, self.wire, exc)

    async def run(self) -> None:
        try:
            resumed = await self._open()
        except SttError as exc:
            await self._release_lease()
            await self._fail(exc)
            return
        except REDIS_DOWN as exc:  # unreachable (storage_unavailable), or full (storage_full)
            await self._abandon_creation()
            await self._fail(client_error(exc))
            return
        live, metrics = self.deps.live, self.deps.metrics
        live.attached(self)
        metrics.sessions_active.inc()
        delivery: asyncio.Task[None] | None = None
        announced = False  # the client has the session id (it can resume)
        clean = False
        try:
            for message in self.wire.opening(self.core.started(self.sid, self.model, resumed)):
                await self.ws.send(message)
            announced = True
            fmt = self.params.format
            log.info("session %s: %s (%s %d Hz x%d)", self.sid,
                     "resumed" if resumed else "opened", fmt.encoding, fmt.sample_rate,
                     fmt.channels)
            (metrics.reconnects if resumed else metrics.sessions_opened).inc()
            delivery = asyncio.create_task(self._deliver(), name=f"deliver-{self.sid}")
            self.deps.monitor.watch(self)
            if self.core.ended:
                await self._drain(delivery)  # resumed after close: just deliver
                clean = True
            elif await self._receive():
                await self._drain(delivery, then=self.core.end_error)
                clean = True
        except SttError as exc:
            log.info("session %s: client error %s", self.sid, exc.code)
            with contextlib.suppress(Exception):
                await self._end_stream()
            if exc.drain and delivery is not None:  # a limit: deliver what was said, then it
                await self._drain(delivery, then=exc)
            else:
                await self._fail(exc)
            clean = True
        except SocketClosed:
            pass
        except Exception as exc:
            log.exception("session %s: internal error", self.sid)
            await self._fail(exc)
        finally:
            self.core.close()
            metrics.sessions_active.dec()  # the socket is closed: the rest is bookkeeping
            if delivery is not None:
                self.deps.monitor.unwatch(self)
                await stop_task(delivery)
            await self._settle(clean, known=announced or resumed)
            with contextlib.suppress(Exception):
                await self._report_usage(last=True)
            if self.quota is not None:
                with contextlib.suppress(Exception):
                    await self.quota.give_back()
            log.info("session %s: socket done (%d samples)", self.sid, self.samples_sent)

    def taken(self) -> None:
        """A newer connection on this gateway resumed this session: this one can no longer
        append; tell its client and end (the newer one holds the cap member)."""
        if self._taken:
            return
        self._taken = True
        self._taken_close = asyncio.create_task(send_wire_error(self.ws, self.wire, SessionTaken(
            "the session was resumed on another connection")))

    def gone(self) -> None:
        """The session was deleted (``DELETE /v1/sessions/{id}``) while this socket was open
        (the monitor found no record): tell the client and end; nothing is left to resume."""
        if self._taken or self._gone is not None:
            return
        self._gone = asyncio.create_task(self._fail(SessionNotFound(
            "the session was deleted")))

    async def _settle(self, clean: bool, known: bool) -> None:
        """The socket is done: the session's stream ends now, or after the resume grace when
        the client (which has the session id: ``known``) may come back for it."""
        live, guard = self.deps.live, self.deps.guard
        live.unattached(self)
        if self._gone is not None:
            if self.writer is not None:
                await self.writer.close()
            await self._release_lease()
            return
        if self._taken:
            if self.writer is not None:
                await self.writer.close()
            lease, self.lease = self.lease, None
            if lease is not None:
                guard.forget(lease)
            return
        if not clean and not self.core.ended:
            if known and self.resumable and not live.stopping:
                lease, self.lease = self.lease, None
                live.detach_later(self.sid, self.generation, self.core.samples_sent,
                                  self.core.entry_seq, self.writer, lease)
                return
            if not known or not self.resumable:
                # The 'session' message never went out, or the protocol has no resume:
                # nobody can resume this session, so its close marker goes in now, not
                # after the grace.
                log.info("session %s: the client left %s; closing it", self.sid,
                         "(its protocol has no resume)" if known
                         else "before it got the session id")
                with contextlib.suppress(Exception):
                    await self._end_stream()
            # else a stopping gateway: the client may resume elsewhere (1012)
        stored = await self._close_writer() if self.writer is not None else True
        lease, self.lease = self.lease, None
        if lease is None:
            return
        ended = self.writer is not None and isinstance(self.writer.failure, SessionClosed)
        if (self.core.ended and stored) or ended:  # the stream is over: nobody counts it
            await guard.release(lease, session_closed=True)
        else:
            # Another connection took the session over (it holds the member), or its
            # close marker could not be stored / a stopping gateway left it to be resumed
            # elsewhere: the member's lease runs out unless a live holder renews it.
            guard.forget(lease)

    async def _release_lease(self) -> None:
        """No session was created or attached here: give back what admission counted."""
        lease, self.lease = self.lease, None
        if lease is not None:
            await self.deps.guard.release(lease)

    async def _abandon_creation(self) -> None:
        """Redis failed while opening. A creation whose reply was lost may have made the
        session: try to close its stream too (it has no entries yet)."""
        if not self._creating or self.params.session is not None:
            await self._release_lease()
            return
        guard = self.deps.guard
        try:
            marker = AudioMarker("close", 1, 0)
            written = await self.store.append(self.sid, 1, [marker])
        except REDIS_DOWN:
            lease, self.lease = self.lease, None
            if lease is not None:
                guard.forget(lease)  # unknown: let its lease run out
            return
        if written:
            log.info("session %s: created though Redis failed; closed it", self.sid)
        lease, self.lease = self.lease, None
        if lease is not None:  # closed now, or it never existed
            await guard.release(lease, session_closed=True)

    async def _close_writer(self) -> bool:
        """Stop the writer; True when everything queued was stored."""
        assert self.writer is not None
        stored = False
        try:
            await asyncio.wait_for(self.writer.drain(), self.settings.outage_buffer_s)
            stored = True
        except Exception:
            pass
        await self.writer.close()
        return stored

    def _check_channels(self) -> None:
        """A multichannel stream within ``max_channels``."""
        fmt = self.params.format
        if fmt.multichannel and fmt.channels > self.settings.max_channels:
            raise errors.UnsupportedAudio(
                f"multichannel=true takes 2 to {self.settings.max_channels} channels "
                f"(MAX_CHANNELS); this stream has {fmt.channels}")
        if fmt.multichannel and self.params.diarize and self.params.session is None:
            raise errors.BadRequest(
                "diarize=true and multichannel=true cannot be combined: each channel is "
                "transcribed apart and its results name it (channel)")

    async def _open(self) -> bool:
        """Create the session, or attach to the one named in ``session``."""
        self._check_channels()
        if self.params.session is None:
            if await self.store.backlog(self.model) >= self.settings.max_backlog:
                raise errors.Overloaded("all transcribers are busy; try again later")
            longest = self.settings.max_session_s
            if self.principal.max_session_s is not None:
                longest = min(longest, self.principal.max_session_s)
            deadline = time.time() + longest
            self._creating = True
            self.generation = await self.store.create(self.sid, {
                "encoding": self.params.format.encoding,
                "sample_rate": self.params.format.sample_rate,
                "channels": self.params.format.channels,
                "multichannel": "1" if self.params.format.multichannel else "0",
                "language": self.params.language,
                "interim": "1" if self.params.interim_results else "0",
                "keyterms": json.dumps(list(self.params.keyterms)),
                "user_prompt": self.params.prompt,
                "diarize": "1" if self.params.diarize else "0",
                "endpointing": self.params.endpointing,
                "model": self.model,
                "principal": self.principal.owner,
                "account": self.principal.account,
                "tenant": self.principal.tenant,
                # whose share of transcriber slots it counts in when it has no API key
                "address": address_bucket(self.deps.guard.request_ip(self.ws.request)),
                "deadline": f"{deadline:.3f}",
            })
            resumed = False
        else:
            access = await self.store.access(self.sid)
            if not self.principal.sees(access.tenant):  # as if it did not exist
                raise SessionNotFound()
            if not self.principal.may_write(access.owner, access.account):
                raise Forbidden("this session belongs to someone else")
            deadline = access.deadline if access.deadline is not None \
                else access.created + self.settings.max_session_s
            fmt, stored = self.params.format, await self.store.meta(self.sid)
            if stored.multichannel != fmt.multichannel or (
                    fmt.multichannel and stored.channels != fmt.channels):
                raise errors.UnsupportedAudio(
                    "a resumed session keeps its channels: send multichannel and channels "
                    "as when it was opened")
            attached = await self.store.attach(self.sid)
            self.tenant = access.tenant
            self.generation = attached.generation
            self.model = attached.meta.model or self.model
            self.core.resume(attached.samples, attached.entry_seq, attached.ended)
            resumed = True
        self.core.set_deadline(time.monotonic() + (deadline - time.time()))
        quotas = await tenant_quotas(self.store.redis, self.tenant, Quotas(
            self.settings.tenant_max_sessions, self.settings.tenant_audio_hours_per_day))
        if quotas.audio_hours_per_day > 0:
            self.quota = AudioQuota(self.store.redis, self.tenant,
                                    round(quotas.audio_hours_per_day * 3600 * TARGET_RATE),
                                    round(self.settings.quota_grant_s * TARGET_RATE))
        self.writer = AudioWriter(self.deps.flusher, self.sid, self.generation,
                                  int(self.settings.outage_buffer_s * TARGET_RATE),
                                  self.settings.storage_full_grace_s)
        self.writer.on_redis_error = self.deps.metrics.redis_errors.labels("gateway").inc
        return resumed

    # ------------------------------------------------------------------ audio in

    async def _put(self, entries: list[AudioEntry], seconds: float) -> None:
        assert self.writer is not None
        for entry in entries:
            await self.writer.put(entry, self.settings.outage_buffer_s)
        if seconds:
            self.deps.metrics.audio_seconds.inc(seconds)

    async def _end_stream(self) -> None:
        before = self.core.samples_sent
        entries = self.core.end(time.monotonic())
        await self._put(entries, (self.core.samples_sent - before) / TARGET_RATE)

    async def _receive(self) -> bool:
        """Audio and control messages until 'close' (True) or the socket ends (False).

        Waiting ends at the session's deadline or after the idle timeout (an error that
        drains the session); what the core refuses (too big, too many, too fast) is raised
        as its error.
        """
        try:
            async with clock_limit(self.core.clock):
                while True:
                    try:
                        message = await self.ws.recv()
                    except SocketClosed:
                        return False
                    native = self.wire.inbound(message)
                    await self._replies()
                    if native is None:
                        continue
                    for one in native if isinstance(native, list) else (native,):
                        received = self.core.receive(one, time.monotonic())
                        self.wire.received(message, received)
                        fits = await self._take_quota(received.seconds)
                        await self._put(received.entries, received.seconds)
                        await self._report_usage()
                        if not fits:  # this message is stored: a session ends within one
                            raise QuotaExceeded("this tenant's audio for the day is spent",
                                                seconds_to_midnight(time.time()))
                        if received.closed:
                            return True
        except TimeoutError:
            raise self.core.expired(time.monotonic()) from None

    async def _take_quota(self, seconds: float) -> bool:
        """Whether this much audio fits in its tenant's audio for the day. The message that
        does not fit is still stored (its entries are numbered already), then the session
        ends with QuotaExceeded, which drains it: its finals, then the error."""
        if self.quota is None or seconds <= 0:
            return True
        return await self.quota.take(round(seconds * TARGET_RATE))

    async def _report_usage(self, last: bool = False) -> None:
        """The session's audio received so far, counted in its tenant's usage by position
        (every ``usage_report_s``, and ``last`` as its socket ends)."""
        now = time.monotonic()
        if not last and now - self._usage_at < self.settings.usage_report_s:
            return
        self._usage_at = now
        try:
            added = await self.usage.report(self.tenant, self.sid, RECEIVED, self.model,
                                            self.core.samples_sent)
        except REDIS_DOWN as exc:  # the next report counts it
            log.warning("session %s: usage report failed: %r", self.sid, exc)
            return
        if added:
            self.deps.metrics.usage_seconds.labels(self.tenant, self.model, RECEIVED).inc(
                added / TARGET_RATE)

    async def _replies(self) -> None:
        """What the wire answers the client's last message with, if it answers any (a
        wire may have ``replies()``: OpenAI's acknowledgements and non-fatal errors)."""
        replies = getattr(self.wire, "replies", None)
        if replies is not None:
            for reply in replies():
                await self.ws.send(reply)

    # ------------------------------------------------------------------ results out

    async def _drain(self, delivery: asyncio.Task[None], then: SttError | None = None) -> None:
        """After 'close': wait until every final and 'closed' went out, then close 1000
        (or, when a limit ended the session, send that error and its close code). The
        socket is read meanwhile, and what comes ignored, so the client's pings are
        answered however long the last finals take; the reading stops before the close,
        which then reads on to the client's close frame."""
        reading = asyncio.create_task(self._ignore_messages(), name=f"drain-read-{self.sid}")
        try:
            failure = await self._delivered(delivery)
        finally:
            await stop_task(reading)
        if failure is None and then is not None:
            failure = then
        if failure is not None:
            await self._fail(failure)
            return
        await self.ws.close(errors.NORMAL, "closed")

    async def _ignore_messages(self) -> None:
        """Read and drop what the client sends after its stream ended, within its message
        rate: past it the socket is no longer read (TCP pushes back, as it would have)."""
        limits = MessageLimits(0, self.settings.max_messages_per_s,
                               self.settings.messages_burst, time.monotonic())
        with contextlib.suppress(SttError):
            async for message in self.ws:
                limits.check(message, time.monotonic())

    async def _delivered(self, delivery: asyncio.Task[None]) -> SttError | None:
        """Wait for the close marker to be stored, then for every result to go out; the
        error that ends the session instead, if one does."""
        assert self.writer is not None
        try:
            # the close marker stored first: a connection another one took the session from
            # learns it here (session_taken) instead of waiting for a 'closed' never coming
            await asyncio.wait_for(self.writer.drain(), self.settings.outage_buffer_s)
        except SessionClosed:
            pass  # its transcriber closed it already: 'closed' is on its way
        except SttError as exc:
            return exc
        except TimeoutError:
            return StorageUnavailable()
        try:
            await asyncio.wait_for(asyncio.shield(delivery), self.settings.close_drain_timeout_s)
        except TimeoutError:
            log.warning("session %s: drain timed out", self.sid)
            return SttError("transcription did not finish in time")
        return None

    async def _deliver(self) -> None:
        """Results to the socket through a bounded ``ResultQueue``: a client that stops
        reading is dropped (``too_slow``, 1013; it may resume with ``after``) instead of
        piling up."""
        queue = ResultQueue(self.settings.send_queue,
                            resume_hint="reconnect with session and after")

        async def send() -> None:
            while True:
                result = await queue.get()
                for message in self.wire.results(result):
                    await self.ws.send(message)
                if isinstance(result, Closed):
                    return

        sender = asyncio.create_task(send(), name=f"send-{self.sid}")
        try:
            async for _id, result in follow_results(
                    self.deps.blocking, self.sid, "0-0", self.settings.results_block_ms):
                if not self.core.wants(result):
                    continue
                self._observe(result)
                queue.offer(result)
                if queue.failed.done():
                    log.warning("session %s: client not reading; dropping it", self.sid)
                    sender.cancel()
                    await self._fail(queue.failed.result())
                    return
                if isinstance(result, Closed):
                    break
            await sender
        finally:
            sender.cancel()

    def _observe(self, result: Result) -> None:
        """Count what goes out; for finals, time since their last word's audio arrived."""
        metrics = self.deps.metrics
        metrics.results_sent.labels(result.TYPE).inc()
        delay = self.core.final_delay(result, time.monotonic())
        if delay is not None:
            metrics.time_to_final.observe(delay)
