"""One gateway holds more sessions than redis-py's default pool of 100 connections: each
live session's result reader keeps a blocking connection (REDIS_MAX_CONNECTIONS)."""

from __future__ import annotations

import asyncio
import json

import pytest
from websockets.asyncio.client import connect

from common.client import listen_url
from tests.procs import RedisServer, start_gateway

pytestmark = pytest.mark.integration

SESSIONS = 150


def test_150_concurrent_sessions_on_one_gateway_all_open() -> None:
    server = RedisServer()
    server.start()
    gateway, port = start_gateway(server.url, "--max-backlog", "1000",
                                  "--max-sessions-per-ip", str(SESSIONS + 10))
    try:
        async def one(opened: asyncio.Event, all_open: asyncio.Event) -> str:
            async with connect(listen_url(f"ws://127.0.0.1:{port}"), open_timeout=60) as ws:
                hello = json.loads(await ws.recv())
                opened.set()
                await asyncio.wait_for(all_open.wait(), 60)  # all held open at once
                return str(hello["type"])

        async def run() -> list[str]:
            all_open = asyncio.Event()
            events = [asyncio.Event() for _ in range(SESSIONS)]
            tasks = [asyncio.create_task(one(e, all_open)) for e in events]
            opened = asyncio.ensure_future(asyncio.gather(*(e.wait() for e in events)))
            # every session open at once, unless one fails first
            await asyncio.wait([*tasks, opened], return_when=asyncio.FIRST_COMPLETED,
                               timeout=90)
            all_open.set()
            opened.cancel()
            return await asyncio.gather(*tasks)

        assert asyncio.run(run()) == ["session"] * SESSIONS
        assert "MaxConnectionsError" not in gateway.log()
    finally:
        gateway.stop()
        server.stop()
