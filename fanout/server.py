"""``python -m fanout``: a standalone viewer server, so viewer traffic scales apart from ingest.

It serves the read-only half of the recorded-sessions API (viewers,
listing, exports) with the same ``SessionsApi`` the gateway uses, plus
``/healthz``. Replays write audio and stay on the gateway.
"""

from __future__ import annotations

import asyncio
import http

from prometheus_client import CollectorRegistry
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from common import errors
from common.metrics import metrics_response, register_viewer_gauges
from common.redis_client import REDIS_DOWN, make_redis
from common.settings import FanoutSettings
from fanout.api import NotFound, SessionsApi, error_response


class FanoutServer:
    def __init__(self, settings: FanoutSettings) -> None:
        self.settings = settings
        self.redis = make_redis(settings)
        self.blocking = make_redis(settings, blocking=True)
        self.api = SessionsApi(settings, self.redis, self.blocking)
        self.probe = make_redis(settings, probe=True)
        self.registry = CollectorRegistry()
        register_viewer_gauges(self.registry, lambda: len(self.api.hubs),
                               self.api.hubs.viewer_count)
        self._server: Server | None = None

    async def process_request(self, connection: ServerConnection,
                              request: Request) -> Response | None:
        path = request.path.split("?", 1)[0]
        if path == "/healthz":
            return connection.respond(http.HTTPStatus.OK, "ok\n")
        if path == "/readyz":
            try:
                await self.probe.ping()
            except REDIS_DOWN:
                return connection.respond(http.HTTPStatus.SERVICE_UNAVAILABLE,
                                          "redis unreachable\n")
            return connection.respond(http.HTTPStatus.OK, "ready\n")
        if path == "/metrics":
            body, ctype = metrics_response(self.registry)
            return Response(200, "OK", Headers([("Content-Type", ctype),
                                                ("Content-Length", str(len(body)))]), body)
        if SessionsApi.handles(path):
            return await self.api.process_request(connection, request)
        return error_response(NotFound("no such endpoint"))

    async def start(self) -> Server:
        s = self.settings
        self._server = await serve(
            self.api.websocket, s.host, s.port,
            process_request=self.process_request,
            max_size=s.max_message_bytes,
            compression=None,
            ping_interval=20,
            ping_timeout=20,
        )
        return self._server

    async def close(self) -> None:
        """Viewers get 1012 and may reconnect elsewhere with ``after``."""
        if self._server is not None:
            self._server.close(close_connections=False)
            await asyncio.gather(*(c.close(errors.SERVICE_RESTART, "fanout restarting")
                                   for c in list(self._server.connections)),
                                 return_exceptions=True)
            await self._server.wait_closed()
        await self.api.close()
        await self.redis.aclose()
        await self.blocking.aclose()
        await self.probe.aclose()
