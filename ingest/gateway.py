"""The gateway: its routes (an aiohttp ``Application``, HTTP and WebSocket on one port, served
under ``common/serving.py``'s per-connection checks), static files, health, tokens, and the
listen sockets.

A listen socket is served by ``listen.py`` (the asyncio adapter over the I/O-free
``listen_core.py``), given its dependencies as ``ListenDeps``; ``live.py`` keeps this
gateway's live and detached sessions. The recorded-sessions API (``/v1/sessions...``:
viewers, replays, listing, exports) is fanout's ``SessionsApi``, the same code
``python -m fanout`` serves: the one thing ingest uses from fanout (with
``fanout.formats``' subtitles, for the OpenAI dialect's uploads). Every ``/v1``
request passes ``AccessGuard`` (request rates, Origin, credentials, method, session caps)
before an upgrade; ``GET`` or ``POST /v1/token`` mints session tokens and ``POST
/v1/token/revoke`` revokes an unused one.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import http
import logging
import mimetypes
import time
import uuid
from collections.abc import Awaitable, Callable
from importlib import resources

from aiohttp import web

from common import errors
from common.access import AccessGuard, Admission, address_bucket, check_single_headers
from common.auth import Principal
from common.backoff import REDIS_DOWN
from common.codecs import DecoderSlots
from common.errors import (
    BadRequest,
    Forbidden,
    NotConfigured,
    NotFound,
    SttError,
    TokenUsed,
    Unauthorized,
    WebSocketRequired,
)
from common.metrics import gateway_metrics, health_routes, redis_ready, register_viewer_gauges
from common.ratelimit import MessageLimits
from common.redis_client import make_redis
from common.serving import Served, serve
from common.sessions import Sessions
from common.settings import GatewaySettings
from common.storage import Retention, StorageWatch
from common.streams import AudioAppender
from common.web import (
    OpenSockets,
    Socket,
    SocketClosed,
    accept,
    client_error,
    error_response,
    float_param,
    json_response,
    one,
    target,
    wants_websocket,
)
from fanout.api import AUDIT_PATH, MODELS_PATH, PREFIX, USAGE_PATH, SessionsApi
from ingest.dialects import openai, twilio
from ingest.dialects.deepgram import DeepgramDialect
from ingest.listen import Dialect, ListenDeps, ListenSession, NativeDialect, send_wire_error
from ingest.listen_core import resume_target, session_id_ok
from ingest.live import LiveSessions
from ingest.monitor import SessionMonitor
from ingest.writer import AudioFlusher

log = logging.getLogger(__name__)

LISTEN_PATH = NativeDialect.path
TOKEN_PATH = "/v1/token"
REVOKE_PATH = "/v1/token/revoke"
#: The header carrying the token to revoke (a header stays out of URLs and access logs).
REVOKE_HEADER = "X-Session-Token"


web_handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def not_found() -> web.Response:
    """What any path the gateway does not serve gets (the sessions API answers its own
    unknown paths in JSON, after admission)."""
    return web.Response(status=404, text="not found\n", content_type="text/plain",
                        charset="utf-8")


class Gateway:
    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.redis = make_redis(settings)
        # results and hub reads wait out outages themselves (read_stream): no client retries
        # (from replicas when writes wait for them: a client sees only what a failover keeps)
        self.blocking = make_redis(settings, blocking=True, block_ms=settings.results_block_ms,
                                   retries=False,
                                   replica_reads=settings.redis_replica_acks > 0)
        acks = (settings.redis_replica_acks, settings.redis_replica_ack_timeout_ms)
        self.store = Sessions(self.redis, settings.append_batch, *acks)
        # client audio: a client with no per-reply timer; each round trip is bounded instead,
        # and the flusher retries a failed one itself
        self.appends = make_redis(settings, read_timeout=False, retries=False)
        self.flusher = AudioFlusher(AudioAppender(self.appends, settings.append_batch,
                                                  settings.redis_socket_timeout_s, *acks),
                                    settings.append_batch)
        self.probe = make_redis(settings, probe=True)
        self.metrics = gateway_metrics()
        self.sessions_api = SessionsApi.with_replays(settings, self.redis, self.blocking)
        #: the worker registry's view: who serves which model (common/models.py)
        self.models = self.sessions_api.models
        self.monitor = SessionMonitor(self.store, settings.heartbeat_s, settings.lag_warning_s,
                                      self.metrics.redis_errors.labels("gateway").inc,
                                      models=self.models, metrics=self.metrics)
        register_viewer_gauges(self.metrics.registry, lambda: len(self.sessions_api.hubs),
                               self.sessions_api.hubs.viewer_count)
        self.guard = AccessGuard(settings, self.redis,
                                 lease_s=max(30.0, 4 * settings.heartbeat_s))
        self._caps = (settings.max_sessions_per_ip, settings.max_sessions_per_key)
        self.served: Served | None = None
        self._renewer: asyncio.Task[None] | None = None
        self.live = LiveSessions(settings, self.store, self.guard)
        self.listen_deps = ListenDeps(settings, self.store, self.flusher, self.blocking,
                                      self.guard, self.live, self.monitor, self.metrics,
                                      DecoderSlots(settings.codec_max_streams))
        self.sockets = OpenSockets()  # open WebSockets (closed with 1012 at a stop)
        self.storage = StorageWatch(self.probe, settings.storage_high_watermark,
                                    settings.storage_check_s, settings.storage_retry_after_s)
        self.storage.register_gauges(self.metrics.registry)
        self.retention = Retention(self.store, self.storage, settings.retention_max_bytes,
                                   self.metrics.registry)
        self._retention_task: asyncio.Task[None] | None = None
        #: The listen endpoints: /v1/listen and the client protocols it also speaks
        self.dialects: list[Dialect] = [NativeDialect(), DeepgramDialect(settings.model_name)]
        self.openai = openai.RealtimeDialect()

    # ------------------------------------------------------------------ routing

    def app(self) -> web.Application:
        """Every route of the gateway. Paths are matched as sent: a percent-encoded spelling
        of an endpoint is not that endpoint (the sessions API parses its own paths)."""
        app = web.Application(middlewares=[self._exact_paths])
        app.add_routes([
            *(web.route("*", dialect.path, functools.partial(self._listen, dialect=dialect))
              for dialect in self.dialects),
            web.route("*", twilio.PATH, self._twilio),
            web.route("*", openai.REALTIME_PATH, self._openai_realtime),
            web.route("*", openai.TRANSCRIPTIONS_PATH, self._openai_transcriptions),
            web.route("*", TOKEN_PATH, self._token),
            web.route("*", REVOKE_PATH, self._token),
            web.route("*", PREFIX + "{tail:(?:/.*)?}", self._sessions),
            web.route("*", MODELS_PATH, self._sessions),
            web.route("*", USAGE_PATH, self._sessions),
            web.route("*", AUDIT_PATH, self._sessions),
            *health_routes(self.metrics.registry, redis_ready(self.probe),
                           self._refresh_queued),
            web.get("/{path:.*}", self._static),
        ])
        return app

    @web.middleware
    async def _exact_paths(self, request: web.Request,
                           handler: web_handler) -> web.StreamResponse:
        path, _ = target(request)
        if path != request.path and not SessionsApi.handles(path):
            return not_found()
        return await handler(request)

    def _refused(self, request: web.Request, exc: BaseException,
                 respond: Callable[[BaseException], web.Response] = error_response
                 ) -> web.Response:
        """A ``/v1`` request refused (by admission or its endpoint): JSON with its status
        (``respond``: in a dialect's words)."""
        if isinstance(exc, REDIS_DOWN):
            log.warning("%s refused: redis unavailable (%r)", request.path, exc)
            self.metrics.redis_errors.labels("gateway").inc()
        self.metrics.rejections.labels(client_error(exc).code).inc()
        return respond(exc)

    async def _token(self, request: web.Request) -> web.StreamResponse:
        """``/v1/token`` (mint) and ``/v1/token/revoke``: API keys only."""
        revoke = request.path == REVOKE_PATH
        try:
            admission = await self.guard.admit(
                request, opens_session=False, allow_tokens=False,
                methods=("POST",) if revoke else ("GET", "POST"),
                method_message="use POST to revoke a token" if revoke
                else "use GET or POST to mint a token")
            if revoke:
                return await self._revoke(admission.principal, request)
            return self._mint(admission.principal, request)
        except (SttError, *REDIS_DOWN) as exc:
            return self._refused(request, exc)

    async def _sessions(self, request: web.Request) -> web.StreamResponse:
        """``/v1/sessions...``: one parse of the path decides everything: whether it opens a
        session (caps, a token's one use) and what serves it. A path it does not know opens
        nothing and is a 404 after admission."""
        route = self.sessions_api.match(target(request)[0])
        opens = route is not None and route.opens_session
        try:
            if opens:
                await self.storage.check()
            admission = await self.guard.admit(
                request, opens_session=opens, caps=self._caps if opens else None,
                viewer=route is not None and route.kind == "results",
                methods=route.methods if route is not None else (request.method,))
        except (SttError, *REDIS_DOWN) as exc:
            return self._refused(request, exc)
        try:
            if route is None:
                return self._refused(request, NotFound())
            return await self.sessions_api.serve(request, admission.principal, route,
                                                 self.sockets.track)
        finally:
            await self.guard.settle(admission)

    async def _listen(self, request: web.Request, dialect: Dialect) -> web.StreamResponse:
        """``/v1/listen`` (and each dialect's listen endpoint): admitted, then upgraded;
        query errors go to the client as error messages on the socket."""
        try:
            admission = await self._admit_listen(request, dialect)
        except (SttError, *REDIS_DOWN) as exc:
            return self._refused(request, exc, dialect.refused)
        try:
            ws = await accept(request, self.settings.ws_max_size)
        except BaseException:
            await self.guard.settle(admission)
            raise
        async with self.sockets.track(ws):
            await self._listen_socket(ws, admission, dialect)
        return ws.ws

    async def _twilio(self, request: web.Request) -> web.StreamResponse:
        """``/v1/twilio``: Twilio Media Streams. Twilio cannot put a query string in a
        ``<Stream>`` URL, so the credential may come in the ``start`` event's
        ``customParameters``: the upgrade is answered first (Origin and duplicate headers
        checked), admission follows the ``start`` event, which must come within
        ``handshake_timeout_s``."""
        try:
            check_single_headers(request.headers)
            self.guard.check_origin(request.headers)
            if not wants_websocket(request):
                raise WebSocketRequired("this endpoint is a WebSocket")
        except SttError as exc:
            return self._refused(request, exc)
        ws = await accept(request, self.settings.ws_max_size)
        async with self.sockets.track(ws):
            await self._twilio_socket(ws)
        return ws.ws

    async def _twilio_socket(self, ws: Socket) -> None:
        refuse = twilio.TwilioWire(None)
        try:
            async with asyncio.timeout(self.settings.handshake_timeout_s):
                start = await twilio.read_start(ws, self.settings.max_message_bytes)
            params = twilio.twilio_params(start)
            await self.storage.check()  # no room in Redis: refused before anything is counted
            admission = await self.guard.admit(
                ws.request, opens_session=True, caps=self._caps, member=start.session_id,
                credential=AccessGuard.credential(ws.request) or start.token)
        except TimeoutError:
            await send_wire_error(ws, refuse, BadRequest("no 'start' event in time"))
            return
        except SocketClosed:
            return
        except (SttError, *REDIS_DOWN) as exc:
            self.metrics.rejections.labels(client_error(exc).code).inc()
            await send_wire_error(ws, refuse, exc)
            return
        lease, admission.lease = admission.lease, None
        try:
            if await self.store.exists(start.session_id):
                raise BadRequest("this stream (streamSid) was transcribed already")
        except (SttError, *REDIS_DOWN) as exc:
            if lease is not None:
                await self.guard.release(lease)
            await send_wire_error(ws, refuse, exc)
            return
        log.info("session %s: Twilio stream (call %s, tracks %s)", start.session_id,
                 start.call_sid or "-", "+".join(start.tracks))
        session = ListenSession(self.listen_deps, ws, params, admission.principal, lease,
                                twilio.TwilioWire(start, MessageLimits(
                                    0, self.settings.max_messages_per_s,
                                    self.settings.messages_burst, time.monotonic())))
        try:
            await session.run()
        finally:
            if session.lease is not None:
                self.guard.forget(session.lease)

    async def _openai_realtime(self, request: web.Request) -> web.StreamResponse:
        """``/v1/realtime?intent=transcription``: OpenAI's realtime transcription sessions
        (``ingest/dialects/openai.py``), admitted like a new listen session."""
        try:
            openai.check_intent(target(request)[1])
            admission = await self._admit_listen(request, self.openai)
        except (SttError, *REDIS_DOWN) as exc:
            return self._refused(request, exc, openai.http_error)
        try:
            ws = await accept(request, self.settings.ws_max_size)
        except BaseException:
            await self.guard.settle(admission)
            raise
        lease, admission.lease = admission.lease, None
        sid = self.guard.member(lease) or uuid.uuid4().hex
        async with self.sockets.track(ws):
            await openai.serve_realtime(ws, self.listen_deps, admission.principal, lease, sid)
        return ws.ws

    async def _openai_transcriptions(self, request: web.Request) -> web.StreamResponse:
        """``POST /v1/audio/transcriptions``: an uploaded file transcribed as a new session
        (counted in the session caps while it is transcribed), answered once it closed."""
        lease: str | None = None
        sid = uuid.uuid4().hex
        closed = False
        try:
            await self.storage.check()
            admission = await self.guard.admit(request, opens_session=True, allow_tokens=False,
                                               methods=("POST",))
        except (SttError, *REDIS_DOWN) as exc:
            return self._refused(request, exc, openai.http_error)
        try:
            lease = await self.guard.acquire(self.guard.request_ip(request),
                                             admission.principal, *self._caps, member=sid)
            if self.served is not None:
                self.served.connections.read_body(request)
            upload = await openai.read_upload(request, self.settings.upload_max_bytes)
            address = address_bucket(self.guard.request_ip(request))
            finals, duration = await openai.transcribe_upload(
                self.listen_deps, upload, admission.principal, sid, address)
            closed = True
            log.info("session %s: transcribed an upload (%.1f s, %d finals)", sid, duration,
                     len(finals))
            return openai.transcription_response(upload, finals, duration, sid)
        except (SttError, *REDIS_DOWN) as exc:
            return self._refused(request, exc, openai.http_error)
        except TimeoutError:
            return self._refused(request, SttError("transcription did not finish in time"),
                                 openai.http_error)
        finally:
            if lease is not None:
                await self.guard.release(lease, session_closed=closed)
            await self.guard.settle(admission)

    async def _admit_listen(self, request: web.Request, dialect: Dialect) -> Admission:
        """The caps count the session: the one named by ?session= (resumed within its grace,
        it is counted once), or the id a new session will get. The query is read the way
        ListenParams reads it, so "resume" here is "resume" there."""
        await self.storage.check()  # no room in Redis: refused before anything is counted
        resumes = resume_target(target(request)[1]) if dialect.resumes else None
        member = resumes if resumes is not None and session_id_ok(resumes) \
            else uuid.uuid4().hex
        admission = await self.guard.admit(request, opens_session=resumes is None,
                                           caps=self._caps, member=member)
        if not wants_websocket(request):
            await self.guard.settle(admission)
            raise WebSocketRequired("this endpoint is a WebSocket")
        if resumes is None and dialect.models:  # a new session: a model the deployment knows
            model = one(target(request)[1], "model")
            try:
                if model:
                    await self.models.check(model)
            except BaseException:
                await self.guard.settle(admission)
                raise
        return admission

    def _mint(self, principal: Principal, request: web.Request) -> web.Response:
        """``GET``/``POST /v1/token``: a single-use session token for a browser page (API
        key only)."""
        s = self.settings
        if not self.guard.tokens.enabled:
            raise NotConfigured("session tokens are not enabled on this server")
        _, query = target(request)
        expires_in = float_param(query, "expires_in", s.token_ttl_s, 1.0, s.token_max_ttl_s)
        max_session = float_param(query, "max_session_s", s.max_session_s, 1.0,
                                  s.max_session_s)
        assert expires_in is not None and max_session is not None
        token, claims = self.guard.tokens.mint(principal.account or "anonymous", expires_in,
                                               max_session, tenant=principal.tenant)
        log.info("minted a session token for key %s of tenant %s (expires in %.0f s, sessions "
                 "up to %.0f s)", claims.sub, claims.tenant, expires_in, max_session)
        return json_response(http.HTTPStatus.OK, {
            "token": token, "expires_at": claims.exp, "max_session_s": claims.max_session_s})

    async def _revoke(self, principal: Principal, request: web.Request) -> web.Response:
        """``POST /v1/token/revoke`` with the token in ``X-Session-Token``: the API key that
        minted an unused token makes it unable to open a session (409 ``token_used`` once
        it has opened one)."""
        if not self.guard.tokens.enabled:
            raise NotConfigured("session tokens are not enabled on this server")
        values = request.headers.getall(REVOKE_HEADER, ())
        if len(values) != 1:
            raise BadRequest(f"send the token to revoke in one {REVOKE_HEADER} header")
        try:
            claims = self.guard.tokens.verify(values[0].strip())
        except Unauthorized:
            raise BadRequest("not a valid session token") from None
        if claims.sub != (principal.account or "anonymous"):  # as _mint names it
            raise Forbidden("only the API key that minted a token may revoke it")
        if not await self.guard.revoke(claims):
            raise TokenUsed("the token already opened its session; revoking it does not "
                            "end that session")
        log.info("revoked a session token of key %s", claims.sub)
        return json_response(http.HTTPStatus.OK, {"revoked": True, "expires_at": claims.exp})

    async def _refresh_queued(self) -> None:
        """At scrape time: the queue and worker gauges (the monitor refreshes them every
        second too)."""
        try:
            await self.monitor.refresh_gauges()
        except REDIS_DOWN:
            self.metrics.redis_errors.labels("gateway").inc()

    async def _static(self, request: web.Request) -> web.Response:
        """The browser page: ``ingest/static`` is one flat directory; ``/`` is index.html."""
        path, _ = target(request)
        name = "index.html" if path in ("/", "") else path.lstrip("/")
        if "/" in name or name.startswith(".") or not name:
            return not_found()
        try:
            body = resources.files("ingest").joinpath("static", name).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return not_found()
        ctype = mimetypes.guess_type(name)[0] or "application/octet-stream"
        if ctype.startswith("text/") or ctype.endswith("javascript"):
            ctype += "; charset=utf-8"
        return web.Response(body=body, headers={"Content-Type": ctype,
                                                "Cache-Control": "no-cache"})

    # ------------------------------------------------------------------ WebSocket side


    async def _listen_socket(self, ws: Socket, admission: Admission, dialect: Dialect) -> None:
        """A listen socket. Its cap lease goes to its ``ListenSession``, which keeps it
        until the session's stream is closed (through the resume grace when the socket
        drops)."""
        lease, admission.lease = admission.lease, None
        try:
            params, wire = dialect.read(target(ws.request)[1])
        except SttError as exc:
            if lease is not None:
                await self.guard.release(lease)
            self.metrics.rejections.labels(exc.code).inc()
            await send_wire_error(ws, dialect.plain_wire(), exc)
            return
        session = ListenSession(self.listen_deps, ws, params, admission.principal, lease,
                                wire)
        try:
            await session.run()
        finally:
            if session.lease is not None:  # run() settles it; an exception may not have
                self.guard.forget(session.lease)

    async def start(self) -> Served:
        s = self.settings
        peers = self.guard.peer_limits([s.max_sessions_per_ip, s.max_viewers_per_ip])
        self.served = await serve(self.app(), s.host, s.port, limits=peers,
                                  max_request_bytes=peers.max_request_bytes,
                                  handshake_timeout_s=s.handshake_timeout_s,
                                  reuse_port=s.reuse_port)
        self._renewer = asyncio.create_task(self.guard.renew_forever(s.heartbeat_s))
        self.monitor.start()  # the autoscaling gauges, with or without sessions
        if s.retention_max_bytes > 0:
            self._retention_task = asyncio.create_task(
                self.retention.run(s.retention_check_s), name="retention")
        (log.info if self.guard.required else log.warning)("%s", self.guard.describe())
        return self.served

    @property
    def port(self) -> int:
        assert self.served is not None
        return self.served.port

    async def close(self) -> None:
        """Graceful stop: clients get 1012 and may resume their sessions elsewhere."""
        self.live.stopping = True
        if self.served is not None:
            await self.served.stop_accepting()
            await self.live.drain_writers()
            await self.sockets.close_all(errors.SERVICE_RESTART, "gateway restarting")
            await self.served.close()
        self.live.close()
        for task in (self._renewer, self._retention_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self.sessions_api.close()
        await self.flusher.close()
        await self.monitor.close()
        await self.appends.aclose()
        await self.probe.aclose()
        await self.redis.aclose()
        await self.blocking.aclose()


