"""Usage is what a bill is made from: after the owning transcriber is SIGKILLed mid-session
and another takes over from the last commit point (transcribing part of the audio a second
time), the tenant's usage still equals the audio sent: received exactly, transcribed within
one frame, and nothing counted twice. Real speech, two workers, a gateway with auth on."""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from common import keys
from common.auth import hash_key, new_key
from common.client import listen_url
from common.tenants import day_of
from tests.audio_refs import frames, load_pcm16, reference, wer
from tests.procs import Cluster
from tests.test_pipeline_e2e import check_protocol, with_tail
from tests.test_resilience import SessionWatch

pytestmark = pytest.mark.integration

KEY = new_key()
JFK = with_tail(load_pcm16("fw_jfk"))
FRAME = 1600  # the client's 100 ms frames


@pytest.fixture
def cluster(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    c = Cluster(workers=2, worker_args=["--lease-ms", "3000", "--usage-report-s", "0.5"],
                gateway_args=["--auth", "required", "--api-keys",
                              f"web={hash_key(KEY)};tenant=acme", "--usage-report-s", "0.5"])
    yield c
    failed = getattr(request.node, "rep_call", None)
    c.close()
    if failed is not None and failed.failed:
        print(c.logs())


def usage(cluster: Cluster) -> dict[str, int]:
    raw = cluster.redis.client().hgetall(keys.usage("acme", day_of(time.time())))
    return {k.decode(): int(v) for k, v in raw.items()}


def test_usage_equals_the_audio_sent_after_a_worker_sigkill_failover(cluster: Cluster) -> None:
    watch = SessionWatch()
    at_kill: dict[str, Any] = {}

    def before(owner: str) -> None:
        assert watch.sid is not None
        at_kill.update(usage(cluster), owner=owner,
                       processed=int(cluster.meta(watch.sid)["processed_sample"]),
                       committed=int(cluster.meta(watch.sid)["commit_sample"]))

    res = watch.stream_through_owner_kill(cluster, listen_url(cluster.ws_url), frames(JFK), 6.0,
                                          before, headers={"Authorization": f"Bearer {KEY}"})
    check_protocol(res)
    assert res.close_code == 1000
    assert cluster.owner(watch.sid or "") != at_kill["owner"]  # it failed over
    assert wer(reference("fw_jfk"), res.text) <= 0.15, res.text
    # the killed worker had counted audio past the commit point its successor went back to:
    # that audio was transcribed twice and must be counted once
    assert at_kill.get("transcribed:tiny.en", 0) > at_kill["committed"], at_kill
    final = usage(cluster)
    print(f"\nusage after the failover: {final}; sent {len(JFK)} samples; at the kill "
          f"{at_kill}")
    assert final["received:tiny.en"] == len(JFK)
    assert abs(final["transcribed:tiny.en"] - len(JFK)) <= FRAME

    conn = http.client.HTTPConnection("127.0.0.1", cluster.port, timeout=10)
    conn.request("GET", "/v1/usage", headers={"Authorization": f"Bearer {KEY}"})
    body = json.loads(conn.getresponse().read())
    assert body["usage"] == [{
        "tenant": "acme", "day": day_of(time.time()), "model": "tiny.en",
        "received_s": round(len(JFK) / 16000, 3),
        "transcribed_s": round(final["transcribed:tiny.en"] / 16000, 3),
        "received_samples": len(JFK), "transcribed_samples": final["transcribed:tiny.en"]}]
    conn.close()
    # the metric, summed over the gateway and the surviving worker (which counts the audio
    # received after the gateway's last report as it closes the session), is the same
    survivor = cluster.owner(watch.sid or "") or ""
    record = json.loads(cluster.redis.client().hget(keys.WORKERS, survivor) or b"{}")
    received = sum(metric(port, "received") for port in (cluster.port, record["metrics_port"]))
    assert abs(received - len(JFK) / 16000) < 1e-6
    # the survivor counted what the killed worker had not (it had reported up to where it
    # was killed, give or take the report it may have made in between)
    assert abs(metric(record["metrics_port"], "transcribed") - (
        final["transcribed:tiny.en"] - at_kill["transcribed:tiny.en"]) / 16000) <= 0.5


def metric(port: int, kind: str) -> float:
    """stt_usage_audio_seconds_total of tenant acme for ``kind`` on one process (0: none)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    want = f'stt_usage_audio_seconds_total{{kind="{kind}",model="tiny.en",tenant="acme"}}'
    return sum(float(x.split()[-1]) for x in text.splitlines() if x.startswith(want))
