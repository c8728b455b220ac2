"""Observability: /metrics values move when a session runs; /readyz follows Redis."""

from __future__ import annotations

import asyncio
import re
import threading
import time
import urllib.error
import urllib.request

import pytest

from common.client import listen_url, stream
from tests.audio_refs import frames, load_pcm16
from tests.procs import Cluster, Service, until

pytestmark = pytest.mark.integration


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def metrics_port(svc: Service) -> int:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        m = re.search(r"metrics, healthz and readyz on port (\d+)", svc.log())
        if m:
            return int(m.group(1))
        time.sleep(0.1)
    raise AssertionError("no metrics port in the log")


def sample(text: str, name: str, labels: str = "") -> float:
    m = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def wait_status(url: str, status: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while (code := http_get(url)[0]) != status:
        assert time.monotonic() < deadline, f"{url} stayed {code}, wanted {status}"
        time.sleep(0.2)


@pytest.fixture
def cluster():  # type: ignore[no-untyped-def]
    c = Cluster(workers=1, persistence=True)
    yield c
    c.close()


def test_worker_metrics_move_when_a_session_runs(cluster: Cluster) -> None:
    """... and its health port (served from the worker's event loop, while decodes run on
    inference threads) answers promptly all the while."""
    base = f"http://127.0.0.1:{metrics_port(cluster.workers['w1'])}"
    status, before = http_get(base + "/metrics")
    assert status == 200
    assert sample(before, "stt_worker_finals_total") == 0
    pcm = load_pcm16("fw_jfk")
    waits: list[float] = []
    streaming = threading.Event()

    def poll() -> None:
        while streaming.is_set():
            began = time.monotonic()
            assert http_get(base + "/healthz") == (200, "ok\n")
            waits.append(time.monotonic() - began)
            time.sleep(0.05)

    streaming.set()
    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    try:
        res = asyncio.run(stream(listen_url(cluster.ws_url), frames(pcm), pace=2.0))
    finally:
        streaming.clear()
        poller.join(10)
    assert len(waits) > 20 and max(waits) < 1.0, (len(waits), max(waits, default=None))
    assert res.close_code == 1000
    _, after = http_get(base + "/metrics")
    assert sample(after, "stt_worker_finals_total") == len([f for f in res.finals if f["text"]])
    assert sample(after, "stt_worker_audio_seconds_total") == pytest.approx(len(pcm) / 16000,
                                                                           abs=0.2)
    assert sample(after, "stt_worker_sessions_started_total") == 1
    # the worker releases the session just after it publishes the close the client saw
    deadline = time.monotonic() + 5.0
    while sample(after, "stt_worker_sessions_active") != 0 and time.monotonic() < deadline:
        time.sleep(0.05)
        after = http_get(base + "/metrics")[1]
    assert sample(after, "stt_worker_sessions_active") == 0
    assert sample(after, "stt_worker_decode_seconds_count", '{kind="final"}') >= 1
    assert sample(after, "stt_worker_decode_seconds_count", '{kind="partial"}') >= 1
    assert sample(after, "stt_worker_time_to_final_seconds_count") >= 3


def test_worker_readyz_fails_while_redis_is_down_and_recovers(cluster: Cluster) -> None:
    base = f"http://127.0.0.1:{metrics_port(cluster.workers['w1'])}"
    wait_status(base + "/readyz", 200)
    assert http_get(base + "/healthz")[0] == 200
    cluster.redis.stop()
    try:
        wait_status(base + "/readyz", 503)
        assert http_get(base + "/healthz")[0] == 200  # alive, just not ready
    finally:
        cluster.redis.start()
    wait_status(base + "/readyz", 200)
    _, text = http_get(base + "/metrics")
    assert sample(text, "stt_redis_errors_total", '{service="transcriber"}') >= 1


def test_gateway_metrics_move_when_a_session_runs(cluster: Cluster) -> None:
    base = f"http://127.0.0.1:{cluster.port}"
    status, before = http_get(base + "/metrics")
    assert status == 200
    assert sample(before, "stt_gateway_sessions_opened_total") == 0
    pcm = load_pcm16("fw_jfk")
    res = asyncio.run(stream(listen_url(cluster.ws_url), frames(pcm), pace=2.0))
    bad = asyncio.run(stream(listen_url(cluster.ws_url, sample_rate=1), [], pace=None))
    assert bad.close_code == 1003
    _, after = http_get(base + "/metrics")
    assert sample(after, "stt_gateway_sessions_opened_total") == 1
    assert sample(after, "stt_gateway_sessions_active") == 0
    assert sample(after, "stt_gateway_audio_seconds_total") == pytest.approx(
        len(pcm) / 16000, abs=0.01)
    assert sample(after, "stt_gateway_results_sent_total", '{type="final"}') == len(res.finals)
    assert sample(after, "stt_gateway_time_to_final_seconds_count") >= 3
    assert sample(after, "stt_gateway_rejections_total", '{reason="unsupported_audio"}') == 1
    assert "stt_sessions_queued 0.0" in after


def test_gateway_readyz_fails_while_redis_is_down_and_recovers(cluster: Cluster) -> None:
    base = f"http://127.0.0.1:{cluster.port}"
    wait_status(base + "/readyz", 200)
    cluster.redis.stop()
    try:
        wait_status(base + "/readyz", 503)
        assert http_get(base + "/healthz")[0] == 200
    finally:
        cluster.redis.start()
    wait_status(base + "/readyz", 200)


def test_fanout_metrics_count_viewers_and_readyz_follows_redis(cluster: Cluster) -> None:
    import json

    from websockets.asyncio.client import connect

    from tests.procs import free_port, wait_port, wait_until

    port = free_port()
    fan = Service("fanout", ["--host", "127.0.0.1", "--port", str(port)],
                  {"REDIS_URL": cluster.redis.url}, "fanout listening")
    try:
        fan.wait_ready()
        wait_port(port)
        base = f"http://127.0.0.1:{port}"
        wait_status(base + "/readyz", 200)

        async def viewers_are(n: int) -> bool:
            text = await asyncio.to_thread(lambda: http_get(base + "/metrics")[1])
            return sample(text, "stt_viewers") == n

        async def scenario() -> None:
            watch: dict[str, str] = {}
            known = asyncio.Event()

            def on(msg: dict[str, object]) -> None:
                if msg["type"] == "session":
                    watch["sid"] = str(msg["session_id"])
                    known.set()

            pcm = load_pcm16("ds_ldc93s1")  # a live session of 3 s to view
            task = asyncio.create_task(stream(listen_url(cluster.ws_url), frames(pcm),
                                              pace=1.0, on_message=on))
            await known.wait()
            url = f"ws://127.0.0.1:{port}/v1/sessions/{watch['sid']}/results"
            async with connect(url) as ws:
                assert json.loads(await ws.recv())["type"] in ("viewer", "session")
                # counted once it has joined the session's hub, just after that message
                await until("stt_viewers 1", lambda: viewers_are(1))
            await until("stt_viewers 0 once the viewer left", lambda: viewers_are(0))
            await task

        asyncio.run(scenario())
        # fanout serves GET /v1/models too (read-only: it knows no default model); the
        # session's slot is free again once the worker announces it (every second)
        wait_until("the worker's slots all free in GET /v1/models", lambda: json.loads(
            http_get(base + "/v1/models")[1]) == {"models": [
                {"name": "tiny.en", "workers": 1, "capacity": 8, "free_slots": 8,
                 "devices": ["cpu"]}]}, limit_s=5.0)
        cluster.redis.stop()
        try:
            wait_status(base + "/readyz", 503)
        finally:
            cluster.redis.start()
        wait_status(base + "/readyz", 200)
    finally:
        fan.stop()
