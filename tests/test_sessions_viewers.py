"""Many viewers, and viewers that stop reading: neither slows the session nor the others."""

from __future__ import annotations

import asyncio
import base64
import os
import re
import socket
import statistics
import time
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from common.client import StreamResult, listen_url, stream
from common.messages import Closed, Final, Word, pack_result
from tests.audio_refs import frames, load_pcm16
from tests.conftest import Stack
from tests.procs import Service, free_port, until, wait_port
from tests.test_sessions_e2e import Watched, check_results, watch, with_tail

pytestmark = pytest.mark.integration

VIEWERS = 20


class NonReader:
    """A raw WebSocket client that completes the handshake and then never reads."""

    def __init__(self, host: str, port: int, path: str) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)  # before connect
        self.sock.connect((host, port))
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode())

    def dropped_by_server(self, timeout: float) -> bool:
        """Read everything now: True if the server has ended the connection (EOF or reset)."""
        self.sock.settimeout(timeout)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if not self.sock.recv(1 << 16):
                    return True
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False
        return False

    def close(self) -> None:
        self.sock.close()


async def session(stack: Stack, pcm: np.ndarray, viewers: int,
                  non_reader: bool) -> tuple[StreamResult, list[Watched]]:
    """Stream ``pcm`` at real time; ``viewers`` readers (and a non-reader) attach at once."""
    sid: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    def on_message(m: dict[str, Any]) -> None:
        if m["type"] == "session" and not sid.done():
            sid.set_result(m["session_id"])

    streaming = asyncio.create_task(
        stream(listen_url(stack.ws_url), frames(pcm), pace=1.0, on_message=on_message))
    path = f"/v1/sessions/{await sid}/results?partials=true"
    stalled = NonReader("127.0.0.1", stack.port, path) if non_reader else None
    tasks = [asyncio.create_task(watch(stack.ws_url + path)) for _ in range(viewers)]
    try:
        res = await streaming
        watched = list(await asyncio.wait_for(asyncio.gather(*tasks), 30))
    finally:
        if stalled is not None:
            stalled.close()
    return res, watched


@pytest.mark.long
def test_twenty_viewers_and_one_that_never_reads_leave_latency_unchanged(stack: Stack) -> None:
    pcm = with_tail(load_pcm16("fw_jfk"))
    asyncio.run(stream(listen_url(stack.ws_url), frames(load_pcm16("ds_ldc93s1")), pace=None))
    alone, _ = asyncio.run(session(stack, pcm, 0, False))
    watched_res, watched = asyncio.run(session(stack, pcm, VIEWERS, True))
    base, loaded = alone.time_to_final(), watched_res.time_to_final()
    print(f"\ntime-to-final alone {[round(t, 2) for t in base]}, "
          f"with {VIEWERS} viewers + 1 stalled {[round(t, 2) for t in loaded]}")
    assert len(base) >= 3 and len(loaded) >= 3
    assert statistics.median(loaded) <= statistics.median(base) + 0.5
    sid = watched_res.messages[0].message["session_id"]
    for w in watched:
        check_results(w.results, sid)
        assert w.of("final") == watched_res.finals
        assert w.close_code == 1000


@pytest.fixture(scope="module")
def small_queue_fanout(stack: Stack) -> Iterator[tuple[int, Service]]:
    """python -m fanout with a small viewer queue, so a stalled viewer overflows quickly."""
    port = free_port()
    svc = Service("fanout", ["--host", "127.0.0.1", "--port", str(port), "--viewer-queue", "64",
                             "--slow-viewer-grace-s", "0.5"],
                  {"REDIS_URL": stack.redis.url}, "fanout listening")
    svc.wait_ready()
    wait_port(port)
    yield port, svc
    svc.stop()


def test_a_viewer_that_stops_reading_is_dropped_and_the_others_keep_up(
        stack: Stack, small_queue_fanout: tuple[int, Service]) -> None:
    """A synthetic session publishes 3000 finals of ~1 kB as fast as Redis takes them."""
    port, svc = small_queue_fanout
    r = stack.redis.client()
    sid = uuid.uuid4().hex
    r.hset(f"stt:{{{sid}}}:meta", mapping={"state": "active", "model": "synthetic",
                                           "seq": 0, "created": time.time()})
    n = 3000
    words = tuple(Word(f" w{i}", i * 0.1, i * 0.1 + 0.05, 0.9) for i in range(12))

    def publish() -> float:
        started = time.monotonic()
        for lo in range(0, n, 100):
            pipe = r.pipeline(transaction=False)
            for i in range(lo, lo + 100):
                body = pack_result(Final(sid, i, "x" * 600, i, i + 1.0, words))
                pipe.xadd(f"stt:{{{sid}}}:results", {"seq": i + 1, "m": body, "epoch": 1})
            pipe.execute()
        r.xadd(f"stt:{{{sid}}}:results",
               {"seq": n + 1, "m": pack_result(Closed(sid, n, float(n))), "epoch": 1})
        r.hset(f"stt:{{{sid}}}:meta", mapping={"state": "closed", "seq": n + 1})
        return started

    async def viewers_are(n: int) -> bool:
        def get() -> str:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
                return str(reply.read().decode())

        return re.search(rf"^stt_viewers {n}(\.0)?$", await asyncio.to_thread(get), re.M) \
            is not None

    async def run() -> tuple[Watched, Watched, float]:
        path = f"/v1/sessions/{sid}/results"
        stalled = NonReader("127.0.0.1", port, path)
        fast = [asyncio.create_task(watch(f"ws://127.0.0.1:{port}{path}")) for _ in range(2)]
        await until("the three viewers attached", lambda: viewers_are(3))
        started = await asyncio.to_thread(publish)
        a, b = await asyncio.wait_for(asyncio.gather(*fast), 60)
        dropped = await asyncio.to_thread(stalled.dropped_by_server, 10.0)
        stalled.close()
        assert dropped, "the stalled viewer was not disconnected"
        return a, b, started

    a, b, started = asyncio.run(run())
    for w in (a, b):
        assert [m["seq"] for m in w.results] == list(range(1, n + 2))
        assert w.results[-1]["type"] == "closed" and w.close_code == 1000
    took = max(a.messages[-1][0], b.messages[-1][0]) - started
    print(f"\n{n} results to two readers in {took:.2f} s beside a stalled viewer")
    assert took < 20
    assert f"session {sid}: dropping viewer: too_slow" in svc.log()
