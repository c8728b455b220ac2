"""The service on a Sentinel-managed primary/replica pair (three ``redis-server --sentinel``
processes): ``REDIS_SENTINELS`` names the Sentinels, the services ask them for the primary
and follow a failover. The replica replicates through a relay (``ReplicationLink``): in the
middle of an utterance the relay starts throwing away what the primary sends (the link
stays up: the primary still counts its replica), so 2.5 s of writes, a final among them,
never reach the replica; then the primary is SIGKILLed and the Sentinels promote the
replica without them: a real loss of the primary's last writes. With
``REDIS_REPLICA_ACKS=1`` the client was sent none of them, the worker writes again what was
not acknowledged, and the session goes on: every final once, in order, seq strictly
increasing, and the store equal to what the client got. (Without acknowledgements this test
fails: the client gets results that the promoted replica does not have.)"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from common.client import StreamResult, listen_url, stream
from tests.audio_refs import frames, load_pcm16
from tests.procs import RedisSentinels, start_gateway, start_transcriber, wait_until
from tests.test_pipeline_e2e import check_protocol, with_tail
from tests.test_redis_cluster import FailoverWatch

pytestmark = pytest.mark.integration

JFK = with_tail(load_pcm16("fw_jfk"))


@pytest.fixture
def sentinels() -> Iterator[RedisSentinels]:
    s = RedisSentinels()
    s.start()
    yield s
    s.stop()


def transcript(http_url: str, sid: str) -> list[dict[str, Any]]:
    with urllib.request.urlopen(f"{http_url}/v1/sessions/{sid}/transcript.json",
                                timeout=30) as resp:
        return list(json.loads(resp.read())["utterances"])


def test_a_sentinel_failover_with_a_lagging_replica_loses_and_repeats_nothing(
        sentinels: RedisSentinels) -> None:
    env = {"REDIS_SENTINELS": sentinels.addresses, "REDIS_REPLICA_ACKS": "1",
           "REDIS_REPLICA_ACK_TIMEOUT_MS": "500"}
    # REDIS_URL gives only user, password and database: its host is never asked
    url = "redis://unused.invalid:1/0"
    worker = start_transcriber(url, **env)
    gateway, port = start_gateway(url, **env)
    watch = FailoverWatch()

    async def run() -> StreamResult:
        async def fault() -> None:
            await watch.known.wait()
            await asyncio.sleep(5.0)  # inside "ask not what your country can do for you"
            sentinels.link.hold()  # the primary's writes from now on never reach the replica
            watch.held_at = time.monotonic()
            await asyncio.sleep(2.5)
            watch.killed_at = time.monotonic()
            assert sentinels.primary.proc is not None
            sentinels.primary.proc.kill()
            sentinels.link.cut()

        res, _ = await asyncio.wait_for(asyncio.gather(
            stream(listen_url(f"ws://127.0.0.1:{port}"), frames(JFK), pace=1.0,
                   on_message=watch, reconnects=3),
            fault()), 90)
        return res

    try:
        res = asyncio.run(run())
        check_protocol(res)
        wait_until("the Sentinels name the replica", lambda: sentinels.primary_port() ==
                   sentinels.replica.port, 10)
        assert watch.sid is not None
        stored = transcript(f"http://127.0.0.1:{port}", watch.sid)
    except BaseException:
        print(f"--- worker\n{worker.log()}\n--- gateway\n{gateway.log()}")
        raise
    finally:
        gateway.stop()
        worker.stop()
    watch.check(res, stored)
