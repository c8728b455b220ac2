"""Prometheus metrics: every name in one place, and a health/metrics HTTP endpoint.

Each process registers only what it uses: ``gateway_metrics()``,
``worker_metrics()`` or ``fanout_metrics()`` build their collectors on a
fresh registry, so tests can run several in one process.
"""

from __future__ import annotations

import dataclasses
import http
import http.server
import logging
import threading
from collections.abc import Awaitable, Callable
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
DECODE_BUCKETS = (0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0)


@dataclasses.dataclass
class WorkerMetrics:
    registry: CollectorRegistry
    sessions_active: Gauge
    sessions_parked: Gauge
    sessions_started: Counter
    takeovers: Counter
    oldest_expired_lease: Gauge
    audio_seconds: Counter
    lag_seconds: Gauge
    decode_seconds: Histogram
    decode_wait_seconds: Histogram
    time_to_final: Histogram
    finals: Counter
    full_window_redos: Counter
    partials_skipped: Counter
    redis_errors: Counter
    batch_rows: Histogram


def worker_metrics() -> WorkerMetrics:
    r = CollectorRegistry()
    return WorkerMetrics(
        registry=r,
        sessions_active=Gauge("stt_worker_sessions_active", "sessions this worker owns",
                              registry=r),
        sessions_parked=Gauge(
            "stt_worker_sessions_parked", "sessions this worker owns that gave their capacity "
            "slot back while their client is silent (PARK_AFTER_S)", registry=r),
        sessions_started=Counter("stt_worker_sessions_started", "sessions taken from the queue",
                                 registry=r),
        takeovers=Counter("stt_worker_takeovers", "sessions taken over after a lease expired",
                          registry=r),
        oldest_expired_lease=Gauge(
            "stt_worker_oldest_expired_lease_seconds",
            "how long past its lease the oldest expired work entry was when this worker last "
            "looked (0: none); a value that grows means sessions wait for a takeover",
            registry=r),
        audio_seconds=Counter("stt_worker_audio_seconds", "audio seconds transcribed",
                              registry=r),
        lag_seconds=Gauge("stt_worker_session_lag_seconds",
                          "audio appended but not yet transcribed, per session", ["session"],
                          registry=r),
        decode_seconds=Histogram("stt_worker_decode_seconds", "one Whisper decode",
                                 ["kind"], buckets=DECODE_BUCKETS, registry=r),
        decode_wait_seconds=Histogram(
            "stt_worker_decode_wait_seconds",
            "time a decode waited for a lane, by kind: final (somebody waits for it), "
            "speculative (a final decoded ahead at a short pause) or partial; they are "
            "served in that order", ["kind"],
            buckets=DECODE_BUCKETS, registry=r),
        time_to_final=Histogram(
            "stt_worker_time_to_final_seconds",
            "final committed minus the time the audio of its last word reached Redis",
            buckets=LATENCY_BUCKETS, registry=r),
        finals=Counter("stt_worker_finals", "finals committed", registry=r),
        full_window_redos=Counter(
            "stt_worker_full_window_redos",
            "decodes done again, by reason: with Whisper's full window after a short-context "
            "one (loop, stock_sentence, lowercase, skipped_words, low_confidence), or "
            "without the previous text as prompt (empty_after_prompt; loop_without_prompt, "
            "a short-context loop, tried before the full window)", ["reason"],
            registry=r),
        partials_skipped=Counter("stt_worker_partials_skipped",
                                 "audio batches fed without a partial decode (load shedding)",
                                 registry=r),
        redis_errors=Counter("stt_redis_errors", "failed Redis operations (retried)",
                             ["service"], registry=r),
        batch_rows=Histogram("stt_worker_batch_rows",
                             "rows (session decodes) per batched model call, by call",
                             ["op"], buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32), registry=r),
    )


@dataclasses.dataclass
class GatewayMetrics:
    registry: CollectorRegistry
    sessions_active: Gauge
    sessions_queued: Gauge
    sessions_opened: Counter
    reconnects: Counter
    rejections: Counter
    audio_seconds: Counter
    results_sent: Counter
    time_to_final: Histogram
    redis_errors: Counter


def gateway_metrics() -> GatewayMetrics:
    r = CollectorRegistry()
    return GatewayMetrics(
        registry=r,
        sessions_active=Gauge("stt_gateway_sessions_active", "open /v1/listen sockets",
                              registry=r),
        sessions_queued=Gauge("stt_sessions_queued",
                              "sessions waiting for a transcriber (read at scrape time)",
                              registry=r),
        sessions_opened=Counter("stt_gateway_sessions_opened", "new sessions", registry=r),
        reconnects=Counter("stt_gateway_reconnects", "sessions resumed with session/after",
                           registry=r),
        rejections=Counter("stt_gateway_rejections", "sockets ended with an error, by code",
                           ["reason"], registry=r),
        audio_seconds=Counter("stt_gateway_audio_seconds", "audio seconds received (16 kHz)",
                              registry=r),
        results_sent=Counter("stt_gateway_results_sent", "results sent to sockets, by type",
                             ["type"], registry=r),
        time_to_final=Histogram(
            "stt_gateway_time_to_final_seconds",
            "final sent to the client minus when the gateway received its last word's audio",
            buckets=LATENCY_BUCKETS, registry=r),
        redis_errors=Counter("stt_redis_errors", "failed Redis operations (retried)",
                             ["service"], registry=r),
    )


def register_viewer_gauges(registry: CollectorRegistry, hubs: Callable[[], int],
                           viewers: Callable[[], int]) -> None:
    """Viewer load of a process serving /v1/sessions/{id}/results (gateway or fanout)."""
    Gauge("stt_viewer_hubs", "sessions with viewers in this process (one Redis reader each)",
          registry=registry).set_function(hubs)
    Gauge("stt_viewers", "viewer sockets in this process",
          registry=registry).set_function(viewers)


class HealthServer:
    """/metrics, /healthz and /readyz on a plain HTTP port, served from a daemon thread."""

    def __init__(self, registry: CollectorRegistry, ready: Callable[[], tuple[bool, str]],
                 host: str, port: int) -> None:
        self.registry = registry
        self.ready = ready
        handler = self._handler()
        self.server = http.server.ThreadingHTTPServer((host, port), handler)
        self.port = int(self.server.server_address[1])
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True,
                                        name="health-http")

    def start(self) -> HealthServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, generate_latest(outer.registry), CONTENT_TYPE_LATEST)
                elif path == "/healthz":
                    self._send(200, b"ok\n")
                elif path == "/readyz":
                    ok, why = outer.ready()
                    self._send(200 if ok else 503, (why + "\n").encode())
                else:
                    self._send(404, b"not found\n")

            def _send(self, status: int, body: bytes,
                      ctype: str = "text/plain; charset=utf-8") -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass  # scrapes every few seconds would drown the service's own log

        return Handler


async def health_route(path: str, connection: Any, probe: Any, registry: CollectorRegistry,
                       before_metrics: Callable[[], Awaitable[None]] | None = None) -> Any:
    """/healthz, /readyz (``probe`` answers PING) and /metrics on a websockets server;
    None for any other path. The same three endpoints on the gateway and fanout."""
    from websockets.datastructures import Headers
    from websockets.http11 import Response

    from common.redis_client import REDIS_DOWN

    if path == "/healthz":
        return connection.respond(http.HTTPStatus.OK, "ok\n")
    if path == "/readyz":
        try:
            await probe.ping()
        except REDIS_DOWN:
            return connection.respond(http.HTTPStatus.SERVICE_UNAVAILABLE, "redis unreachable\n")
        return connection.respond(http.HTTPStatus.OK, "ready\n")
    if path == "/metrics":
        if before_metrics is not None:
            await before_metrics()
        body = generate_latest(registry)
        return Response(200, "OK", Headers([("Content-Type", CONTENT_TYPE_LATEST),
                                            ("Content-Length", str(len(body)))]), body)
    return None
