"""The recorded-sessions API: routing of ``/v1/sessions...`` for the gateway and for fanout.

HTTP (``GET``, or ``HEAD`` for the headers alone; any other method is a 405):

* ``/v1/sessions`` — newest first: ``{"sessions": [...], "next_before": ...}``
* ``/v1/sessions/{id}`` — one session's info with result counts by type; ``DELETE`` (on the
  gateway) removes it (every key, its listing entry; a live one ends): 204, then 404
* ``/v1/sessions/{id}/audio.wav`` — the normalised audio (16 kHz mono int16), streamed
* ``/v1/sessions/{id}/transcript.{txt,json,srt,vtt}``
* ``/v1/models`` — the models workers serve now (``common/models.py``): ``{"models":
  [{"name", "workers", "capacity", "free_slots", "devices"}], "default"}``
* ``/v1/usage`` — audio seconds received and transcribed by tenant, model and day
  (``?from=&to=`` days, ``?tenant=`` for an admin): the caller's tenant's only
* ``/v1/audit`` — the audit trail (admins only): ``{"entries": [...], "next_after"}``

WebSocket: ``/v1/sessions/{id}/results`` (viewer) and, where a replay
config is given (the gateway), ``/v1/sessions/{id}/replay``.

Errors are JSON ``{"type": "error", "code", "message"}`` with a matching
HTTP status; on WebSockets an error message and the error's close code.

The server authenticates each request first (``common/access.py``) and passes the
principal in: an API key reads its tenant's sessions, a session token only its own, an
``admin`` key every tenant's. Another tenant's session answers exactly as one that does not
exist (404 ``session_not_found``), so its id cannot be probed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import http
import logging
import re
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

import redis.asyncio as aioredis
from aiohttp import web
from redis.exceptions import ResponseError

from common import keys, tenants
from common.audio import TARGET_RATE
from common.auth import DEFAULT_TENANT, Principal
from common.errors import (
    BadRequest,
    Forbidden,
    NotFound,
    Overloaded,
    SessionNotFound,
    SttError,
    WebSocketRequired,
)
from common.messages import AudioFrame
from common.models import ServedModels
from common.ratelimit import MessageLimits
from common.redis_client import REDIS_DOWN
from common.sessions import Sessions, audio_end, check_session_id
from common.settings import GatewaySettings, SessionsApiSettings
from common.web import (
    Socket,
    accept,
    error_response,
    float_param,
    int_param,
    json_response,
    one,
    send_error,
    target,
    wants_websocket,
)
from fanout import formats
from fanout.hub import Hubs
from fanout.replay import Replay, ReplayConfig, ReplayParams
from fanout.viewer import Viewer, ViewerLimits, ViewerParams

log = logging.getLogger(__name__)

PREFIX = "/v1/sessions"
MODELS_PATH = "/v1/models"
USAGE_PATH = "/v1/usage"
AUDIT_PATH = "/v1/audit"
_ROUTE = re.compile(r"/v1/sessions(?:/(?P<sid>[^/]+)(?:/(?P<leaf>[^/]+))?)?/?")
#: Bytes of audio one export writes at a time.
EXPORT_CHUNK = 1 << 16

#: What keeps an open socket known to its server while it runs (so a stopping server can
#: close it with 1012).
Track = Callable[[Socket], AbstractAsyncContextManager[Socket]]



@dataclasses.dataclass(frozen=True)
class Route:
    kind: str  # list | info | audio | transcript | results | replay | models | usage | audit
    sid: str = ""
    fmt: str = ""
    deletable: bool = False  # DELETE is served (on the gateway's info route)

    @property
    def websocket(self) -> bool:
        return self.kind in ("results", "replay")

    @property
    def methods(self) -> tuple[str, ...]:
        """The methods this route serves (any other: 405): reads, and ``DELETE`` of a
        session."""
        if self.websocket:
            return ("GET",)
        return ("GET", "HEAD", "DELETE") if self.deletable else ("GET", "HEAD")

    @property
    def opens_session(self) -> bool:
        """Replays create a session: they count against the session caps and use up a
        session token's one session."""
        return self.kind == "replay"


def token_forbidden() -> Forbidden:
    return Forbidden("a session token gives access to its own session only")


class SessionsApi:
    """Serves ``/v1/sessions...``; one per process, sharing its Redis clients and hubs."""

    def __init__(self, settings: SessionsApiSettings, redis: aioredis.Redis,
                 blocking: aioredis.Redis, replay: ReplayConfig | None = None,
                 deletes: bool = False, models: ServedModels | None = None) -> None:
        """``replay``: serve replays (they need transcribers); ``deletes``: serve
        ``DELETE /v1/sessions/{id}`` (the gateway: ``python -m fanout`` is the read side,
        and its Redis user may only read, docker/redis-users.acl); ``models``: the gateway's
        view of the worker registry (with its default model and ``MODELS``); fanout makes
        its own, which knows no default and deletes nothing."""
        self.settings = settings
        self.deletes = deletes
        self.records = Sessions(redis)
        self.models = models if models is not None else ServedModels(redis, purge=False)
        self.blocking = blocking
        self.hubs = Hubs(redis, blocking, settings.redis_block_ms, settings.viewer_queue)
        self.replay = replay
        self.viewer_limits = ViewerLimits(settings.viewer_queue, settings.max_viewers,
                                          settings.slow_viewer_grace_s)
        self._exports = asyncio.Semaphore(settings.export_concurrency)

    @classmethod
    def with_replays(cls, settings: GatewaySettings, redis: aioredis.Redis,
                     blocking: aioredis.Redis) -> SessionsApi:
        """The API as the gateway serves it: with replays (which need transcribers) and
        deletion."""
        return cls(settings, redis, blocking, ReplayConfig.for_gateway(settings), deletes=True,
                   models=ServedModels(redis, settings.model_name, settings.models,
                                       settings.model_grace_s))

    # ------------------------------------------------------------------ routing

    @staticmethod
    def handles(path: str) -> bool:
        return path == PREFIX or path.startswith(PREFIX + "/") or path in (
            MODELS_PATH, USAGE_PATH, AUDIT_PATH)

    def route(self, path: str) -> Route:
        """The one parse of a ``/v1/sessions...`` path: admission (caps, tokens) and dispatch
        both act on it. NotFound for anything else (a percent-encoded or doubled segment
        too); one trailing slash is the same route."""
        if path == MODELS_PATH:
            return Route("models")
        if path == USAGE_PATH:
            return Route("usage")
        if path == AUDIT_PATH:
            return Route("audit")
        m = _ROUTE.fullmatch(path)
        if m is None:
            raise NotFound()
        sid, leaf = m.group("sid"), m.group("leaf")
        if sid is None:
            return Route("list")
        if leaf is None:
            return Route("info", sid, deletable=self.deletes)
        if leaf == "audio.wav":
            return Route("audio", sid, "wav")
        if leaf.startswith("transcript."):
            fmt = leaf.removeprefix("transcript.")
            if fmt in formats.TRANSCRIPT_FORMATS:
                return Route("transcript", sid, fmt)
        if leaf == "results" or (leaf == "replay" and self.replay is not None):
            return Route(leaf, sid)
        raise NotFound()

    def match(self, path: str) -> Route | None:
        """``route``, or None where it is NotFound."""
        try:
            return self.route(path)
        except NotFound:
            return None

    async def serve(self, request: web.Request, principal: Principal, route: Route,
                    track: Track) -> web.StreamResponse:
        """One admitted request on ``route`` (as its admission parsed it): the HTTP
        response, or the WebSocket, upgraded and served to its end (``track`` holds it
        meanwhile). Errors before the upgrade are JSON with their status."""
        _, query = target(request)
        try:
            if not route.websocket:
                return await self._http(request, route, query, principal)
            if not wants_websocket(request):
                raise WebSocketRequired("this endpoint is a WebSocket")
            if route.kind == "replay" and self.replay is not None:
                # before the upgrade: a model outside the allowlist (or a path) is a 400,
                # one no worker serves (or served within the grace) model_unavailable
                asked = ReplayParams.parse(query, self.replay.allowed_models).model
                if asked is not None:
                    await self.models.check(asked)
        except (SttError, *REDIS_DOWN) as exc:
            return error_response(exc)
        ws = await accept(request, self.settings.ws_max_size)
        async with track(ws):
            await self.websocket(ws, principal, route, query)
        return ws.ws

    async def authorize(self, principal: Principal, sid: str) -> str:
        """The session's tenant, when the principal may read the session: SessionNotFound
        when it does not exist or is another tenant's (the same answer), Forbidden for a
        token and a session of its tenant it did not open."""
        owner, _, tenant = await self.records.owner(sid)
        if not principal.sees(tenant):
            raise SessionNotFound()
        if not principal.may_read(owner):
            raise token_forbidden()
        return tenant

    async def audit(self, principal: Principal, action: str, tenant: str, target: str,
                    **detail: object) -> None:
        """An administrative action in the audit trail (``common/tenants.py``); a Redis
        that cannot take it is logged, not the caller's failure."""
        try:
            await tenants.audit(self.records.redis, self.settings.audit_retention_s, action,
                                principal.owner, principal.tenant, tenant, target, **detail)
        except (*REDIS_DOWN, ResponseError) as exc:  # down, or a user without XADD
            log.warning("audit: %s of %s not recorded: %r", action, target, exc)

    async def websocket(self, ws: Socket, principal: Principal, route: Route,
                        query: dict[str, list[str]]) -> None:
        """A viewer or replay socket, to its end."""
        try:
            if route.kind == "results":
                sid = check_session_id(route.sid)
                params = ViewerParams.parse(query)
                await self.authorize(principal, sid)
                await Viewer(self.records, self.hubs, self.viewer_limits, ws, sid,
                             params, self.inbound()).run()
            elif route.kind == "replay" and self.replay is not None:
                sid = check_session_id(route.sid)
                replay_params = ReplayParams.parse(query, self.replay.allowed_models)
                tenant = await self.authorize(principal, sid)

                async def started(replay: str) -> None:
                    await self.audit(principal, "session_replayed", tenant, sid,
                                     replay=replay)

                await Replay(self.records, self.blocking, self.replay, ws, sid,
                             replay_params, principal, self.inbound(), started).run()
            else:
                raise NotFound()
        except (SttError, *REDIS_DOWN) as exc:
            await send_error(ws, exc)

    def inbound(self) -> MessageLimits:
        """Size and rate limits on what one viewer or replay socket sends: only control
        messages, so at most ``max_control_bytes`` each."""
        s = self.settings
        size = s.max_message_bytes
        if s.max_control_bytes > 0:
            size = min(size, s.max_control_bytes) if size > 0 else s.max_control_bytes
        return MessageLimits(size, s.max_messages_per_s, s.messages_burst, time.monotonic())

    async def close(self) -> None:
        await self.hubs.close()

    # ------------------------------------------------------------------ HTTP endpoints

    async def _http(self, request: web.Request, route: Route, query: dict[str, list[str]],
                    principal: Principal) -> web.StreamResponse:
        if route.kind == "list":
            if principal.kind == "token":
                raise token_forbidden()
            return await self._list(query, principal)
        if route.kind == "models":
            return json_response(http.HTTPStatus.OK, await self.models.listing())
        if route.kind == "usage":
            return await self._usage(query, principal)
        if route.kind == "audit":
            return await self._audit(query, principal)
        sid = check_session_id(route.sid)
        tenant = await self.authorize(principal, sid)
        if route.deletable and request.method == "DELETE":
            await self.records.delete(sid)
            log.info("session %s: deleted (by %s)", sid, principal.kind)
            await self.audit(principal, "session_deleted", tenant, sid)
            return web.Response(status=http.HTTPStatus.NO_CONTENT,
                                headers={"Cache-Control": "no-store"})
        if route.kind == "info":
            info = (await self.records.info(sid)).to_dict()
            info["counts"] = await self.records.result_counts(sid)
            return json_response(http.HTTPStatus.OK, info)
        if route.kind == "transcript":
            response = await self._transcript(sid, route.fmt)
            if request.method == "GET":
                await self.audit(principal, "session_exported", tenant, sid,
                                 format=route.fmt)
            return response
        if route.kind == "audio":
            streamed = await self._audio(request, sid, query)
            if request.method == "GET":
                await self.audit(principal, "session_exported", tenant, sid, format="wav")
            return streamed
        raise NotFound()

    async def _usage(self, query: dict[str, list[str]], principal: Principal) -> web.Response:
        """``GET /v1/usage?from=YYYY-MM-DD&to=YYYY-MM-DD`` (UTC days, both default to today):
        the caller's tenant's usage; an admin's: every tenant's, or ``tenant=``'s."""
        if principal.kind == "token":
            raise Forbidden("usage needs an API key")
        today = tenants.day_of(time.time())
        try:
            days = tenants.day_range(one(query, "from") or today,
                                     one(query, "to") or one(query, "from") or today,
                                     self.settings.usage_max_days)
        except ValueError as exc:
            raise BadRequest(f"from and to are days (YYYY-MM-DD): {exc}") from None
        asked = one(query, "tenant")
        if principal.admin or principal.kind == "anonymous":
            if asked:
                names = [asked]
            else:
                names = sorted({t.decode() for t in
                                await self.records.redis.smembers(keys.TENANTS)}
                               | {DEFAULT_TENANT})
        elif asked and asked != principal.tenant:
            raise Forbidden("a key reads its own tenant's usage")
        else:
            names = [principal.tenant]
        rows = await tenants.read_usage(self.records.redis, names, days, TARGET_RATE)
        return json_response(http.HTTPStatus.OK, {"usage": rows, "from": days[0],
                                                  "to": days[-1]})

    async def _audit(self, query: dict[str, list[str]], principal: Principal) -> web.Response:
        """``GET /v1/audit?after=<id>&limit=N&tenant=T``: admins only."""
        if not (principal.admin or principal.kind == "anonymous"):
            raise Forbidden("the audit trail is for admin keys")
        after = one(query, "after") or "0-0"
        if not re.fullmatch(r"\d{1,20}-\d{1,20}", after):
            raise BadRequest("after is an entry id (ms-seq)")
        limit = int_param(query, "limit", min(100, self.settings.audit_page_max), 1,
                          self.settings.audit_page_max)
        entries, last = await tenants.read_audit(self.records.redis, after, limit,
                                                 one(query, "tenant") or None)
        return json_response(http.HTTPStatus.OK, {"entries": entries, "next_after": last})

    async def _list(self, query: dict[str, list[str]], principal: Principal) -> web.Response:
        limit = int_param(query, "limit", min(50, self.settings.list_max), 1,
                          self.settings.list_max)
        before = float_param(query, "before", None, 0.0, 1e12)
        state = one(query, "state") or None
        if state not in (None, "active", "closed"):
            raise BadRequest("state must be active or closed")
        sessions, next_before = await self.records.list_sessions(
            limit, before, state, self.settings.list_max_scan,
            tenant=None if principal.admin or principal.kind == "anonymous"
            else principal.tenant)
        return json_response(http.HTTPStatus.OK, {
            "sessions": [s.to_dict() for s in sessions], "next_before": next_before})

    async def _transcript(self, sid: str, fmt: str) -> web.Response:
        info = await self.records.info(sid)
        finals = await self.records.finals(sid)
        text = formats.transcript(fmt, finals, info.to_dict()).encode()
        return web.Response(body=text, headers={
            "Content-Type": formats.CONTENT_TYPES[fmt],
            "Content-Disposition": f'inline; filename="{sid}.{fmt}"',
            "Cache-Control": "no-store"})

    async def _audio(self, request: web.Request, sid: str,
                     query: dict[str, list[str]]) -> web.StreamResponse:
        """The normalised audio as one WAV, streamed as it is read from Redis: memory per
        export is one stream entry and one chunk, however long the session.

        ``start``/``end`` (seconds) select a window. Samples the stream lacks (none, unless
        its entries were lost) are silence. A session that is gone by the end of the read
        (it expired meanwhile) has its response cut short, so the client sees an error.
        """
        meta = await self.records.meta(sid)  # 404 when it does not exist
        width = meta.channels if meta.multichannel else 1  # a multichannel one keeps them
        total = await self.records.audio_samples(sid)
        start_s = float_param(query, "start", 0.0, 0.0, 1e7) or 0.0
        end_s = float_param(query, "end", None, 0.0, 1e7)
        lo = min(round(start_s * TARGET_RATE), total)
        hi = total if end_s is None else max(lo, min(round(end_s * TARGET_RATE), total))
        response = web.StreamResponse(headers={
            "Content-Type": "audio/wav",
            "Content-Disposition": f'attachment; filename="{sid}.wav"',
            "Cache-Control": "no-store"})
        response.content_length = 44 + 2 * width * (hi - lo)
        if request.method == "HEAD":
            return response
        if self._exports.locked():
            raise Overloaded("too many audio exports at once; try again shortly")
        async with self._exports:
            await response.prepare(request)
            try:
                complete = await self._write_audio(response, sid, lo, hi, width)
            except ConnectionError:  # the client went away
                complete = False
            except Exception as exc:  # Redis down for good: the response cannot finish
                log.warning("session %s: audio export failed: %r", sid, exc)
                complete = False
            if not complete:
                if request.transport is not None:
                    request.transport.abort()
                return response
            await response.write_eof()
        return response

    async def _write_audio(self, response: web.StreamResponse, sid: str, lo: int,
                           hi: int, width: int = 1) -> bool:
        """Write samples ``lo``..``hi`` (of ``width`` channels, interleaved) as a WAV body;
        False when the session was gone by the end of the read (the last chunk is not
        written then)."""
        out = _Chunks(response)
        frame = 2 * width
        await out.write(formats.wav_header(hi - lo, channels=width))
        at = lo  # the next sample the body needs
        async for entry in self.records.audio(sid):
            if not isinstance(entry, AudioFrame):
                continue
            a, b = max(entry.offset, at), min(audio_end(entry), hi)
            if a < b:
                await out.silence(frame * (a - at))
                src = (a - entry.offset) * frame
                await out.write(entry.pcm[src:src + (b - a) * frame])
                at = b
            if entry.offset >= hi:
                break
        await out.silence(frame * (hi - at))
        if not await self.records.exists(sid):
            log.info("session %s: expired during its audio export; cut short", sid)
            return False
        await out.flush()
        return True


class _Chunks:
    """Writes to a streamed response in chunks of ``EXPORT_CHUNK`` bytes, the last one held
    back until ``flush`` (so a response can still be cut short before it is complete)."""

    def __init__(self, response: web.StreamResponse) -> None:
        self.response = response
        self.buffer = bytearray()

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        self.buffer += data
        while len(self.buffer) > EXPORT_CHUNK:
            chunk = bytes(self.buffer[:EXPORT_CHUNK])
            del self.buffer[:EXPORT_CHUNK]
            await self.response.write(chunk)

    async def silence(self, size: int) -> None:
        while size > 0:
            step = min(size, EXPORT_CHUNK)
            await self.write(bytes(step))
            size -= step

    async def flush(self) -> None:
        if self.buffer:
            await self.response.write(bytes(self.buffer))
            self.buffer.clear()
