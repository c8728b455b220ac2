"""``python -m fanout``: a standalone viewer server, so viewer traffic scales apart from ingest.

It serves the read-only half of the recorded-sessions API (viewers,
listing, exports) with the same ``SessionsApi`` the gateway uses, plus
``/healthz``. Replays write audio and stay on the gateway. Requests are
authenticated like the gateway's (same ``API_KEYS`` and ``TOKEN_SECRET``).
"""

from __future__ import annotations

import asyncio
import contextlib

from prometheus_client import CollectorRegistry
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.http11 import Request, Response

from common import errors
from common.access import AccessGuard, limited_connection, select_subprotocol
from common.errors import NotFound, SttError
from common.metrics import health_route, register_viewer_gauges
from common.redis_client import REDIS_DOWN, make_redis
from common.settings import FanoutSettings
from common.web import error_response, send_error
from fanout.api import SessionsApi


class FanoutServer:
    def __init__(self, settings: FanoutSettings) -> None:
        self.settings = settings
        self.redis = make_redis(settings)
        self.blocking = make_redis(settings, blocking=True, retries=False)  # read_stream retries
        self.api = SessionsApi(settings, self.redis, self.blocking)
        self.probe = make_redis(settings, probe=True)
        self.registry = CollectorRegistry()
        register_viewer_gauges(self.registry, lambda: len(self.api.hubs),
                               self.api.hubs.viewer_count)
        self.guard = AccessGuard(settings, self.redis)
        self._server: Server | None = None
        self._sweeper: asyncio.Task[None] | None = None

    async def process_request(self, connection: ServerConnection,
                              request: Request) -> Response | None:
        path = request.path.split("?", 1)[0]
        health = await health_route(path, connection, self.probe, self.registry)
        if health is not None:
            return health
        if SessionsApi.handles(path):
            route = self.api.match(path)
            try:
                principal = await self.guard.admit(
                    connection, request, opens_session=False,
                    viewer=route is not None and route.kind == "results")
            except (SttError, *REDIS_DOWN) as exc:
                return error_response(exc)
            return await self.api.process_request(connection, request, principal)
        return error_response(NotFound())

    async def handler(self, ws: ServerConnection) -> None:
        try:
            principal, _ = self.guard.take(ws)
        except SttError as exc:
            await send_error(ws, exc)
            return
        await self.api.websocket(ws, principal)

    async def start(self) -> Server:
        s = self.settings
        self._server = await serve(
            self.handler, s.host, s.port,
            create_connection=limited_connection(self.guard.peer_limits([s.max_viewers_per_ip])),
            process_request=self.process_request,
            process_response=self.guard.process_response,
            select_subprotocol=select_subprotocol,
            open_timeout=s.handshake_timeout_s,
            max_size=s.ws_max_size,  # hard bound; max_message_bytes answers with an error
            compression=None,
            ping_interval=20,
            ping_timeout=20,
        )
        self._sweeper = asyncio.create_task(self.guard.renew_forever(10.0))
        return self._server

    async def close(self) -> None:
        """Viewers get 1012 and may reconnect elsewhere with ``after``."""
        if self._server is not None:
            self._server.close(close_connections=False)
            await asyncio.gather(*(c.close(errors.SERVICE_RESTART, "fanout restarting")
                                   for c in list(self._server.connections)),
                                 return_exceptions=True)
            await self._server.wait_closed()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        await self.api.close()
        await self.redis.aclose()
        await self.blocking.aclose()
        await self.probe.aclose()
