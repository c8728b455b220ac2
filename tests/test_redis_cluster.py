"""The service on a real Redis Cluster: 3 primaries and 3 replicas (``redis-server
--cluster-enabled yes`` joined by ``redis-cli --cluster create``), two transcribers and two
gateways whose ``REDIS_URL`` names one node (cluster mode detected).

* a live session with partials and finals, a viewer attached mid-session, listing,
  exports and a replay;
* a worker SIGKILLed mid-session and the gateway stopped under the client: the session
  fails over to the other worker and resumes on the other gateway, nothing lost or repeated;
* deletion removes every key of the session from the node that holds it;
* the primary of a live session's slot killed while its replica lagged behind (paused):
  with ``REDIS_REPLICA_ACKS=1`` (on for this whole module) nothing the client saw is lost
  and no final is lost, repeated or renumbered.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from websockets.asyncio.client import connect

from common.client import StreamResult, listen_url, stream
from tests.audio_refs import frames, load_pcm16, reference, wer
from tests.procs import RedisClusterServers, Service, start_gateway, start_transcriber
from tests.test_pipeline_e2e import check_protocol, with_tail
from tests.test_resilience import SessionWatch

pytestmark = pytest.mark.integration

LEASE_MS = 3000
#: Writes wait for a replica, and clients are sent what replicas hold (common/replication.py).
ACKS = {"REDIS_REPLICA_ACKS": "1", "REDIS_REPLICA_ACK_TIMEOUT_MS": "500"}
JFK = with_tail(load_pcm16("fw_jfk"))


class Deployment:
    def __init__(self) -> None:
        self.redis = RedisClusterServers(masters=3, replicas=1)
        self.redis.start()
        self.workers = {name: start_transcriber(self.redis.url, "--consumer", name,
                                                "--lease-ms", str(LEASE_MS), **ACKS)
                        for name in ("w1", "w2")}
        self.gateways: list[tuple[Service, int]] = [start_gateway(self.redis.url, **ACKS)
                                                     for _ in range(2)]

    def url(self, i: int, scheme: str = "ws") -> str:
        return f"{scheme}://127.0.0.1:{self.gateways[i][1]}"

    def meta(self, sid: str) -> dict[str, str]:
        c = self.redis.client()
        try:
            raw = c.hgetall(f"stt:{{{sid}}}:meta")
        finally:
            c.close()
        return {k.decode(): v.decode(errors="replace") for k, v in raw.items()}

    def logs(self) -> str:
        return "\n".join(f"--- {name}\n{svc.log()}" for name, svc in
                         [*self.workers.items(), *((f"gateway{i}", g) for i, (g, _) in
                                                   enumerate(self.gateways))])

    def close(self) -> None:
        for svc, _ in self.gateways:
            svc.stop()
        for svc in self.workers.values():
            svc.stop()
        self.redis.stop()


@pytest.fixture(scope="module")
def deployment(request: pytest.FixtureRequest) -> Iterator[Deployment]:
    d = Deployment()
    yield d
    d.close()


def get(url: str, method: str = "GET") -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method=method),
                                    timeout=60) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


async def watch(url: str) -> list[dict[str, Any]]:
    async with connect(url, max_size=None) as ws:
        return [json.loads(m) async for m in ws]


def test_a_session_streams_is_viewed_listed_exported_and_replayed(
        deployment: Deployment) -> None:
    async def run() -> tuple[StreamResult, list[dict[str, Any]]]:
        first_final = asyncio.Event()
        sid: list[str] = []

        def on_message(m: dict[str, Any]) -> None:
            if m["type"] == "session":
                sid.append(m["session_id"])
            elif m["type"] == "final":
                first_final.set()

        client = asyncio.create_task(stream(listen_url(deployment.url(0)), frames(JFK),
                                            pace=2.0, on_message=on_message))
        await asyncio.wait_for(first_final.wait(), 30)
        viewer = asyncio.create_task(watch(
            f"{deployment.url(1)}/v1/sessions/{sid[0]}/results?partials=true"))
        return await client, await asyncio.wait_for(viewer, 30)

    res, viewed = asyncio.run(run())
    check_protocol(res)
    assert res.partials, "partials on a cluster too"
    assert wer(reference("fw_jfk"), res.text) <= 0.10, res.text
    sid = res.messages[0].message["session_id"]
    assert [m["type"] for m in viewed][-1] == "closed"
    assert [f["text"] for f in viewed if f["type"] == "final"] == \
        [f["text"] for f in res.finals]

    http = deployment.url(1, "http")
    status, body = get(f"{http}/v1/sessions?limit=50")
    assert status == 200 and sid in [s["session_id"] for s in json.loads(body)["sessions"]]
    status, body = get(f"{http}/v1/sessions/{sid}/transcript.txt")
    assert status == 200 and b"fellow Americans" in body
    status, body = get(f"{http}/v1/sessions/{sid}/audio.wav")
    assert status == 200 and len(body) == 44 + 2 * len(JFK)
    assert np.array_equal(np.frombuffer(body[44:], "<i2"), JFK)

    # the worker registry (one key, read with TIME) answers on a cluster too
    status, body = get(f"{http}/v1/models")
    assert status == 200 and [m["name"] for m in json.loads(body)["models"]] == ["tiny.en"]

    replayed = asyncio.run(watch(f"{deployment.url(0)}/v1/sessions/{sid}/replay?speed=max"))
    text = " ".join(m["text"] for m in replayed if m["type"] == "final")
    assert replayed[-1]["type"] == "closed" and wer(reference("fw_jfk"), text) <= 0.10, text


def test_worker_sigkill_and_a_gateway_stop_mid_session_lose_and_repeat_nothing(
        deployment: Deployment) -> None:
    """The owner is SIGKILLed at 3 s (the other worker takes over after the lease); the
    gateway the client talks to stops at 7 s (1012: the client resumes on the other one)."""
    watch = SessionWatch()
    events: dict[str, Any] = {}

    async def run() -> StreamResult:
        on_message = watch

        async def faults() -> None:
            await watch.known.wait()
            started = time.monotonic()
            await asyncio.sleep(3.0)
            owner = deployment.meta(watch.sid).get("owner")
            assert owner in deployment.workers
            events["killed"] = owner
            deployment.workers[owner].signal(signal.SIGKILL)
            await asyncio.sleep(7.0 - (time.monotonic() - started))
            await asyncio.to_thread(deployment.gateways[0][0].stop)

        res, _ = await asyncio.gather(
            stream(listen_url(deployment.url(0)), frames(JFK), pace=1.0, on_message=on_message,
                   reconnects=3, resume_urls=[deployment.url(1)]),
            faults())
        return res

    try:
        res = asyncio.run(run())
        check_protocol(res)
        assert sum(m.message["type"] == "session" for m in res.messages) == 2  # resumed once
        assert deployment.meta(watch.sid)["owner"] != events["killed"]
        assert wer(reference("fw_jfk"), res.text) <= 0.10, res.text
    finally:
        killed = events.get("killed")
        if killed is not None:  # the module's later tests have two workers again
            deployment.workers[killed] = start_transcriber(
                deployment.redis.url, "--consumer", killed + "b", "--lease-ms", str(LEASE_MS),
                **ACKS)
        deployment.gateways[0] = start_gateway(deployment.redis.url, **ACKS)


def test_deletion_removes_every_key_of_the_session_from_its_node(
        deployment: Deployment) -> None:
    res = asyncio.run(stream(listen_url(deployment.url(0)), frames(load_pcm16("ds_ldc93s1")),
                             pace=None))
    sid = res.messages[0].message["session_id"]
    c = deployment.redis.client()
    try:
        assert c.exists(*(f"stt:{{{sid}}}:{k}" for k in ("meta", "audio", "results"))) == 3
        assert get(f"{deployment.url(1, 'http')}/v1/sessions/{sid}", "DELETE")[0] == 204
        node = c.get_node_from_key(f"stt:{{{sid}}}:meta")
        left = list(c.scan_iter(match=f"*{sid}*", target_nodes=node))
        assert left == [] and c.zscore("stt:index", sid) is None
    finally:
        c.close()
    assert get(f"{deployment.url(0, 'http')}/v1/sessions/{sid}")[0] == 404


class FailoverWatch(SessionWatch):
    """A SessionWatch that times every message, for a test that holds replication back
    (``held_at``) and then kills the primary (``killed_at``)."""

    def __init__(self) -> None:
        super().__init__()
        self.got_at: list[tuple[float, dict[str, Any]]] = []
        self.held_at = self.killed_at = self.next_result_at = 0.0

    def __call__(self, msg: dict[str, Any]) -> None:
        super().__call__(msg)
        now = time.monotonic()
        self.got_at.append((now, msg))
        if self.killed_at and not self.next_result_at and msg["type"] in ("partial", "final"):
            self.next_result_at = now

    def check(self, res: StreamResult, stored: list[dict[str, Any]]) -> None:
        """Nothing the replica lacked reached the client, and the store is what it got."""
        print(f"\nreplication held back, primary killed: next result "
              f"{self.next_result_at - self.killed_at:.2f} s later")
        assert wer(reference("fw_jfk"), res.text) <= 0.10, res.text
        # while replication was held back the client got nothing new (a short grace for
        # results read from the replica just before)
        quiet = [m for t, m in self.got_at if self.held_at + 0.3 < t < self.killed_at
                 and m["type"] in ("partial", "final")]
        assert quiet == [], "the client was sent results the replica did not hold"
        # no final lost to the asynchronous replication, none twice, seq strictly increasing
        assert [(u["utterance"], u["seq"], u["text"]) for u in stored] == \
            [(f["utterance"], f["seq"], f["text"]) for f in res.finals if f["text"]]


def test_killing_the_primary_of_a_live_sessions_slot_loses_and_repeats_no_final(
        deployment: Deployment) -> None:
    """The replica of the primary that holds the session's slot is paused (SIGSTOP) at 5 s,
    so the primary's writes of the next 2.5 s (the final of "ask not what your country can do
    for you" among them) are not replicated; then that primary is SIGKILLed and the replica,
    resumed, is promoted without them (cluster-node-timeout 2 s). With writes waiting for a
    replica (REDIS_REPLICA_ACKS=1) the client was sent nothing the replica lacked, the worker
    writes again what was not acknowledged, and the session goes on: every final once, in
    order, seq strictly increasing, the store equal to what the client got."""
    watch = FailoverWatch()

    async def run() -> StreamResult:
        async def fault() -> None:
            await watch.known.wait()
            await asyncio.sleep(5.0)  # inside "ask not what your country can do for you"
            primary = deployment.redis.master_of(f"stt:{{{watch.sid}}}:meta")
            replica = deployment.redis.replica_of(primary)
            deployment.redis.pause(replica)
            watch.held_at = time.monotonic()
            await asyncio.sleep(2.5)
            watch.killed_at = time.monotonic()
            deployment.redis.kill(primary)
            deployment.redis.resume(replica)

        res, _ = await asyncio.wait_for(asyncio.gather(
            stream(listen_url(deployment.url(0)), frames(JFK), pace=1.0, on_message=watch,
                   reconnects=3),
            fault()), 60)
        return res

    try:
        res = asyncio.run(run())
        check_protocol(res)  # seq strictly increasing, one closed, ...
    except BaseException:
        print(deployment.logs())  # the services' own account, for diagnosis
        raise
    status, body = get(f"{deployment.url(1, 'http')}/v1/sessions/{watch.sid}/transcript.json")
    assert status == 200, (body, deployment.logs())
    watch.check(res, json.loads(body)["utterances"])
