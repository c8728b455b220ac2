"""The recorded-sessions API: routing of ``/v1/sessions...`` for the gateway and for fanout.

HTTP (plain GET, answered from ``process_request``):

* ``/v1/sessions`` — newest first: ``{"sessions": [...], "next_before": ...}``
* ``/v1/sessions/{id}`` — one session's info with result counts by type
* ``/v1/sessions/{id}/audio.wav`` — the normalised audio (16 kHz mono int16)
* ``/v1/sessions/{id}/transcript.{txt,json,srt,vtt}``

WebSocket: ``/v1/sessions/{id}/results`` (viewer) and, where a replay
config is given (the gateway), ``/v1/sessions/{id}/replay``.

Errors are JSON ``{"type": "error", "code", "message"}`` with a matching
HTTP status; on WebSockets an error message and the error's close code.

The server authenticates each request first (``common/access.py``) and passes the
principal in: an API key reads any session, a session token only its own.
"""

from __future__ import annotations

import asyncio
import dataclasses
import http
import logging
import re
import time
from urllib.parse import parse_qs, urlsplit

import redis.asyncio as aioredis
from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from common.audio import TARGET_RATE
from common.auth import ANONYMOUS, Principal
from common.errors import (
    BadRequest,
    Forbidden,
    NotFound,
    Overloaded,
    SessionNotFound,
    SttError,
    TooLarge,
    WebSocketRequired,
)
from common.messages import AudioFrame
from common.ratelimit import MessageLimits
from common.redis_client import REDIS_DOWN
from common.sessions import Sessions, audio_end, check_session_id
from common.settings import GatewaySettings, SessionsApiSettings
from common.web import error_response, float_param, int_param, json_response, one, send_error
from fanout import formats
from fanout.hub import Hubs
from fanout.replay import Replay, ReplayConfig, ReplayParams
from fanout.viewer import Viewer, ViewerLimits, ViewerParams

log = logging.getLogger(__name__)

PREFIX = "/v1/sessions"
_ROUTE = re.compile(r"/v1/sessions(?:/(?P<sid>[^/]+)(?:/(?P<leaf>[^/]+))?)?/?")



@dataclasses.dataclass(frozen=True)
class Route:
    kind: str  # list | info | audio | transcript | results | replay
    sid: str = ""
    fmt: str = ""

    @property
    def websocket(self) -> bool:
        return self.kind in ("results", "replay")

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
                 blocking: aioredis.Redis, replay: ReplayConfig | None = None) -> None:
        self.settings = settings
        self.records = Sessions(redis)
        self.blocking = blocking
        self.hubs = Hubs(redis, blocking, settings.redis_block_ms, settings.viewer_queue)
        self.replay = replay
        self.viewer_limits = ViewerLimits(settings.viewer_queue, settings.max_viewers,
                                          settings.slow_viewer_grace_s)
        self._exports = asyncio.Semaphore(settings.export_concurrency)

    @classmethod
    def with_replays(cls, settings: GatewaySettings, redis: aioredis.Redis,
                     blocking: aioredis.Redis) -> SessionsApi:
        """The API as the gateway serves it: with replays (which need transcribers)."""
        return cls(settings, redis, blocking, ReplayConfig.for_gateway(settings))

    # ------------------------------------------------------------------ routing

    @staticmethod
    def handles(path: str) -> bool:
        return path == PREFIX or path.startswith(PREFIX + "/")

    def route(self, path: str) -> Route:
        """The one parse of a ``/v1/sessions...`` path: admission (caps, tokens) and dispatch
        both act on it. NotFound for anything else (a percent-encoded or doubled segment
        too); one trailing slash is the same route."""
        m = _ROUTE.fullmatch(path)
        if m is None:
            raise NotFound()
        sid, leaf = m.group("sid"), m.group("leaf")
        if sid is None:
            return Route("list")
        if leaf is None:
            return Route("info", sid)
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

    async def process_request(self, connection: ServerConnection, request: Request,
                              principal: Principal = ANONYMOUS,
                              route: Route | None = None) -> Response | None:
        """An HTTP response, or None to upgrade a WebSocket route. ``route``: the request's
        route as its admission parsed it (parsed here when not given)."""
        url = urlsplit(request.path)
        try:
            if route is None:
                route = self.route(url.path)
            query = parse_qs(url.query, keep_blank_values=True)
            if route.websocket:
                if request.headers.get("Upgrade", "").lower() != "websocket":
                    raise WebSocketRequired("this endpoint is a WebSocket")
                if route.kind == "replay" and self.replay is not None:
                    # before the upgrade: a model outside the allowlist (or a path) is a 400
                    ReplayParams.parse(query, self.replay.allowed_models)
                return None
            return await self._http(route, query, principal)
        except (SttError, *REDIS_DOWN) as exc:
            return error_response(exc)

    async def authorize(self, principal: Principal, sid: str) -> None:
        """Forbidden unless the principal may read this session (tokens: their own)."""
        if principal.kind == "token":
            owner, _ = await self.records.owner(sid)
            if not principal.may_read(owner):
                raise token_forbidden()

    async def websocket(self, ws: ServerConnection, principal: Principal = ANONYMOUS,
                        route: Route | None = None) -> None:
        """``route``: as for ``process_request``."""
        assert ws.request is not None
        url = urlsplit(ws.request.path)
        query = parse_qs(url.query, keep_blank_values=True)
        try:
            if route is None:
                route = self.route(url.path)
            if route.kind == "results":
                sid = check_session_id(route.sid)
                params = ViewerParams.parse(query)
                await self.authorize(principal, sid)
                await Viewer(self.records, self.hubs, self.viewer_limits, ws, sid,
                             params, self.inbound()).run()
            elif route.kind == "replay" and self.replay is not None:
                sid = check_session_id(route.sid)
                replay_params = ReplayParams.parse(query, self.replay.allowed_models)
                await self.authorize(principal, sid)
                await Replay(self.records, self.blocking, self.replay, ws, sid,
                             replay_params, principal, self.inbound()).run()
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

    async def _http(self, route: Route, query: dict[str, list[str]],
                    principal: Principal) -> Response:
        if route.kind == "list":
            if principal.kind == "token":
                raise token_forbidden()
            return await self._list(query)
        sid = check_session_id(route.sid)
        await self.authorize(principal, sid)
        if route.kind == "info":
            info = (await self.records.info(sid)).to_dict()
            info["counts"] = await self.records.result_counts(sid)
            return json_response(http.HTTPStatus.OK, info)
        if route.kind == "transcript":
            return await self._transcript(sid, route.fmt)
        if route.kind == "audio":
            return await self._audio(sid, query)
        raise NotFound()

    async def _list(self, query: dict[str, list[str]]) -> Response:
        limit = int_param(query, "limit", min(50, self.settings.list_max), 1,
                          self.settings.list_max)
        before = float_param(query, "before", None, 0.0, 1e12)
        state = one(query, "state") or None
        if state not in (None, "active", "closed"):
            raise BadRequest("state must be active or closed")
        sessions, next_before = await self.records.list_sessions(
            limit, before, state, self.settings.list_max_scan)
        return json_response(http.HTTPStatus.OK, {
            "sessions": [s.to_dict() for s in sessions], "next_before": next_before})

    async def _transcript(self, sid: str, fmt: str) -> Response:
        info = await self.records.info(sid)
        finals = await self.records.finals(sid)
        text = formats.transcript(fmt, finals, info.to_dict()).encode()
        return Response(200, "OK", Headers([
            ("Content-Type", formats.CONTENT_TYPES[fmt]), ("Content-Length", str(len(text))),
            ("Content-Disposition", f'inline; filename="{sid}.{fmt}"'),
            ("Cache-Control", "no-store")]), text)

    async def _audio(self, sid: str, query: dict[str, list[str]]) -> Response:
        """The normalised audio as one WAV, built in one buffer of the exact size.

        ``start``/``end`` (seconds) select a window; one response carries at
        most ``export_max_audio_s`` so memory per export stays bounded.
        """
        await self.records.info(sid)  # 404 when it does not exist
        total = await self.records.audio_samples(sid)
        start_s = float_param(query, "start", 0.0, 0.0, 1e7) or 0.0
        end_s = float_param(query, "end", None, 0.0, 1e7)
        lo = min(round(start_s * TARGET_RATE), total)
        hi = total if end_s is None else max(lo, min(round(end_s * TARGET_RATE), total))
        limit = self.settings.export_max_audio_s
        if hi - lo > limit * TARGET_RATE:
            raise TooLarge(f"one audio export carries at most {limit:g} s; ask for a window "
                           "with start= and end= (seconds)")
        if self._exports.locked():
            raise Overloaded("too many audio exports at once; try again shortly")
        async with self._exports:
            body = bytearray(44 + 2 * (hi - lo))
            body[:44] = formats.wav_header(hi - lo)
            view = memoryview(body)
            async for entry in self.records.audio(sid):
                if not isinstance(entry, AudioFrame):
                    continue
                a, b = max(entry.offset, lo), min(audio_end(entry), hi)
                if a < b:
                    src = (a - entry.offset) * 2
                    view[44 + (a - lo) * 2:44 + (b - lo) * 2] = entry.pcm[src:src + (b - a) * 2]
                if entry.offset >= hi:
                    break
        if not await self.records.exists(sid):
            raise SessionNotFound()
        return Response(200, "OK", Headers([
            ("Content-Type", "audio/wav"), ("Content-Length", str(len(body))),
            ("Content-Disposition", f'attachment; filename="{sid}.wav"'),
            ("Cache-Control", "no-store")]), body)
