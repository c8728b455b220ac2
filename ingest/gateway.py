"""The WebSocket gateway: routing, static files, health, tokens, and the listen sockets.

A listen socket is served by ``listen.py`` (the asyncio adapter over the I/O-free
``listen_core.py``), given its dependencies as ``ListenDeps``; ``live.py`` keeps this
gateway's live and detached sessions. The recorded-sessions API (``/v1/sessions...``:
viewers, replays, listing, exports) is fanout's ``SessionsApi``, the same code
``python -m fanout`` serves: the one thing ingest uses from fanout. Every ``/v1``
request passes ``AccessGuard`` (request rates, Origin, credentials, session caps) before
an upgrade; ``GET`` or ``POST /v1/token`` mints session tokens and ``POST
/v1/token/revoke`` revokes an unused one.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import logging
import mimetypes
import uuid
import weakref
from importlib import resources
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from common import errors
from common.access import AccessGuard, PeerLimits, limited_connection, select_subprotocol
from common.auth import Principal
from common.backoff import REDIS_DOWN
from common.errors import (
    BadRequest,
    Forbidden,
    MethodNotAllowed,
    NotConfigured,
    NotFound,
    SttError,
    TokenUsed,
    Unauthorized,
)
from common.metrics import gateway_metrics, health_route, register_viewer_gauges
from common.redis_client import make_redis
from common.sessions import Sessions
from common.settings import GatewaySettings
from common.streams import AudioAppender
from common.web import client_error, error_response, float_param, json_response, send_error
from fanout.api import Route, SessionsApi
from ingest.listen import ListenDeps, ListenSession
from ingest.listen_core import ListenParams, resume_target, session_id_ok
from ingest.live import LiveSessions
from ingest.monitor import SessionMonitor
from ingest.writer import AudioFlusher

log = logging.getLogger(__name__)

LISTEN_PATH = "/v1/listen"
TOKEN_PATH = "/v1/token"
REVOKE_PATH = "/v1/token/revoke"
#: The header carrying the token to revoke (a header stays out of URLs and access logs).
REVOKE_HEADER = "X-Session-Token"


class Gateway:
    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.redis = make_redis(settings)
        # results and hub reads wait out outages themselves (read_stream): no client retries
        self.blocking = make_redis(settings, blocking=True, block_ms=settings.results_block_ms,
                                   retries=False)
        self.store = Sessions(self.redis, settings.append_batch)
        # client audio: a client with no per-reply timer; each round trip is bounded instead,
        # and the flusher retries a failed one itself
        self.appends = make_redis(settings, read_timeout=False, retries=False)
        self.flusher = AudioFlusher(AudioAppender(self.appends, settings.append_batch,
                                                  settings.redis_socket_timeout_s),
                                    settings.append_batch)
        self.probe = make_redis(settings, probe=True)
        self.metrics = gateway_metrics()
        self.monitor = SessionMonitor(self.store, settings.heartbeat_s, settings.lag_warning_s,
                                      self.metrics.redis_errors.labels("gateway").inc)
        self.sessions_api = SessionsApi.with_replays(settings, self.redis, self.blocking)
        register_viewer_gauges(self.metrics.registry, lambda: len(self.sessions_api.hubs),
                               self.sessions_api.hubs.viewer_count)
        self.guard = AccessGuard(settings, self.redis,
                                 lease_s=max(30.0, 4 * settings.heartbeat_s))
        self._caps = (settings.max_sessions_per_ip, settings.max_sessions_per_key)
        self._server: Server | None = None
        self.peers: PeerLimits | None = None  # connections per client address (start())
        self._renewer: asyncio.Task[None] | None = None
        self.live = LiveSessions(settings, self.store, self.guard)
        self.listen_deps = ListenDeps(settings, self.store, self.flusher, self.blocking,
                                      self.guard, self.live, self.monitor, self.metrics)
        # The sessions-API route each admitted upgrade was admitted for: its handler
        # dispatches on that same parse.
        self._routes: weakref.WeakKeyDictionary[object, Route] = weakref.WeakKeyDictionary()

    # ------------------------------------------------------------------ HTTP side

    async def process_request(self, connection: ServerConnection,
                              request: Request) -> Response | None:
        path = urlsplit(request.path).path
        if path in (LISTEN_PATH, TOKEN_PATH, REVOKE_PATH) or SessionsApi.handles(path):
            try:
                return await self._api_request(connection, request, path)
            except (SttError, *REDIS_DOWN) as exc:
                if isinstance(exc, REDIS_DOWN):
                    log.warning("%s refused: redis unavailable (%r)", path, exc)
                    self.metrics.redis_errors.labels("gateway").inc()
                self.metrics.rejections.labels(client_error(exc).code).inc()
                return error_response(exc)
        health = await health_route(path, connection, self.probe, self.metrics.registry,
                                    self._refresh_queued)
        return health if health is not None else self._static(connection, path)

    async def _api_request(self, connection: ServerConnection, request: Request,
                           path: str) -> Response | None:
        """Request rates, Origin, credentials and session caps first (429, 403, 401), then
        the route."""
        if path in (TOKEN_PATH, REVOKE_PATH):
            principal = await self.guard.admit(connection, request, opens_session=False,
                                               allow_tokens=False)
            if path == REVOKE_PATH:
                return await self._revoke(principal, request)
            return self._mint(principal, request)
        if path == LISTEN_PATH:
            # The caps count the session: the one named by ?session= (resumed within its
            # grace, it is counted once), or the id a new session will get. The query is read
            # the way ListenParams reads it, so "resume" here is "resume" there.
            target = resume_target(parse_qs(urlsplit(request.path).query,
                                            keep_blank_values=True))
            member = target if target is not None and session_id_ok(target) \
                else uuid.uuid4().hex
            await self.guard.admit(connection, request, opens_session=target is None,
                                   caps=self._caps, member=member)
            return None  # upgrade; query errors go to the client as error messages
        # One parse decides everything: opens a session (caps, a token's one use) and what
        # serves it. A path it does not know opens nothing and is a 404 after admission.
        route = self.sessions_api.match(path)
        opens = route is not None and route.opens_session
        principal = await self.guard.admit(connection, request, opens_session=opens,
                                           caps=self._caps if opens else None,
                                           viewer=route is not None and route.kind == "results")
        if route is None:
            raise NotFound()
        if route.websocket:
            self._routes[connection] = route
        return await self.sessions_api.process_request(connection, request, principal, route)

    def _mint(self, principal: Principal, request: Request) -> Response:
        """``GET``/``POST /v1/token``: a single-use session token for a browser page (API
        key only)."""
        s = self.settings
        if request.method not in ("GET", "POST"):
            raise MethodNotAllowed("use GET or POST to mint a token")
        if not self.guard.tokens.enabled:
            raise NotConfigured("session tokens are not enabled on this server")
        query = parse_qs(urlsplit(request.path).query, keep_blank_values=True)
        expires_in = float_param(query, "expires_in", s.token_ttl_s, 1.0, s.token_max_ttl_s)
        max_session = float_param(query, "max_session_s", s.max_session_s, 1.0,
                                  s.max_session_s)
        assert expires_in is not None and max_session is not None
        token, claims = self.guard.tokens.mint(principal.account or "anonymous", expires_in,
                                               max_session)
        log.info("minted a session token for key %s (expires in %.0f s, sessions up to %.0f s)",
                 claims.sub, expires_in, max_session)
        return json_response(http.HTTPStatus.OK, {
            "token": token, "expires_at": claims.exp, "max_session_s": claims.max_session_s})

    async def _revoke(self, principal: Principal, request: Request) -> Response:
        """``POST /v1/token/revoke`` with the token in ``X-Session-Token``: the API key that
        minted an unused token makes it unable to open a session (409 ``token_used`` once
        it has opened one)."""
        if request.method != "POST":
            raise MethodNotAllowed("use POST to revoke a token")
        if not self.guard.tokens.enabled:
            raise NotConfigured("session tokens are not enabled on this server")
        values = request.headers.get_all(REVOKE_HEADER)
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
        try:
            self.metrics.sessions_queued.set(await self.store.backlog())
        except REDIS_DOWN:
            self.metrics.redis_errors.labels("gateway").inc()

    def _static(self, connection: ServerConnection, path: str) -> Response:
        name = "index.html" if path in ("/", "") else path.lstrip("/")
        if "/" in name or name.startswith(".") or not name:
            return connection.respond(http.HTTPStatus.NOT_FOUND, "not found\n")
        try:
            body = resources.files("ingest").joinpath("static", name).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return connection.respond(http.HTTPStatus.NOT_FOUND, "not found\n")
        ctype = mimetypes.guess_type(name)[0] or "application/octet-stream"
        if ctype.startswith("text/") or ctype.endswith("javascript"):
            ctype += "; charset=utf-8"
        headers = Headers([("Content-Type", ctype), ("Content-Length", str(len(body))),
                           ("Cache-Control", "no-cache")])
        return Response(200, "OK", headers, body)

    # ------------------------------------------------------------------ WebSocket side

    async def handler(self, ws: ServerConnection) -> None:
        assert ws.request is not None
        route = self._routes.pop(ws, None)
        try:
            principal, lease = self.guard.take(ws)
        except SttError as exc:
            self.metrics.rejections.labels(exc.code).inc()
            await send_error(ws, exc)
            return
        if urlsplit(ws.request.path).path == LISTEN_PATH:
            await self._listen(ws, principal, lease)
            return
        try:  # process_request let only its routes through
            await self.sessions_api.websocket(ws, principal, route)
        finally:
            if lease is not None:
                await self.guard.release(lease)

    async def _listen(self, ws: ServerConnection, principal: Principal,
                      lease: str | None) -> None:
        """A /v1/listen socket. Its cap lease goes to its ``ListenSession``, which keeps it
        until the session's stream is closed (through the resume grace when the socket
        drops)."""
        assert ws.request is not None
        try:
            params = ListenParams(parse_qs(urlsplit(ws.request.path).query,
                                           keep_blank_values=True))
        except SttError as exc:
            if lease is not None:
                await self.guard.release(lease)
            self.metrics.rejections.labels(exc.code).inc()
            await send_error(ws, exc)
            return
        session = ListenSession(self.listen_deps, ws, params, principal, lease)
        try:
            await session.run()
        finally:
            if session.lease is not None:  # run() settles it; an exception may not have
                self.guard.forget(session.lease)

    async def start(self) -> Server:
        s = self.settings
        self.peers = self.guard.peer_limits([s.max_sessions_per_ip, s.max_viewers_per_ip])
        self._server = await serve(
            self.handler, s.host, s.port,
            create_connection=limited_connection(self.peers),
            process_request=self.process_request,
            process_response=self.guard.process_response,
            select_subprotocol=select_subprotocol,
            open_timeout=s.handshake_timeout_s,
            max_size=s.ws_max_size,  # hard bound; max_message_bytes answers with an error
            max_queue=s.max_queue,
            compression=None,
            reuse_port=s.reuse_port or None,
            ping_interval=20,
            ping_timeout=20,
        )
        self._renewer = asyncio.create_task(self.guard.renew_forever(s.heartbeat_s))
        (log.info if self.guard.required else log.warning)("%s", self.guard.describe())
        return self._server

    async def close(self) -> None:
        """Graceful stop: clients get 1012 and may resume their sessions elsewhere."""
        self.live.stopping = True
        if self._server is not None:
            self._server.close(close_connections=False)
            await self.live.drain_writers()
            conns = list(self._server.connections)
            await asyncio.gather(*(c.close(errors.SERVICE_RESTART, "gateway restarting")
                                   for c in conns), return_exceptions=True)
            await self._server.wait_closed()
        self.live.close()
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
        await self.sessions_api.close()
        await self.flusher.close()
        await self.monitor.close()
        await self.appends.aclose()
        await self.probe.aclose()
        await self.redis.aclose()
        await self.blocking.aclose()


