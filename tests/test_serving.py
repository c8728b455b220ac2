"""Serving HTTP and WebSocket with aiohttp (common/serving.py, common/web.py).

* The request head bounds, the handshake timeout and the keepalive pings of
  ``ConnectionGuard``, fed bytes by hand (no sockets): what aiohttp gets, what is answered,
  what waits.
* The gateway and ``python -m fanout`` serve HTTP and WebSocket on one port; one request per
  connection; read endpoints refuse other methods with 405 (``POST /v1/sessions/{id}``
  deletes nothing); an audio export longer than the old one-response cap (3600 s) is
  streamed with its exact length and header while the server's memory stays flat.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import re
import signal
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from websockets.asyncio.client import connect

from common.access import PeerLimits
from common.messages import AudioFrame
from common.serving import (
    MAX_HEADERS,
    MAX_LINE_BYTES,
    SINGLETON_HEADERS,
    ConnectionGuard,
    Connections,
)
from common.sessions import Sessions, create_session
from tests.procs import RedisServer, Service, free_port, start_gateway, wait_port

# --------------------------------------------------------------------------- the guard alone


class Transport(asyncio.Transport):
    def __init__(self, peer: tuple[str, int] = ("192.0.2.7", 40000)) -> None:
        super().__init__()
        self.peer = peer
        self.written = bytearray()
        self.paused = False
        self.aborted = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.peer if name == "peername" else default

    def write(self, data: Any) -> None:
        self.written += data

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def abort(self) -> None:
        self.aborted = True

    def is_closing(self) -> bool:
        return self.aborted


class Inner(asyncio.Protocol):
    """Stands in for aiohttp's RequestHandler: what it was given."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.started = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.started = True

    def data_received(self, data: bytes) -> None:
        self.data += data


def guard(limits: PeerLimits | None = None, max_request_bytes: int = 32768,
          timeout_s: float = 10.0) -> tuple[ConnectionGuard, Inner, Transport]:
    inner, transport = Inner(), Transport()
    g = ConnectionGuard(inner, Connections(limits, max_request_bytes, timeout_s))
    g.connection_made(transport)
    return g, inner, transport


def status(transport: Transport) -> int | None:
    m = re.match(rb"HTTP/1\.1 (\d{3}) ", bytes(transport.written))
    return int(m.group(1)) if m else None


HEAD = b"GET /v1/listen HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n"


async def test_a_head_in_single_bytes_reaches_aiohttp_whole_and_what_follows_waits() -> None:
    g, inner, transport = guard()
    for i in range(len(HEAD) - 1):
        g.data_received(HEAD[i:i + 1])
    assert bytes(inner.data) == HEAD[:-1] and not transport.paused
    g.data_received(HEAD[-1:])  # the head's end: reading stops until the handler says
    assert bytes(inner.data) == HEAD and transport.paused


async def test_bytes_after_the_head_wait_until_the_handler_reads_on() -> None:
    g, inner, transport = guard()
    g.data_received(HEAD + b"FRAME")
    assert bytes(inner.data) == HEAD and transport.paused
    g.data_received(b"MORE")  # already in flight when reading paused
    g.read_on()
    assert bytes(inner.data) == HEAD + b"FRAMEMORE" and not transport.paused
    g.data_received(b"LATER")
    assert bytes(inner.data).endswith(b"LATER")


async def test_empty_lines_before_the_request_and_a_split_crlf() -> None:
    g, inner, transport = guard()
    g.data_received(b"\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r")
    assert not transport.paused  # "\r" alone does not end the head
    g.data_received(b"\nBODY")
    assert transport.paused and bytes(inner.data).endswith(b"Host: x\r\n\r\n")


@pytest.mark.parametrize("head, code", [
    (b"GET /" + b"a" * MAX_LINE_BYTES + b" HTTP/1.1\r\n\r\n", 414),
    (b"GET / HTTP/1.1\r\nX: " + b"a" * MAX_LINE_BYTES + b"\r\n\r\n", 431),
    (b"GET / HTTP/1.1\r\n" + b"X: a\r\n" * (MAX_HEADERS + 1) + b"\r\n", 431),
    (b"GET / HTTP/1.1\r\n" + b"X-Pad: " + b"a" * 900 + b"\r\n" * 1, 431),  # over 512 bytes
])
async def test_heads_over_a_bound_are_answered_and_the_rest_discarded(head: bytes,
                                                                        code: int) -> None:
    g, inner, transport = guard(max_request_bytes=512 if code == 431 and b"X-Pad" in head
                                else 32768)
    for i in range(0, len(head), 100):
        g.data_received(head[i:i + 100])
    assert status(transport) == code, bytes(transport.written)
    assert b"Connection: close" in transport.written
    assert len(inner.data) < len(head)  # aiohttp never got the whole head
    given = len(inner.data)
    g.data_received(b"x" * 100000)  # discarded, not buffered
    assert len(inner.data) == given and not transport.aborted


@pytest.mark.parametrize("split", [1, 7, 1000])
async def test_a_header_aiohttp_takes_once_repeated_is_a_json_400(split: int) -> None:
    """aiohttp would answer a second Host with a plain-text HTTP/1.0 400 and log a
    traceback at ERROR; the guard answers it as the service answers a repeated header."""
    head = b"GET / HTTP/1.1\r\nHost: a\r\nX: 1\r\nhOST : b\r\n\r\n"
    g, _, transport = guard()
    for i in range(0, len(head), split):
        g.data_received(head[i:i + split])
    assert status(transport) == 400
    body = json.loads(bytes(transport.written).partition(b"\r\n\r\n")[2])
    assert body == {"type": "error", "code": "bad_request", "message": "send one Host header"}


def test_the_guard_knows_every_header_aiohttp_refuses_twice() -> None:
    from aiohttp.http_parser import SINGLETON_HEADERS as AIOHTTP_SINGLETONS

    assert set(AIOHTTP_SINGLETONS) <= set(SINGLETON_HEADERS)


async def test_a_head_just_within_the_bounds_is_not_refused() -> None:
    line = b"X: " + b"a" * (MAX_LINE_BYTES - 5) + b"\r\n"  # exactly MAX_LINE_BYTES
    head = b"GET / HTTP/1.1\r\n" + line + b"Y: b\r\n" * (MAX_HEADERS - 1) + b"\r\n"
    g, inner, transport = guard(max_request_bytes=len(head))
    g.data_received(head)
    assert status(transport) is None and bytes(inner.data) == head and transport.paused


async def test_the_handshake_timeout_cuts_a_connection_until_it_is_answered() -> None:
    g, _, transport = guard(timeout_s=0.05)
    g.data_received(b"GET / HTTP/1.1\r\n")
    await asyncio.sleep(0.1)
    assert transport.aborted and status(transport) is None
    g, _, transport = guard(timeout_s=0.05)
    g.data_received(HEAD)
    g.answered()
    await asyncio.sleep(0.1)
    assert not transport.aborted


class OpenSocket:
    closed = False


async def test_a_silent_websocket_is_pinged_then_cut_and_a_pong_keeps_it() -> None:
    g, _, transport = guard()
    g.data_received(HEAD)
    g.read_on()
    g.keep_alive(OpenSocket(), 0.05)  # type: ignore[arg-type]
    await asyncio.sleep(0.07)
    assert bytes(transport.written) == b"\x89\x00" and not transport.aborted  # a ping
    g.data_received(b"\x8a\x80abcd")  # the client's (masked, empty) pong
    await asyncio.sleep(0.05)
    assert not transport.aborted and bytes(transport.written) == b"\x89\x00"
    await asyncio.sleep(0.1)  # silent again: pinged, then cut
    assert transport.aborted and bytes(transport.written) == b"\x89\x00" * 2


async def test_a_closed_websocket_is_not_pinged() -> None:
    g, _, transport = guard()
    g.data_received(HEAD)
    g.read_on()
    ws = OpenSocket()
    g.keep_alive(ws, 0.02)  # type: ignore[arg-type]
    ws.closed = True
    await asyncio.sleep(0.1)
    assert not transport.written and not transport.aborted


async def test_connections_over_the_peer_caps_are_cut_before_anything_is_read() -> None:
    limits = PeerLimits(max_handshakes=2, max_connections=3, max_request_bytes=32768)
    first, _, _ = guard(limits)
    second, _, _ = guard(limits)
    third, inner, transport = guard(limits)  # a third unanswered one
    assert transport.aborted and not inner.started
    first.answered()  # answered: it still counts as open
    third, inner, transport = guard(limits)
    assert not transport.aborted and inner.started
    fourth, inner, transport = guard(limits)  # three open
    assert transport.aborted
    second.connection_lost(None)
    fourth, inner, transport = guard(limits)
    assert not transport.aborted
    del first, third, fourth


# --------------------------------------------------------------------------- the servers

def fanout_service(redis_url: str) -> tuple[Service, int]:
    port = free_port()
    svc = Service("fanout", ["--host", "127.0.0.1", "--port", str(port)],
                  {"REDIS_URL": redis_url, "AUTH": "off"}, "fanout listening")
    svc.wait_ready()
    wait_port(port)
    return svc, port


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[RedisServer, dict[str, int], dict[str, Service]]]:
    server = RedisServer()
    server.start()
    gateway, gport = start_gateway(server.url, AUTH="off", MAX_BACKLOG="100000")
    fanout, fport = fanout_service(server.url)
    yield server, {"gateway": gport, "fanout": fport}, {"gateway": gateway, "fanout": fanout}
    fanout.stop()
    gateway.stop()
    server.stop()


def request(port: int, method: str, path: str,
            headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


@pytest.fixture(scope="module")
def recorded(servers: tuple[RedisServer, dict[str, int], dict[str, Service]]) -> str:
    """A closed /v1/listen session (0.5 s of silence) on the gateway: its id."""
    _, ports, _ = servers

    async def record() -> str:
        async with connect(f"ws://127.0.0.1:{ports['gateway']}/v1/listen") as ws:
            sid = str(json.loads(await ws.recv())["session_id"])
            await ws.send(bytes(16000))
        return sid
    return asyncio.run(record())


@pytest.mark.integration
def test_the_gateway_serves_the_page_http_and_websockets_on_one_port(
        servers: tuple[RedisServer, dict[str, int], dict[str, Service]], recorded: str) -> None:
    _, ports, _ = servers
    port = ports["gateway"]
    status, headers, body = request(port, "GET", "/")
    assert status == 200 and b"<html" in body.lower()
    assert headers["Content-Type"] == "text/html; charset=utf-8"
    assert headers["Cache-Control"] == "no-cache"
    status, headers, _ = request(port, "GET", "/app.js")
    assert status == 200 and headers["Content-Type"].endswith("javascript; charset=utf-8")
    for path in ("/nope.js", "/static/app.js", "/.env", "/%61pp.js", "/v1/%6Cisten"):
        status, _, body = request(port, "GET", path)
        assert (status, body) == (404, b"not found\n"), path
    assert request(port, "GET", "/healthz")[::2] == (200, b"ok\n")
    assert request(port, "GET", "/readyz")[::2] == (200, b"ready\n")
    status, _, body = request(port, "GET", "/metrics")
    assert status == 200 and b"stt_gateway_sessions_opened_total" in body
    status, _, body = request(port, "GET", "/v1/sessions?limit=5")
    assert status == 200 and recorded in body.decode()

    async def sockets() -> None:
        url = f"ws://127.0.0.1:{port}"
        async with connect(f"{url}/v1/listen", subprotocols=["stt", "bearer.abc"]) as ws:
            assert ws.subprotocol == "stt"  # the bearer entry is never echoed
            assert json.loads(await ws.recv())["type"] == "session"
        async with connect(f"{url}/v1/sessions/{recorded}/results") as viewer:
            assert json.loads(await viewer.recv())["viewer"] is True
    asyncio.run(sockets())


@pytest.mark.integration
def test_fanout_serves_http_and_websockets_on_one_port(
        servers: tuple[RedisServer, dict[str, int], dict[str, Service]], recorded: str) -> None:
    _, ports, _ = servers
    port = ports["fanout"]
    assert request(port, "GET", "/healthz")[::2] == (200, b"ok\n")
    assert request(port, "GET", "/readyz")[::2] == (200, b"ready\n")
    status, _, body = request(port, "GET", "/metrics")
    assert status == 200 and b"stt_viewers" in body
    status, _, body = request(port, "GET", f"/v1/sessions/{recorded}")
    assert status == 200 and json.loads(body)["session_id"] == recorded
    status, _, body = request(port, "GET", "/health%7A")
    assert status == 404 and json.loads(body)["code"] == "not_found"

    async def viewer() -> None:
        async with connect(f"ws://127.0.0.1:{port}/v1/sessions/{recorded}/results") as ws:
            assert json.loads(await ws.recv())["viewer"] is True
    asyncio.run(viewer())


@pytest.mark.integration
@pytest.mark.parametrize("server", ["gateway", "fanout"])
def test_one_request_per_connection(
        servers: tuple[RedisServer, dict[str, int], dict[str, Service]], server: str) -> None:
    """Two requests on one connection: the first is answered with Connection: close, the
    second is never read."""
    _, ports, _ = servers

    async def pipelined() -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", ports[server])
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" * 2)
        out = await asyncio.wait_for(reader.read(), 10)  # until the server closes
        writer.close()
        return out
    answer = asyncio.run(pipelined())
    assert answer.count(b"HTTP/1.1 ") == 1 and b"Connection: close" in answer, answer


@pytest.mark.integration
@pytest.mark.parametrize("server", ["gateway", "fanout"])
def test_read_endpoints_refuse_other_methods(
        servers: tuple[RedisServer, dict[str, int], dict[str, Service]], recorded: str,
        server: str) -> None:
    """DELETE (but on the session itself), POST, PUT, PATCH on a read endpoint: 405
    method_not_allowed with the JSON error and an Allow header, and nothing happens to the
    session."""
    _, ports, _ = servers
    port = ports[server]
    paths = ["/v1/sessions", f"/v1/sessions/{recorded}", f"/v1/sessions/{recorded}/",
             f"/v1/sessions/{recorded}/audio.wav",
             f"/v1/sessions/{recorded}/transcript.json"]
    deletable = {f"/v1/sessions/{recorded}", f"/v1/sessions/{recorded}/"} \
        if server == "gateway" else set()  # fanout is the read side
    for path in paths:
        for method in ("DELETE", "POST", "PUT", "PATCH"):
            if method == "DELETE" and path in deletable:
                continue  # a session is deleted there (tests/test_delete.py)
            status, headers, body = request(port, method, path)
            assert status == 405, (method, path, status, body)
            err = json.loads(body)
            assert (err["type"], err["code"]) == ("error", "method_not_allowed"), err
            assert headers["Allow"] == ("GET, HEAD, DELETE" if path in deletable
                                        else "GET, HEAD")
    status, headers, body = request(port, "DELETE", f"/v1/sessions/{recorded}/results")
    assert status == 405 and headers["Allow"] == "GET"
    assert request(port, "GET", f"/v1/sessions/{recorded}")[0] == 200  # still there
    status, headers, body = request(port, "HEAD", f"/v1/sessions/{recorded}/audio.wav")
    assert (status, body) == (200, b"") and headers["Content-Length"] == str(44 + 16000)


def rss_mb(svc: Service) -> float:
    m = re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{svc.proc.pid}/status").read_text())
    assert m is not None
    return int(m.group(1)) / 1024


LONG_S = 3601  # past the old cap on one response (EXPORT_MAX_AUDIO_S, 3600 s)
ENTRY = 1600  # 100 ms entries, as a live client's


def long_entry(k: int) -> bytes:
    """Entry ``k``'s samples: a ramp that differs from one entry to the next."""
    return ((np.arange(ENTRY, dtype=np.int32) + k * 7) % 65536 - 32768).astype("<i2").tobytes()


@pytest.mark.integration
def test_an_audio_export_longer_than_an_hour_is_streamed(
        servers: tuple[RedisServer, dict[str, int], dict[str, Service]]) -> None:
    """More than an hour of audio (115 MB of WAV; one response used to carry at most
    3600 s, built in memory): the header says its exact size, every sample arrives in
    order, and the fanout's memory grows by a fraction of the body."""
    redis_server, ports, services = servers
    sid = "e" * 32
    entries = LONG_S * 16000 // ENTRY

    async def write() -> None:
        async with redis_server.aclient() as r:
            await create_session(r, sid, {"model": "tiny.en"})
            records = Sessions(r, 500)
            for first in range(0, entries, 500):
                batch = [AudioFrame(k + 1, k * ENTRY, long_entry(k))
                         for k in range(first, min(first + 500, entries))]
                assert await records.append(sid, 1, batch)
    asyncio.run(write())

    svc = services["fanout"]
    before = rss_mb(svc)
    peak = before
    conn = http.client.HTTPConnection("127.0.0.1", ports["fanout"], timeout=60)
    began = time.monotonic()
    try:
        conn.request("GET", f"/v1/sessions/{sid}/audio.wav")
        resp = conn.getresponse()
        assert resp.status == 200 and resp.getheader("Content-Type") == "audio/wav"
        size = 44 + 2 * entries * ENTRY
        assert resp.getheader("Content-Length") == str(size)
        assert resp.getheader("Transfer-Encoding") is None
        header = resp.read(44)
        riff, riff_size, wave, _fmt, _, _, channels, rate, _, _, bits, data, data_size = \
            struct.unpack("<4sI4s4sIHHIIHH4sI", header)
        assert (riff, wave, data) == (b"RIFF", b"WAVE", b"data")
        assert (riff_size, data_size) == (size - 8, size - 44)
        assert (channels, rate, bits) == (1, 16000, 16)
        for k in range(entries):
            chunk = resp.read(2 * ENTRY)
            if chunk != long_entry(k):
                pytest.fail(f"entry {k} differs ({len(chunk)} bytes)")
            if k % 2000 == 0:
                peak = max(peak, rss_mb(svc))
        assert resp.read() == b""
    finally:
        conn.close()
    took = time.monotonic() - began
    grown = peak - before
    print(f"\n{size / 1e6:.0f} MB exported in {took:.1f} s; fanout RSS +{grown:.1f} MB")
    assert grown < 30, f"the fanout grew by {grown:.0f} MB during a {size >> 20} MiB export"
    with contextlib.suppress(Exception):
        redis_server.client().delete(f"stt:{{{sid}}}:audio")


@pytest.mark.integration
def test_a_stopping_gateway_cuts_a_client_that_does_not_answer_its_1012(
        own_redis: RedisServer) -> None:
    """A client that stopped reading cannot hold a stopping gateway for the whole close
    timeout: it gets ``OpenSockets.close_all``'s wait (3 s), then its connection is cut."""
    gateway, port = start_gateway(own_redis.url)

    async def stalled() -> float:
        # max_queue=1: holding the unread 'session' message, the client library stops
        # reading its socket, so it never sees (nor answers) the server's close frame
        async with connect(f"ws://127.0.0.1:{port}/v1/listen", max_queue=1):
            # the gateway logs the opening after it sent the 'session' message
            await asyncio.to_thread(gateway.wait_log, ": opened (")
            started = time.monotonic()
            gateway.signal(signal.SIGTERM)
            await asyncio.to_thread(gateway.proc.wait, 30)
            return time.monotonic() - started

    try:
        took = asyncio.run(stalled())
    finally:
        gateway.stop()
    assert took < 8.0, f"the gateway took {took:.1f} s to stop"
    assert gateway.proc.returncode == 0
