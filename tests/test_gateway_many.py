"""One gateway holds more sessions than redis-py's default pool of 100 connections: each
live session's result reader keeps a blocking connection (REDIS_MAX_CONNECTIONS)."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from websockets.asyncio.client import connect

from common.client import listen_url
from tests.procs import RedisServer, start_gateway

pytestmark = pytest.mark.integration

SESSIONS = 150


@pytest.mark.long
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


def test_gateway_processes_share_one_port_with_reuse_port() -> None:
    """REUSE_PORT: two gateway processes listen on one port, the kernel spreads the
    connections across them, and each serves whole sessions."""
    server = RedisServer()
    server.start()
    flags = ["--reuse-port", "true", "--max-backlog", "1000", "--max-sessions-per-ip", "100",
             "--close-drain-timeout-s", "1"]  # no transcriber: don't wait for finals
    first, port = start_gateway(server.url, *flags)
    second, _ = start_gateway(server.url, *flags, port=port)
    try:
        async def one() -> str:
            async with connect(listen_url(f"ws://127.0.0.1:{port}")) as ws:
                hello = json.loads(await ws.recv())
                await ws.send(bytes(3200))
                await ws.send(json.dumps({"type": "close"}))
                ws.transport.abort()  # no transcriber will answer: don't wait for the drain
                return str(hello["session_id"])

        async def run() -> list[str]:
            return await asyncio.gather(*(one() for _ in range(40)))

        sids = asyncio.run(run())
        assert len(set(sids)) == 40
        r = server.client()
        deadline = time.monotonic() + 10  # the clients did not wait for their audio to land
        while time.monotonic() < deadline:
            stored = [r.xlen(f"stt:{{{sid}}}:audio") for sid in sids]
            served = [sum(sid in line and "opened" in line for sid in sids for line in g.lines)
                      for g in (first, second)]
            if stored == [2] * 40 and sum(served) == 40:  # a frame and the close marker each
                break
            time.sleep(0.1)
        assert sum(served) == 40 and min(served) >= 5, served
        assert stored == [2] * 40
    finally:
        first.stop()
        second.stop()
        server.stop()
