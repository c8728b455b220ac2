"""Prometheus metrics: every name in one place, and the health/metrics HTTP routes.

Each process registers only what it uses: ``gateway_metrics()``,
``worker_metrics()`` or ``fanout_metrics()`` build their collectors on a
fresh registry, so tests can run several in one process.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from common.serving import Served, serve

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
    compactions: Counter
    compacted_bytes: Counter
    usage_seconds: Counter


def usage_counter(r: CollectorRegistry) -> Counter:
    """Audio seconds counted in a tenant's usage by this process (``common/tenants.py``):
    each sample once across every process, so the sum over processes is the bill."""
    return Counter("stt_usage_audio_seconds", "audio seconds counted in tenants' usage, by "
                   "tenant, model and kind (received: gateways; transcribed: workers)",
                   ["tenant", "model", "kind"], registry=r)


def worker_metrics() -> WorkerMetrics:
    r = CollectorRegistry()
    return WorkerMetrics(
        usage_seconds=usage_counter(r),
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
            "without the previous text as prompt (empty_after_prompt, stopped_after_prompt; "
            "loop_without_prompt, a short-context loop, tried before the full window), or "
            "alone after a final decoded in context looked wrong (context), or at "
            "doubt_beam_size after a final Whisper was unsure of (doubt)", ["reason"],
            registry=r),
        partials_skipped=Counter("stt_worker_partials_skipped",
                                 "audio batches fed without a partial decode (load shedding)",
                                 registry=r),
        redis_errors=Counter("stt_redis_errors", "failed Redis operations (retried)",
                             ["service"], registry=r),
        batch_rows=Histogram("stt_worker_batch_rows",
                             "rows (session decodes) per batched model call, by call",
                             ["op"], buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32), registry=r),
        compactions=Counter("stt_worker_compactions",
                            "closed sessions whose audio was compacted (COMPACT_CODEC)",
                            registry=r),
        compacted_bytes=Counter(
            "stt_worker_compacted_bytes", "audio bytes in Redis before (raw) and after "
            "(compacted) the compactions of this worker", ["form"], registry=r),
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
    # the autoscaling signal, per model (ingest/monitor.py refreshes them every second)
    sessions_waiting: Gauge
    queue_oldest_wait: Gauge
    workers: Gauge
    usage_seconds: Counter
    worker_capacity: Gauge
    worker_free_slots: Gauge


def gateway_metrics() -> GatewayMetrics:
    r = CollectorRegistry()
    return GatewayMetrics(
        usage_seconds=usage_counter(r),
        registry=r,
        sessions_active=Gauge("stt_gateway_sessions_active", "open /v1/listen sockets",
                              registry=r),
        sessions_queued=Gauge("stt_sessions_queued",
                              "sessions waiting for a transcriber, all models (the sum of "
                              "stt_sessions_waiting)", registry=r),
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
        sessions_waiting=Gauge(
            "stt_sessions_waiting", "sessions on a model's work queue that no worker has "
            "taken yet (the whole deployment's, as every gateway sees it: aggregate with max)",
            ["model"], registry=r),
        queue_oldest_wait=Gauge(
            "stt_queue_oldest_wait_seconds", "how long the oldest session waiting on a "
            "model's work queue has waited (Redis time; 0: none waits)", ["model"],
            registry=r),
        workers=Gauge("stt_workers", "live workers serving a model (worker registry)",
                      ["model"], registry=r),
        worker_capacity=Gauge(
            "stt_worker_capacity", "session slots of the live workers serving a model",
            ["model"], registry=r),
        worker_free_slots=Gauge(
            "stt_worker_free_slots", "free session slots of the live workers serving a model, "
            "as they last announced them", ["model"], registry=r),
    )


def register_viewer_gauges(registry: CollectorRegistry, hubs: Callable[[], int],
                           viewers: Callable[[], int]) -> None:
    """Viewer load of a process serving /v1/sessions/{id}/results (gateway or fanout)."""
    Gauge("stt_viewer_hubs", "sessions with viewers in this process (one Redis reader each)",
          registry=registry).set_function(hubs)
    Gauge("stt_viewers", "viewer sockets in this process",
          registry=registry).set_function(viewers)


Readiness = Callable[[], Awaitable[tuple[bool, str]]]


def _text(status: int, text: str) -> web.Response:
    return web.Response(status=status, text=text, content_type="text/plain", charset="utf-8")


def health_routes(registry: CollectorRegistry, ready: Readiness,
                  before_metrics: Callable[[], Awaitable[None]] | None = None
                  ) -> list[web.RouteDef]:
    """``/healthz`` (alive), ``/readyz`` (``ready()``: 200 or 503 with its reason) and
    ``/metrics`` (Prometheus; ``before_metrics`` refreshes what is read at scrape time):
    the same three on the gateway, fanout and the worker."""

    async def healthz(_request: web.Request) -> web.Response:
        return _text(200, "ok\n")

    async def readyz(_request: web.Request) -> web.Response:
        ok, why = await ready()
        return _text(200 if ok else 503, why + "\n")

    async def metrics(_request: web.Request) -> web.Response:
        if before_metrics is not None:
            await before_metrics()
        return web.Response(body=generate_latest(registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    return [web.get("/healthz", healthz), web.get("/readyz", readyz),
            web.get("/metrics", metrics)]


def redis_ready(probe: Any) -> Readiness:
    """Readiness of a server whose only dependency is Redis (``probe`` answers PING)."""
    from common.redis_client import REDIS_DOWN

    async def ready() -> tuple[bool, str]:
        try:
            await probe.ping()
        except REDIS_DOWN:
            return False, "redis unreachable"
        return True, "ready"
    return ready


async def serve_health(registry: CollectorRegistry, ready: Callable[[], tuple[bool, str]],
                       host: str, port: int) -> Served:
    """The worker's health port: ``health_routes`` on this event loop (its model and VAD
    run in threads, so the loop stays free to answer); anything else is a 404."""

    async def readiness() -> tuple[bool, str]:
        return ready()

    async def not_found(_request: web.Request) -> web.Response:
        return _text(404, "not found\n")

    app = web.Application()
    app.add_routes(health_routes(registry, readiness))
    app.router.add_route("*", "/{path:.*}", not_found)
    return await serve(app, host, port)
