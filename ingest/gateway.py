"""The WebSocket gateway: routing, static files, health, and the per-connection sessions.

The session logic is in ``listen.py``; the recorded-sessions API
(``/v1/sessions...``: viewers, replays, listing, exports) is fanout's
``SessionsApi``, the same code ``python -m fanout`` serves. This module owns
the server, the Redis clients and the detached sessions waiting out their
resume grace. Every ``/v1`` request passes ``AccessGuard`` (request rates, Origin,
credentials, session caps) before an upgrade; ``GET`` or ``POST /v1/token`` mints session
tokens and ``POST /v1/token/revoke`` revokes an unused one.
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

from common import errors, keys
from common.access import AccessGuard, PeerLimits, limited_connection, select_subprotocol
from common.auth import Principal
from common.errors import (
    BadRequest,
    Forbidden,
    NotConfigured,
    StorageUnavailable,
    SttError,
    TokenUsed,
    Unauthorized,
)
from common.messages import AudioMarker
from common.metrics import gateway_metrics, health_route, register_viewer_gauges
from common.redis_client import REDIS_DOWN, make_redis
from common.settings import GatewaySettings
from common.streams import AudioAppender
from fanout.api import NotFound, Route, SessionsApi, error_response, json_response
from fanout.replay import ReplayConfig, model_name_ok, model_names
from fanout.sockets import float_param
from ingest.listen import (
    ListenParams,
    ListenSession,
    resume_target,
    send_error,
    session_id_ok,
)
from ingest.monitor import SessionMonitor
from ingest.store import SessionStore
from ingest.writer import AudioFlusher, AudioWriter

log = logging.getLogger(__name__)

LISTEN_PATH = "/v1/listen"
TOKEN_PATH = "/v1/token"
REVOKE_PATH = "/v1/token/revoke"
#: The header carrying the token to revoke (a header stays out of URLs and access logs).
REVOKE_HEADER = "X-Session-Token"


class MethodNotAllowed(SttError):
    code = "method_not_allowed"
    http_status = 405


def replay_allowlist(settings: GatewaySettings) -> str:
    """The model names a replay may ask for: ``REPLAY_MODELS``, or the deployment's own
    model when it names none. Entries that are paths never count."""
    configured = {m.strip() for m in settings.replay_models.split(",") if m.strip()}
    names = sorted(model_names(settings.replay_models))
    if len(names) < len(configured):
        log.warning("REPLAY_MODELS: ignoring entries that are not model names (paths are "
                    "never allowed)")
    if not names and model_name_ok(settings.model_name):
        names = [settings.model_name]
    return ",".join(names)  # empty: replays only with the recorded session's model


class Gateway:
    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.redis = make_redis(settings)
        self.blocking = make_redis(settings, blocking=True, block_ms=settings.results_block_ms)
        self.store = SessionStore(self.redis, settings.append_batch)
        # client audio: a client with no per-reply timer; each round trip is bounded instead
        self.appends = make_redis(settings, read_timeout=False)
        self.flusher = AudioFlusher(AudioAppender(self.appends, settings.append_batch,
                                                  settings.redis_socket_timeout_s),
                                    settings.append_batch)
        self.probe = make_redis(settings, probe=True)
        self.metrics = gateway_metrics()
        self.monitor = SessionMonitor(self.store, settings.heartbeat_s, settings.lag_warning_s,
                                      self.metrics.redis_errors.labels("gateway").inc)
        self.sessions_api = SessionsApi(settings, self.redis, self.blocking, ReplayConfig(
            max_backlog=settings.max_backlog, heartbeat_s=settings.heartbeat_s,
            block_ms=settings.redis_block_ms, allowed_models=replay_allowlist(settings)))
        register_viewer_gauges(self.metrics.registry, lambda: len(self.sessions_api.hubs),
                               self.sessions_api.hubs.viewer_count)
        self.guard = AccessGuard(settings, self.redis,
                                 lease_s=max(30.0, 4 * settings.heartbeat_s))
        self._caps = (settings.max_sessions_per_ip, settings.max_sessions_per_key)
        self._server: Server | None = None
        self.peers: PeerLimits | None = None  # connections per client address (start())
        self._renewer: asyncio.Task[None] | None = None
        self._detached: set[asyncio.Task[None]] = set()
        self._detached_sids: dict[str, asyncio.Task[None]] = {}
        self._live: dict[str, ListenSession] = {}  # the connection writing each session here
        # The sessions-API route each admitted upgrade was admitted for: its handler
        # dispatches on that same parse.
        self._routes: weakref.WeakKeyDictionary[object, Route] = weakref.WeakKeyDictionary()
        self.stopping = False

    # ------------------------------------------------------------------ HTTP side

    async def process_request(self, connection: ServerConnection,
                              request: Request) -> Response | None:
        path = urlsplit(request.path).path
        if path in (LISTEN_PATH, TOKEN_PATH, REVOKE_PATH) or SessionsApi.handles(path):
            try:
                return await self._api_request(connection, request, path)
            except SttError as exc:
                self.metrics.rejections.labels(exc.code).inc()
                return error_response(exc)
            except REDIS_DOWN as exc:
                log.warning("%s refused: redis unavailable (%r)", path, exc)
                self.metrics.redis_errors.labels("gateway").inc()
                self.metrics.rejections.labels(StorageUnavailable.code).inc()
                return error_response(StorageUnavailable("storage unavailable; try again later"))
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
            raise NotFound("no such endpoint")
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
        session = ListenSession(self, ws, params, principal, lease)
        try:
            await session.run()
        finally:
            if session.lease is not None:  # run() settles it; an exception may not have
                self.guard.forget(session.lease)

    def detach_later(self, sid: str, generation: int, samples: int, entry_seq: int,
                     writer: AudioWriter | None, lease: str | None = None) -> None:
        """The client vanished: keep the session (and its cap ``lease``) for the resume
        grace, then end its stream and release the lease."""
        task = asyncio.create_task(
            self._expire_detached(sid, generation, samples, entry_seq, writer, lease),
            name=f"detached-{sid}")
        self._detached.add(task)
        self._detached_sids[sid] = task

        def done(t: asyncio.Task[None]) -> None:
            self._detached.discard(t)
            if self._detached_sids.get(sid) is t:
                del self._detached_sids[sid]

        task.add_done_callback(done)

    def attached(self, session: ListenSession) -> None:
        """``session`` opened its session or took it over (a resume): an earlier connection
        or detached wait for it here is stale (it can no longer append), so it ends now and
        leaves the cap member to this one. Without this, resumes of one session (which share
        its cap slot) could pile up idle sockets."""
        task = self._detached_sids.pop(session.sid, None)
        if task is not None:
            task.cancel()
        previous = self._live.get(session.sid)
        if previous is not None and previous is not session:
            if previous.generation > session.generation:  # two resumes raced: keep the newer
                session.taken()
                return
            previous.taken()
        self._live[session.sid] = session

    async def _drain_writers(self) -> None:
        """Before the 1012: store the audio the live sessions have buffered (a Redis outage
        may hold up to ``OUTAGE_BUFFER_S`` of it), for at most ``SHUTDOWN_DRAIN_S``, so a
        client resuming elsewhere finds it; what could not be stored the client sends again
        (``stored_samples``)."""
        writers = [s.writer for s in self._live.values() if s.writer is not None]
        if not writers:
            return
        drains = [asyncio.ensure_future(w.drain()) for w in writers]
        done, pending = await asyncio.wait(drains, timeout=self.settings.shutdown_drain_s)
        for fut in pending:
            fut.cancel()
        for fut in done:
            fut.exception()  # a failed writer (taken, closed) has nothing more to store
        if pending:
            log.warning("shutdown: %d session(s) still had audio buffered after %.0f s; "
                        "their clients send it again when they resume", len(pending),
                        self.settings.shutdown_drain_s)

    def unattached(self, session: ListenSession) -> None:
        if self._live.get(session.sid) is session:
            del self._live[session.sid]

    async def _expire_detached(self, sid: str, generation: int, samples: int, entry_seq: int,
                               writer: AudioWriter | None, lease: str | None) -> None:
        closed = False
        try:
            if writer is not None:
                try:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(writer.drain(), self.settings.outage_buffer_s)
                finally:
                    await writer.close()
            await asyncio.sleep(self.settings.resume_grace_s)
            marker = AudioMarker("close", entry_seq + 1, samples)
            ended = False  # its transcriber closed it meanwhile (idle): nothing to append
            for attempt in range(10):
                try:
                    closed = await self.store.append(sid, generation, [marker])
                    if not closed:
                        ended = await self.redis.hget(keys.meta(sid), "state") != b"active"
                    break
                except REDIS_DOWN:
                    await asyncio.sleep(min(0.2 * 2 ** attempt, 5.0))
            if closed:
                log.info("session %s: not resumed within %.0f s; closing it", sid,
                         self.settings.resume_grace_s)
            if (closed or ended) and lease is not None:
                await self.guard.release(lease, session_closed=True)
        finally:
            # Not closed here: resumed on another connection (the attach generation moved;
            # that connection holds the member now), or Redis stayed down (the member's
            # lease runs out).
            if lease is not None:
                self.guard.forget(lease)

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
        self.stopping = True
        if self._server is not None:
            self._server.close(close_connections=False)
            await self._drain_writers()
            conns = list(self._server.connections)
            await asyncio.gather(*(c.close(errors.SERVICE_RESTART, "gateway restarting")
                                   for c in conns), return_exceptions=True)
            await self._server.wait_closed()
        for task in list(self._detached):
            task.cancel()
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


