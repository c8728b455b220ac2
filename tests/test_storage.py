"""A full Redis against the shared stack (real redis-server, gateway and transcriber): the
test sets ``maxmemory`` (with ``noeviction``, as docker-compose.yml does) below or just
above what Redis uses, and always lifts it again.

* Above the watermark, a new session is refused before the upgrade: HTTP 503
  ``storage_full`` with ``Retry-After``; the gauges say so; with room again it is served.
* A live session whose audio Redis refuses past ``STORAGE_FULL_GRACE_S`` ends with
  ``storage_full`` and close 1013 after the finals already made, and resumes once there is
  room: the whole clip is transcribed (WER against the reference), nothing repeated.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from common.client import listen_url, stream
from tests.audio_refs import frames, load_pcm16, reference, wer
from tests.conftest import Stack
from tests.test_sessions_e2e import with_tail

pytestmark = pytest.mark.integration


def used(r: redis.Redis) -> int:
    return int(r.info("memory")["used_memory"])


@contextlib.contextmanager
def maxmemory(r: redis.Redis) -> Iterator[None]:
    r.config_set("maxmemory-policy", "noeviction")
    try:
        yield
    finally:
        r.config_set("maxmemory", 0)


def metric(stack: Stack, name: str) -> float:
    with urllib.request.urlopen(f"{stack.http_url}/metrics", timeout=10) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def test_new_sessions_are_refused_above_the_watermark_with_retry_after(stack: Stack) -> None:
    r = stack.redis.client()

    async def attempt() -> Any:
        try:
            async with connect(listen_url(stack.ws_url)) as ws:
                return json.loads(await ws.recv())
        except InvalidStatus as exc:
            return exc.response

    with maxmemory(r):
        r.config_set("maxmemory", int(used(r) / 0.95))  # 95 % used: above 0.9
        time.sleep(1.2)  # the gateway reads INFO memory once a second
        response = asyncio.run(attempt())
        assert response.status_code == 503, response
        assert int(response.headers["Retry-After"]) == 30
        body = json.loads(response.body)
        assert (body["type"], body["code"]) == ("error", "storage_full"), body
        assert metric(stack, "stt_storage_full") == 1.0
        assert metric(stack, "stt_redis_memory_max_bytes") > 0
    time.sleep(1.2)
    assert asyncio.run(attempt())["type"] == "session"
    assert metric(stack, "stt_storage_full") == 0.0


def test_a_live_session_ends_with_storage_full_and_resumes_when_there_is_room(
        stack: Stack) -> None:
    r = stack.redis.client()
    pcm = with_tail(load_pcm16("fw_jfk"))

    async def run() -> Any:
        errors: list[str] = []
        first_final = asyncio.Event()
        failed = asyncio.Event()

        def on_message(m: dict[str, Any]) -> None:
            if m["type"] == "final":
                first_final.set()
            if m["type"] == "error":
                errors.append(m["code"])
                failed.set()

        async def fill_then_lift() -> None:
            await asyncio.wait_for(first_final.wait(), 30)
            r.config_set("maxmemory", used(r) // 2)  # full: every write refused
            await asyncio.wait_for(failed.wait(), 30)
            await asyncio.sleep(1.0)  # the client's first resume is refused (503)
            r.config_set("maxmemory", 0)

        filler = asyncio.create_task(fill_then_lift())
        res = await stream(listen_url(stack.ws_url), frames(pcm), pace=1.0,
                           on_message=on_message, reconnects=8, reconnect_delay_s=0.7,
                           read_timeout=60)
        await filler
        return res, errors

    with maxmemory(r):
        res, errors = asyncio.run(run())
    assert errors == ["storage_full"]
    codes = [m.message["type"] for m in res.messages]
    assert codes.count("session") == 2 and codes[-1] == "closed", codes
    finals = res.finals
    assert [f["utterance"] for f in finals] == list(range(len(finals)))
    seqs = [m.message["seq"] for m in res.messages if "seq" in m.message]
    assert seqs == sorted(set(seqs))
    assert wer(reference("fw_jfk"), res.text) < 0.15, res.text
