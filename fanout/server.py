"""``python -m fanout``: a standalone viewer server, so viewer traffic scales apart from ingest.

It serves the read-only half of the recorded-sessions API (viewers,
listing, exports) with the same ``SessionsApi`` the gateway uses, plus
``/healthz``, ``/readyz`` and ``/metrics``, HTTP and WebSocket on one port (aiohttp, under
``common/serving.py``'s per-connection checks). Replays write audio and stay on the
gateway. Requests are authenticated like the gateway's (same ``API_KEYS`` and
``TOKEN_SECRET``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CollectorRegistry

from common import errors
from common.access import AccessGuard
from common.errors import NotFound, SttError
from common.metrics import health_routes, redis_ready, register_viewer_gauges
from common.redis_client import REDIS_DOWN, make_redis
from common.serving import Served, serve
from common.settings import FanoutSettings
from common.web import OpenSockets, error_response, target
from fanout.api import SessionsApi


class FanoutServer:
    def __init__(self, settings: FanoutSettings) -> None:
        self.settings = settings
        self.redis = make_redis(settings)
        # read_stream retries; from replicas when writes wait for them (common/replication.py)
        self.blocking = make_redis(settings, blocking=True, retries=False,
                                   replica_reads=settings.redis_replica_acks > 0)
        self.api = SessionsApi(settings, self.redis, self.blocking)
        self.probe = make_redis(settings, probe=True)
        self.registry = CollectorRegistry()
        register_viewer_gauges(self.registry, lambda: len(self.api.hubs),
                               self.api.hubs.viewer_count)
        self.guard = AccessGuard(settings, self.redis)
        self.served: Served | None = None
        self.sockets = OpenSockets()  # open viewers (closed with 1012 at a stop)

    def app(self) -> web.Application:
        """Health routes (paths matched as sent), ``/v1/sessions...`` (which parses its own
        paths), and a JSON 404 for anything else."""
        app = web.Application(middlewares=[self._exact_paths])
        app.add_routes([
            *health_routes(self.registry, redis_ready(self.probe)),
            web.route("*", "/{path:.*}", self._request),
        ])
        return app

    @web.middleware
    async def _exact_paths(self, request: web.Request,
                           handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                           ) -> web.StreamResponse:
        """A percent-encoded spelling of a health route is not that route."""
        path, _ = target(request)
        if path != request.path and not SessionsApi.handles(path):
            return error_response(NotFound())
        return await handler(request)

    async def _request(self, request: web.Request) -> web.StreamResponse:
        path, _ = target(request)
        if not SessionsApi.handles(path):
            return error_response(NotFound())
        route = self.api.match(path)
        try:
            admission = await self.guard.admit(
                request, opens_session=False,
                viewer=route is not None and route.kind == "results",
                methods=route.methods if route is not None else (request.method,))
        except (SttError, *REDIS_DOWN) as exc:
            return error_response(exc)
        try:
            if route is None:
                return error_response(NotFound())
            return await self.api.serve(request, admission.principal, route, self.sockets.track)
        finally:
            await self.guard.settle(admission)


    async def start(self) -> Served:
        s = self.settings
        peers = self.guard.peer_limits([s.max_viewers_per_ip])
        self.served = await serve(self.app(), s.host, s.port, limits=peers,
                                  max_request_bytes=peers.max_request_bytes,
                                  handshake_timeout_s=s.handshake_timeout_s)
        return self.served

    async def close(self) -> None:
        """Viewers get 1012 and may reconnect elsewhere with ``after``."""
        if self.served is not None:
            await self.served.stop_accepting()
            await self.sockets.close_all(errors.SERVICE_RESTART, "fanout restarting")
            await self.served.close()
        await self.api.close()
        await self.redis.aclose()
        await self.blocking.aclose()
        await self.probe.aclose()
