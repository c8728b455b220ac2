"""One /v1/listen connection: receive audio, write it to Redis, deliver results back.

Per connection: the receive loop (normalise, queue the audio in the session's
bounded ``AudioWriter``, which the gateway's one ``AudioFlusher`` drains into
Redis, riding out outages with backoff) and delivery (follows the results
stream to the socket). The gateway's one ``SessionMonitor`` keeps the heartbeat
fresh and tells the client about queueing and lag.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed, ConnectionClosedOK

from common import errors
from common.access import address_bucket
from common.audio import TARGET_RATE, AudioNormalizer, StreamFormat, parse_stream_format
from common.auth import Principal
from common.errors import (
    BadRequest,
    Forbidden,
    MessageTooBig,
    SessionClosed,
    SessionTaken,
    StorageUnavailable,
    SttError,
    TooSlow,
)
from common.messages import (
    AudioEntry,
    AudioFrame,
    AudioMarker,
    Closed,
    ErrorMessage,
    Final,
    Result,
    SessionStarted,
    parse_control,
    to_json,
)
from common.ratelimit import MessageLimits
from common.redis_client import REDIS_DOWN
from common.tasks import stop_task
from fanout.follow import follow_results
from ingest.limits import AudioRate, SessionClock
from ingest.store import SessionStore
from ingest.writer import AudioWriter

if TYPE_CHECKING:
    from ingest.gateway import Gateway

log = logging.getLogger(__name__)


def _bool_param(value: str | None, default: bool) -> bool:
    if value is None:
        return default
    low = value.lower()
    if low in ("true", "1", "yes"):
        return True
    if low in ("false", "0", "no"):
        return False
    raise BadRequest("interim_results must be true or false")


def _one(query: dict[str, list[str]], name: str) -> str | None:
    values = query.get(name)
    return values[-1] if values else None


def session_id_ok(value: str) -> bool:
    return len(value) == 32 and all(c in "0123456789abcdef" for c in value)


def resume_target(query: dict[str, list[str]]) -> str | None:
    """For admission, before the upgrade: the session a /v1/listen query resumes (None: it
    opens a new one), read as ``ListenParams`` reads it (parsed with blank values kept). A
    malformed id is refused after the upgrade; it is still a resume, never a new session."""
    return _one(query, "session")


class ListenParams:
    """The validated query string of /v1/listen."""

    def __init__(self, query: dict[str, list[str]]) -> None:
        def one(name: str) -> str | None:
            return _one(query, name)

        self.format: StreamFormat = parse_stream_format(
            one("encoding"), one("sample_rate"), one("channels"))
        language = one("language") or ""
        if len(language) > 8 or not all(c.isalpha() or c == "-" for c in language):
            raise BadRequest("language must be an ISO code or 'auto'")
        self.language = language
        self.interim_results = _bool_param(one("interim_results"), True)
        self.session = resume_target(query)
        if self.session is not None and not session_id_ok(self.session):
            raise BadRequest("session must be a session id from a 'session' message")
        after = one("after")
        if after is not None and self.session is None:
            raise BadRequest("'after' needs 'session'")
        try:
            self.after = int(after) if after is not None else 0
        except ValueError:
            raise BadRequest("after must be an integer seq") from None
        if self.after < 0:
            raise BadRequest("after must be an integer seq")


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


async def send_error(ws: ServerConnection, exc: SttError) -> None:
    """Tell the client what went wrong (no internals), then close with the matching code."""
    with contextlib.suppress(ConnectionClosed):
        await ws.send(to_json(ErrorMessage(exc.code, exc.message)))
        await ws.close(exc.close_code, exc.code)


class ListenSession:
    """One /v1/listen connection, new or resumed.

    ``lease`` is the connection's cap lease (``AccessGuard``); its member is the session id
    (for a new session, the id admission counted). The session keeps it until the
    session's stream is closed: released once this connection appended the close marker,
    handed to the gateway's detached wait when the socket dropped, forgotten when another
    connection took the session over. Every session this creates ends on every exit path.
    """

    def __init__(self, gateway: Gateway, ws: ServerConnection, params: ListenParams,
                 principal: Principal, lease: str | None = None) -> None:
        self.gateway = gateway
        self.settings = gateway.settings
        self.store: SessionStore = gateway.store
        self.ws = ws
        self.params = params
        self.lease = lease
        self.sid = params.session or gateway.guard.member(lease) or uuid.uuid4().hex
        self._creating = False  # store.create was sent (the session may exist)
        self._taken = False  # a newer connection here took the session over
        self._taken_close: asyncio.Task[None] | None = None
        self.normalizer = AudioNormalizer(params.format)
        self.samples_sent = 0
        self.entry_seq = 0
        self.generation = 0
        self.writer: AudioWriter | None = None
        self._ended = False  # the close marker is queued
        self._max_samples = int(self.settings.max_frame_seconds * TARGET_RATE)
        self._sent_at: collections.deque[tuple[int, float]] = collections.deque(maxlen=4096)
        self.principal = principal
        now = time.monotonic()
        self.rate = AudioRate(self.settings.max_audio_speed, self.settings.audio_burst_s, now)
        self.inbound = MessageLimits(self.settings.max_message_bytes,
                                     self.settings.max_messages_per_s,
                                     self.settings.messages_burst, now)
        self.clock = SessionClock(now + self.settings.max_session_s,
                                  self.settings.client_idle_timeout_s, now)

    # ------------------------------------------------------------------ life cycle

    async def _fail(self, exc: SttError) -> None:
        self.gateway.metrics.rejections.labels(exc.code).inc()
        await send_error(self.ws, exc)

    async def run(self) -> None:
        try:
            resumed = await self._open()
        except SttError as exc:
            await self._release_lease()
            await self._fail(exc)
            return
        except REDIS_DOWN:
            await self._abandon_creation()
            await self._fail(StorageUnavailable("storage unavailable; try again later"))
            return
        self.gateway.attached(self)
        metrics = self.gateway.metrics
        metrics.sessions_active.inc()
        delivery: asyncio.Task[None] | None = None
        announced = False  # the client has the session id (it can resume)
        clean = False
        try:
            await self.ws.send(to_json(SessionStarted(
                session_id=self.sid,
                model=self.settings.model_name,
                sample_rate=self.params.format.sample_rate,
                encoding=self.params.format.encoding,
                channels=self.params.format.channels,
                language=self.params.language or "en",
                interim_results=self.params.interim_results,
                resumed=resumed,
                stored_samples=self.samples_sent,  # resend from here what never arrived
            )))
            announced = True
            log.info("session %s: %s (%s %d Hz x%d)", self.sid,
                     "resumed" if resumed else "opened", self.params.format.encoding,
                     self.params.format.sample_rate, self.params.format.channels)
            (metrics.reconnects if resumed else metrics.sessions_opened).inc()
            delivery = asyncio.create_task(self._deliver(), name=f"deliver-{self.sid}")
            self.gateway.monitor.watch(self)
            if self._ended:
                await self._drain(delivery)  # resumed after close: just deliver
                clean = True
            elif await self._receive():
                await self._drain(delivery)
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
        except ConnectionClosed:
            pass
        except Exception:
            log.exception("session %s: internal error", self.sid)
            await self._fail(SttError("internal error"))
        finally:
            metrics.sessions_active.dec()  # the socket is closed: the rest is bookkeeping
            if delivery is not None:
                self.gateway.monitor.unwatch(self)
                await stop_task(delivery)
            await self._settle(clean, known=announced or resumed)
            log.info("session %s: socket done (%d samples)", self.sid, self.samples_sent)

    def taken(self) -> None:
        """A newer connection on this gateway resumed this session: this one can no longer
        append; tell its client and end (the newer one holds the cap member)."""
        if self._taken:
            return
        self._taken = True
        self._taken_close = asyncio.create_task(send_error(self.ws, SessionTaken(
            "the session was resumed on another connection")))

    async def _settle(self, clean: bool, known: bool) -> None:
        """The socket is done: the session's stream ends now, or after the resume grace when
        the client (which has the session id: ``known``) may come back for it."""
        self.gateway.unattached(self)
        if self._taken:
            if self.writer is not None:
                await self.writer.close()
            lease, self.lease = self.lease, None
            if lease is not None:
                self.gateway.guard.forget(lease)
            return
        if not clean and not self._ended:
            if known and not self.gateway.stopping:
                lease, self.lease = self.lease, None
                self.gateway.detach_later(self.sid, self.generation, self.samples_sent,
                                          self.entry_seq, self.writer, lease)
                return
            if not known:
                # The 'session' message never went out: nobody can resume this session,
                # so its close marker goes in now, not after the grace.
                log.info("session %s: the client left before it got the session id; "
                         "closing it", self.sid)
                with contextlib.suppress(Exception):
                    await self._end_stream()
            # else a stopping gateway: the client may resume elsewhere (1012)
        stored = await self._close_writer() if self.writer is not None else True
        lease, self.lease = self.lease, None
        if lease is None:
            return
        ended = self.writer is not None and isinstance(self.writer.failure, SessionClosed)
        if (self._ended and stored) or ended:  # the stream is over: nobody counts it any more
            await self.gateway.guard.release(lease, session_closed=True)
        else:
            # Another connection took the session over (it holds the member), or its
            # close marker could not be stored / a stopping gateway left it to be resumed
            # elsewhere: the member's lease runs out unless a live holder renews it.
            self.gateway.guard.forget(lease)

    async def _release_lease(self) -> None:
        """No session was created or attached here: give back what admission counted."""
        lease, self.lease = self.lease, None
        if lease is not None:
            await self.gateway.guard.release(lease)

    async def _abandon_creation(self) -> None:
        """Redis failed while opening. A creation whose reply was lost may have made the
        session: try to close its stream too (it has no entries yet)."""
        if not self._creating or self.params.session is not None:
            await self._release_lease()
            return
        try:
            marker = AudioMarker("close", 1, 0)
            written = await self.store.append(self.sid, 1, [marker])
        except REDIS_DOWN:
            lease, self.lease = self.lease, None
            if lease is not None:
                self.gateway.guard.forget(lease)  # unknown: let its lease run out
            return
        if written:
            log.info("session %s: created though Redis failed; closed it", self.sid)
        lease, self.lease = self.lease, None
        if lease is not None:  # closed now, or it never existed
            await self.gateway.guard.release(lease, session_closed=True)

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

    async def _open(self) -> bool:
        """Create the session, or attach to the one named in ``session``."""
        if self.params.session is None:
            if await self.store.backlog() >= self.settings.max_backlog:
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
                "language": self.params.language,
                "interim": "1" if self.params.interim_results else "0",
                "model": self.settings.model_name,
                "principal": self.principal.owner,
                "account": self.principal.account,
                # whose share of transcriber slots it counts in when it has no API key
                "address": address_bucket(
                    self.gateway.guard.request_ip(self.ws, self.ws.request))
                if self.ws.request is not None else "",
                "deadline": f"{deadline:.3f}",
            })
            resumed = False
        else:
            access = await self.store.access(self.sid)
            if not self.principal.may_write(access.owner, access.account):
                raise Forbidden("this session belongs to someone else")
            deadline = access.deadline if access.deadline is not None \
                else access.created + self.settings.max_session_s
            attached = await self.store.attach(self.sid)
            self.generation = attached.generation
            self.samples_sent = attached.samples
            self.entry_seq = attached.entry_seq
            self._ended = attached.ended
            resumed = True
        self.clock.deadline = time.monotonic() + (deadline - time.time())
        self.writer = AudioWriter(self.gateway.flusher, self.sid, self.generation,
                                  int(self.settings.outage_buffer_s * TARGET_RATE))
        redis_errors = self.gateway.metrics.redis_errors.labels("gateway")
        self.writer.on_redis_error = redis_errors.inc
        return resumed

    # ------------------------------------------------------------------ audio in

    async def _put(self, entry: AudioEntry) -> None:
        assert self.writer is not None
        await self.writer.put(entry, self.settings.outage_buffer_s)

    async def _append_samples(self, pcm: Any) -> None:
        if len(pcm) == 0:
            return
        if len(pcm) > self._max_samples:
            raise MessageTooBig(
                f"one message may carry at most {self.settings.max_frame_seconds:g} s of audio")
        self.entry_seq += 1
        await self._put(AudioFrame(self.entry_seq, self.samples_sent, pcm.tobytes()))
        self.samples_sent += len(pcm)
        self._sent_at.append((self.samples_sent, time.monotonic()))
        self.gateway.metrics.audio_seconds.inc(len(pcm) / TARGET_RATE)

    async def _marker(self, kind: str) -> None:
        self.entry_seq += 1
        await self._put(AudioMarker(kind, self.entry_seq, self.samples_sent))  # type: ignore[arg-type]

    async def _end_stream(self) -> None:
        if self._ended:
            return
        self._ended = True
        await self._append_samples(self.normalizer.flush())
        await self._marker("close")

    async def _receive(self) -> bool:
        """Audio and control messages until 'close' (True) or the socket ends (False).

        Waiting ends at the session's deadline or after the idle timeout (an error that
        drains the session); a message over ``max_message_bytes`` (``message_too_big``),
        beyond the message rate (``too_many_messages``) or audio beyond the allowed speed
        (``too_fast``) is refused.
        """
        try:
            async with clock_limit(self.clock):
                return await self._messages()
        except TimeoutError:
            raise self.clock.expired(time.monotonic()) from None

    async def _messages(self) -> bool:
        while True:
            try:
                message = await self.ws.recv()
            except ConnectionClosedOK:
                return False
            now = time.monotonic()
            self.inbound.check(message, now)
            self.clock.touch(now)
            if isinstance(message, bytes):
                await self._audio(self.normalizer.feed(message), now)
                continue
            if message[:1] == "{" or message.lstrip().startswith("{"):
                control = parse_control(message, self.settings.max_control_bytes)
                if control.type == "finalize":
                    await self._marker("finalize")
                elif control.type == "close":
                    await self._end_stream()
                    return True
                continue
            await self._audio(self.normalizer.feed_text(message), now)

    async def _audio(self, pcm: Any, now: float) -> None:
        if len(pcm) > self._max_samples:
            raise MessageTooBig(
                f"one message may carry at most {self.settings.max_frame_seconds:g} s of audio")
        self.rate.take(len(pcm) / TARGET_RATE, now)
        await self._append_samples(pcm)

    # ------------------------------------------------------------------ results out

    async def _drain(self, delivery: asyncio.Task[None], then: SttError | None = None) -> None:
        """After 'close': wait until every final and 'closed' went out, then close 1000
        (or, when a limit ended the session, send that error and its close code)."""
        assert self.writer is not None
        try:
            # the close marker stored first: a connection another one took the session from
            # learns it here (session_taken) instead of waiting for a 'closed' never coming
            await asyncio.wait_for(self.writer.drain(), self.settings.outage_buffer_s)
        except SessionClosed:
            pass  # its transcriber closed it already: 'closed' is on its way
        except SttError as exc:
            await self._fail(exc)
            return
        except TimeoutError:
            await self._fail(StorageUnavailable("storage unavailable; try again later"))
            return
        try:
            await asyncio.wait_for(asyncio.shield(delivery), self.settings.close_drain_timeout_s)
        except TimeoutError:
            log.warning("session %s: drain timed out", self.sid)
            await self._fail(SttError("transcription did not finish in time"))
            return
        if then is not None:
            await self._fail(then)
            return
        await self.ws.close(errors.NORMAL, "closed")

    async def _deliver(self) -> None:
        """Results to the socket through a bounded queue: a client that stops reading is
        dropped (``too_slow``, 1013; it may resume with ``after``) instead of piling up."""
        queue: asyncio.Queue[str | None] = asyncio.Queue(self.settings.send_queue)

        async def send() -> None:
            while (text := await queue.get()) is not None:
                await self.ws.send(text)

        sender = asyncio.create_task(send())
        try:
            async for _id, result in follow_results(
                    self.gateway.blocking, self.sid, "0-0", self.settings.results_block_ms):
                if result.seq <= self.params.after:
                    continue
                self._observe(result)
                try:
                    queue.put_nowait(to_json(result))
                except asyncio.QueueFull:
                    log.warning("session %s: client not reading; dropping it", self.sid)
                    sender.cancel()
                    await self._fail(TooSlow(
                        "results were not read in time; reconnect with session and after"))
                    return
                if isinstance(result, Closed):
                    break
            await queue.put(None)
            await sender
        finally:
            sender.cancel()

    def _observe(self, result: Result) -> None:
        """Count what goes out; for finals, time since their last word's audio arrived."""
        metrics = self.gateway.metrics
        metrics.results_sent.labels(result.TYPE).inc()
        if isinstance(result, Final) and result.text:
            end = int(result.end * TARGET_RATE)
            for received, at in self._sent_at:
                if received >= end:
                    metrics.time_to_final.observe(time.monotonic() - at)
                    break
