"""Delivery to the client's own /v1/listen socket (ingest/listen.py, common/delivery.py)
against a real gateway and redis-server: a client that stops reading is dropped with
``too_slow`` and a bounded number of results, instead of the gateway holding them all."""

from __future__ import annotations

import asyncio
import json

import pytest
import redis.asyncio as aioredis
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from common import keys
from common.messages import Final, pack_result
from tests.procs import RedisServer, Service, start_gateway

pytestmark = pytest.mark.integration

#: Results written while the client does not read, each with this much text.
RESULTS, TEXT = 3000, "word " * 400


def test_a_client_that_stops_reading_is_dropped_with_too_slow(own_redis: RedisServer) -> None:
    gateway, port = start_gateway(own_redis.url, SEND_QUEUE="8")
    try:
        asyncio.run(stalled_client(own_redis.url, port, gateway))
    finally:
        gateway.stop()


async def stalled_client(redis_url: str, port: int, gateway: Service) -> None:
    # max_queue=1: the client library stops reading the TCP socket once it holds one message
    async with connect(f"ws://127.0.0.1:{port}/v1/listen", max_queue=1) as ws:
        sid = json.loads(await ws.recv())["session_id"]
        r = aioredis.Redis.from_url(redis_url)
        try:
            pipe = r.pipeline(transaction=False)
            for i in range(RESULTS):
                final = Final(session_id=sid, utterance=i, text=TEXT, start=i, end=i + 0.5)
                pipe.xadd(keys.results(sid), {"m": pack_result(final), "seq": i + 1})
            await pipe.execute()
            await asyncio.to_thread(gateway.wait_log, "client not reading; dropping it", 30.0)
        finally:
            await r.aclose()
        finals, last = 0, None
        try:
            async for message in ws:
                last = json.loads(message)
                finals += last["type"] == "final"
        except ConnectionClosed:
            pass
        assert last is not None and last["type"] == "error" and last["code"] == "too_slow"
        assert ws.close_code == 1013
        assert finals < RESULTS  # what was not read in time was never queued
