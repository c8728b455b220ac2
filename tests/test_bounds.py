"""Bounds on what one client with one valid API key can take from a gateway or a fanout.

Real sockets against a real gateway and a real ``python -m fanout`` with authentication on
(a real redis-server and transcriber behind them), while a well-behaved client streams the
JFK clip at real time through the gateway (the bystander of tests/test_security.py): after
every case it must still be receiving, and every one of its sessions must close 1000 with
WER <= 0.10.

Two kinds of client address: the test client is a trusted proxy (``TRUSTED_PROXIES=
127.0.0.1``) and names a client in ``X-Forwarded-For``, for the caps counted after the
request is read (viewers, request rates); the caps counted when a connection is accepted,
before anything is read, see the peer address only, so those probes connect from other
loopback addresses (127.0.x.y), which are not trusted.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import itertools
import json
import os
import re
import secrets
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from common.auth import hash_key, new_key
from tests.procs import (
    RedisServer,
    Service,
    free_port,
    start_transcriber,
    until,
    wait_port,
    wait_until,
)
from tests.test_logs import percent_encoded
from tests.test_security import (
    CLOSE,
    KEY_BYSTANDER,
    Bystander,
    Outcome,
    Secure,
    next_ip,
    pcm,
)

pytestmark = pytest.mark.integration

KEY, KEY_B, KEY_HOLD, KEY_ENCODED = new_key(), new_key(), new_key(), new_key()
SECRET = secrets.token_urlsafe(40)
VIEWERS, VIEWERS_PER_IP, VIEWERS_PER_KEY = 40, 3, 5
HANDSHAKES_PER_IP, CONNECTIONS_PER_IP = 4, 8
IP_BURST = 20
HEADER_BYTES = 32768  # MAX_REQUEST_HEADER_BYTES, the default
CONTROL_BYTES = 4096  # MAX_CONTROL_BYTES, the default
HANDSHAKE_S = 3.0

COMMON_ENV = {
    "AUTH": "required",
    "API_KEYS": f"bystander={hash_key(KEY_BYSTANDER)},hostile={hash_key(KEY)},"
                f"second={hash_key(KEY_B)},holder={hash_key(KEY_HOLD)},"
                f"encoded={hash_key(KEY_ENCODED)}",
    "TOKEN_SECRET": SECRET,
    "TRUSTED_PROXIES": "127.0.0.1",
    "RATE_LIMIT_IP_PER_S": "1",
    "RATE_LIMIT_IP_BURST": str(IP_BURST),
    "RATE_LIMIT_KEY_PER_S": "0",
    "MAX_VIEWERS": str(VIEWERS),
    "MAX_VIEWERS_PER_IP": str(VIEWERS_PER_IP),
    "MAX_VIEWERS_PER_KEY": str(VIEWERS_PER_KEY),
    "MAX_HANDSHAKES_PER_IP": str(HANDSHAKES_PER_IP),
    "MAX_CONNECTIONS_PER_IP": str(CONNECTIONS_PER_IP),
    "HANDSHAKE_TIMEOUT_S": str(HANDSHAKE_S),
}
GATEWAY_ENV = {
    **COMMON_ENV,
    "MAX_SESSIONS_PER_IP": "2",
    "MAX_SESSIONS_PER_KEY": "100",
    "LOG_LEVEL": "DEBUG",  # request lines are logged at DEBUG: the redaction case reads them
}

_locals = (f"127.0.{i // 250}.{i % 250 + 2}" for i in itertools.count(250))


def next_local() -> str:
    """A loopback address of its own (not the trusted 127.0.0.1) to connect from."""
    return next(_locals)


# --------------------------------------------------------------------------- the stack


@dataclasses.dataclass
class Stack:
    redis: RedisServer
    gateway: Service
    fanout: Service
    ports: dict[str, int]

    def url(self, server: str = "gateway") -> str:
        return f"ws://127.0.0.1:{self.ports[server]}"

    def service(self, server: str) -> Service:
        return self.gateway if server == "gateway" else self.fanout


def start_service(module: str, redis_url: str, env: dict[str, str], ready: str,
                  limits: tuple[int, int] | None = None) -> tuple[Service, int]:
    """``python -m module`` on a free port; under an open files limit with ``limits``."""
    port = free_port()
    args = ["--host", "127.0.0.1", "--port", str(port)]
    if limits is not None:
        svc = Service("tests.limited", [str(limits[0]), str(limits[1]), module, *args],
                      {"REDIS_URL": redis_url, **env}, ready)
    else:
        svc = Service(module, args, {"REDIS_URL": redis_url, **env}, ready)
    svc.wait_ready()
    wait_port(port)
    return svc, port


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    server = RedisServer()
    server.start()
    worker = start_transcriber(server.url)
    gateway, gport = start_service("ingest", server.url, GATEWAY_ENV, "gateway listening")
    fanout, fport = start_service("fanout", server.url, COMMON_ENV, "fanout listening")
    yield Stack(server, gateway, fanout, {"gateway": gport, "fanout": fport})
    fanout.stop()
    gateway.stop()
    worker.stop()
    server.stop()


@pytest.fixture(scope="module")
def bystander(stack: Stack) -> Iterator[Bystander]:
    b = Bystander(Secure(stack.redis, stack.gateway, stack.ports["gateway"]))
    b.start()
    assert b.started.wait(30), "bystander did not start"
    yield b
    b.stopping.set()
    b.join(90)


# --------------------------------------------------------------------------- clients


def _ws(stack: Stack, path: str, *, server: str = "gateway", key: str | None = KEY,
        ip: str | None = None, local: str | None = None) -> Any:
    """A WebSocket connection: from ``local`` (an untrusted peer address), or through the
    trusted 127.0.0.1 as client ``ip`` (a new one when None)."""
    headers = [("Authorization", f"Bearer {key}")] if key else []
    extra: dict[str, Any] = {}
    if local is not None:
        extra["local_addr"] = (local, 0)
    else:
        headers.append(("X-Forwarded-For", ip or next_ip()))
    return connect(f"{stack.url(server)}{path}", additional_headers=headers, max_size=None,
                   compression=None, open_timeout=10, **extra)


async def talk(stack: Stack, path: str, sends: Sequence[bytes | str] = (), *,
               read_timeout: float = 30.0, first_only: bool = False, **conn: Any) -> Outcome:
    """Connect, send, read until the server closes (``first_only``: until the first
    message): the refusal, or the messages, close code and last error code."""
    out = Outcome()
    try:
        async with _ws(stack, path, **conn) as ws:
            async def reader() -> None:
                with contextlib.suppress(ConnectionClosed):
                    async for raw in ws:
                        out.messages.append(json.loads(raw))
                        if first_only:
                            return

            task = asyncio.create_task(reader())
            with contextlib.suppress(ConnectionClosed):
                for item in sends:
                    await ws.send(item)
            await asyncio.wait_for(task, read_timeout)
            out.close = ws.close_code
    except InvalidStatus as exc:
        out.status = exc.response.status_code
        with contextlib.suppress(ValueError, KeyError, TypeError):
            body = json.loads(exc.response.body)
            out.error, out.detail = body["code"], body["message"]
        return out
    errors = out.of_type("error")
    out.error = errors[-1]["code"] if errors else None
    return out


async def refused(stack: Stack, path: str, **conn: Any) -> Outcome:
    """An upgrade expected to be refused (one that is not: its first message)."""
    return await asyncio.wait_for(talk(stack, path, read_timeout=5, first_only=True,
                                       **conn), 20)


@contextlib.asynccontextmanager
async def viewer(stack: Stack, sid: str, **conn: Any) -> AsyncIterator[ClientConnection]:
    """A viewer of ``sid`` that has had its ``session`` message."""
    async with _ws(stack, f"/v1/sessions/{sid}/results", **conn) as ws:
        first = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert first["type"] == "session" and first.get("viewer") is True, first
        yield ws


@contextlib.asynccontextmanager
async def held_session(stack: Stack, **conn: Any) -> AsyncIterator[str]:
    """A /v1/listen session held open (no audio) while the block runs: its id."""
    conn.setdefault("key", KEY_HOLD)
    async with _ws(stack, "/v1/listen", **conn) as ws:
        first = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert first["type"] == "session", first
        yield str(first["session_id"])


def upgrade_request(port: int, path: str, key: str | None = KEY, *, ip: str | None = None,
                    extra: Sequence[tuple[str, str]] = (), host: bool = True) -> bytes:
    lines = [f"GET {path} HTTP/1.1"]
    if host:
        lines.append(f"Host: 127.0.0.1:{port}")
    if key:
        lines.append(f"Authorization: Bearer {key}")
    if ip:
        lines.append(f"X-Forwarded-For: {ip}")
    lines += ["Upgrade: websocket", "Connection: Upgrade",
              f"Sec-WebSocket-Key: {base64.b64encode(secrets.token_bytes(16)).decode()}",
              "Sec-WebSocket-Version: 13"]
    lines += [f"{name}: {value}" for name, value in extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def plain_get(path: str, ip: str, key: str = KEY) -> bytes:
    return (f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
            f"X-Forwarded-For: {ip}\r\n\r\n").encode()


async def raw(port: int, request: bytes, local: str = "127.0.0.1") -> Outcome:
    """Write a request on a raw socket and read the answer: its status and JSON error
    code, or ``dropped`` when the server cut the connection without one."""
    out = Outcome()
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(local, 0))
    try:
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            writer.write(request)
            await writer.drain()
        try:
            answer = await asyncio.wait_for(reader.read(65536), 10)
        except ConnectionResetError:
            answer = b""
    finally:
        writer.close()
    if not answer.startswith(b"HTTP/1.1 "):
        out.dropped = True
        return out
    out.status = int(answer[9:12])
    body = answer.partition(b"\r\n\r\n")[2]
    with contextlib.suppress(ValueError, KeyError, TypeError):
        out.error = json.loads(body)["code"]
    return out


async def half_open(port: int, local: str, header_lines: int = 2,
                    line_bytes: int = 100) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection that sends the start of a request and never finishes it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(local, 0))
    writer.write(b"GET /v1/listen HTTP/1.1\r\n" + b"".join(
        f"X-Pad-{i}: {'a' * line_bytes}\r\n".encode() for i in range(header_lines)))
    await writer.drain()
    return reader, writer


async def is_cut(reader: asyncio.StreamReader) -> bool:
    """The server closed this connection without an answer."""
    try:
        data = await asyncio.wait_for(reader.read(1), 5)
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return data == b""


async def dropped(port: int, request: bytes, local: str) -> bool:
    return (await raw(port, request, local=local)).dropped


def open_files(svc: Service) -> int:
    return len(os.listdir(f"/proc/{svc.proc.pid}/fd"))


def rss_mb(svc: Service) -> float:
    status = Path(f"/proc/{svc.proc.pid}/status").read_text()
    m = re.search(r"VmRSS:\s+(\d+) kB", status)
    assert m is not None
    return int(m.group(1)) / 1024


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 120))


# --------------------------------------------------------------------------- viewer caps


@pytest.mark.parametrize("server", ["gateway", "fanout"])
def test_viewers_are_capped_per_address_and_per_key(stack: Stack, bystander: Bystander,
                                                    server: str) -> None:
    """One key at one address cannot take every viewer slot (MAX_VIEWERS): beyond
    MAX_VIEWERS_PER_IP from one address, or MAX_VIEWERS_PER_KEY for one key from any
    number of addresses, the upgrade is refused with HTTP 429 too_many_viewers; other keys
    and addresses still get viewers, and a closed viewer's slot is free again."""
    async def go() -> None:
        async with held_session(stack) as sid, contextlib.AsyncExitStack() as held:
            address = next_ip()
            first = [await held.enter_async_context(viewer(stack, sid, server=server,
                                                           ip=address))
                     for _ in range(VIEWERS_PER_IP)]
            path = f"/v1/sessions/{sid}/results"
            out = await refused(stack, path, server=server, ip=address)
            assert (out.status, out.error) == (429, "too_many_viewers"), out
            out = await refused(stack, path, server=server, ip=address, key=KEY_B)
            assert (out.status, out.error) == (429, "too_many_viewers"), "the address is full"
            for _ in range(VIEWERS_PER_KEY - VIEWERS_PER_IP):  # the key, from elsewhere
                await held.enter_async_context(viewer(stack, sid, server=server))
            out = await refused(stack, path, server=server)
            assert (out.status, out.error) == (429, "too_many_viewers"), out
            assert "API key" in (out.detail or ""), out
            # another key at another address is not affected
            await held.enter_async_context(viewer(stack, sid, server=server, key=KEY_B))
            # a viewer that closes gives its slot back (to its address and its key)
            await first[0].close()
            answers: list[Outcome] = []

            async def slot_free() -> bool:
                answers.append(await refused(stack, path, server=server, ip=address))
                return answers[-1].error != "too_many_viewers"

            await until("the closed viewer's slot free again", slot_free, 5, interval=0.2)
            out = answers[-1]
            assert out.status is None and out.messages[0].get("viewer") is True, out
    run(go())
    bystander.assert_unaffected()


# --------------------------------------------------------------------------- duplicated headers


DUPLICABLE = [("Upgrade", "websocket"), ("Connection", "Upgrade"),
              ("Sec-WebSocket-Key", base64.b64encode(b"0123456789abcdef").decode()),
              ("Authorization", f"Bearer {KEY}"), ("Host", "example.com"),
              ("Origin", "https://app.example")]


@pytest.mark.parametrize("server", ["gateway", "fanout"])
def test_duplicated_headers_are_a_400_after_the_rate_limit(stack: Stack, bystander: Bystander,
                                                           server: str) -> None:
    """A header that must appear once, sent twice: HTTP 400 bad_request (before: a 500 and
    a traceback, ahead of the rate limit); an address past its request rate still gets 429
    rate_limited first."""
    port = stack.ports[server]
    path = "/v1/listen" if server == "gateway" else f"/v1/sessions/{'ab' * 16}/results"

    async def go() -> None:
        for name, value in DUPLICABLE:
            doubled = [(name, value)] if name != "Origin" else [(name, value), (name, value)]
            out = await raw(port, upgrade_request(port, path, ip=next_ip(), extra=doubled))
            assert (out.status, out.error) == (400, "bad_request"), (name, out)
        # a plain HTTP call too
        out = await raw(port, upgrade_request(port, "/v1/sessions", ip=next_ip(),
                                              extra=[("Host", "example.com")]))
        assert (out.status, out.error) == (400, "bad_request"), out
        # the rate limit comes first: an address that spent its allowance gets 429
        address = next_ip()
        for _ in range(3 * IP_BURST):
            out = await raw(port, plain_get("/v1/sessions?limit=1", address))
            if out.status == 429:
                break
        assert (out.status, out.error) == (429, "rate_limited"), out
        out = await raw(port, upgrade_request(port, path, ip=address,
                                              extra=[("Upgrade", "websocket")]))
        assert (out.status, out.error) == (429, "rate_limited"), out

    run(go())
    log = stack.service(server).log()
    assert "process_request failed" not in log
    assert " ERROR " not in log, [line for line in log.splitlines() if " ERROR " in line]
    bystander.assert_unaffected()


# --------------------------------------------------------------------------- connections


@pytest.mark.parametrize("server", ["gateway", "fanout"])
def test_unanswered_connections_are_capped_per_address(stack: Stack, bystander: Bystander,
                                                       server: str) -> None:
    """MAX_HANDSHAKES_PER_IP connections whose request is not complete: the next one from
    that address is cut when it is accepted, before anything is read; other addresses are
    not affected, and the address is served again once its connections close."""
    port = stack.ports[server]
    path = "/v1/sessions?limit=1"

    async def go() -> None:
        local = next_local()
        pending = [await half_open(port, local) for _ in range(HANDSHAKES_PER_IP)]
        # once the server has accepted them, the next is cut (a probe it answers is closed
        # at once and counts no more)
        await until("a further connection from the address cut",
                    lambda: dropped(port, upgrade_request(port, path), local))
        out = await raw(port, upgrade_request(port, path), local=next_local())
        assert out.status == 200, out
        for _, writer in pending:
            writer.close()
        answers: list[Outcome] = []

        async def served() -> bool:
            answers.append(await raw(port, upgrade_request(port, path), local=local))
            return not answers[-1].dropped

        await until("the address served again", served, 5, interval=0.1)
        assert answers[-1].status == 200, answers[-1]

    run(go())
    bystander.assert_unaffected()


def test_open_connections_are_capped_per_address(stack: Stack, bystander: Bystander) -> None:
    """MAX_CONNECTIONS_PER_IP connections of one address, sessions and viewers included:
    the next is cut when it is accepted, though it would be under the handshake cap."""
    port = stack.ports["gateway"]

    async def go() -> None:
        local = next_local()
        async with held_session(stack) as sid, contextlib.AsyncExitStack() as held:
            for _ in range(2):  # MAX_SESSIONS_PER_IP, counted for the peer address
                await held.enter_async_context(held_session(stack, key=KEY, local=local))
            for _ in range(VIEWERS_PER_IP):
                await held.enter_async_context(viewer(stack, sid, local=local))
            pending = [await half_open(port, local)
                       for _ in range(CONNECTIONS_PER_IP - 2 - VIEWERS_PER_IP)]
            assert len(pending) < HANDSHAKES_PER_IP
            await until("a further connection from the address cut", lambda: dropped(
                port, upgrade_request(port, "/v1/sessions?limit=1"), local))
            out = await raw(port, upgrade_request(port, "/v1/sessions?limit=1"),
                            local=next_local())
            assert out.status == 200, out
            for _, writer in pending:
                writer.close()

    run(go())
    bystander.assert_unaffected()


def test_request_headers_are_bounded_in_total(stack: Stack, bystander: Bystander) -> None:
    """Request line and headers beyond MAX_REQUEST_HEADER_BYTES in all, though every line
    is under 8 KiB and there are fewer than 128 headers: HTTP 431; just under it: served."""
    port = stack.ports["gateway"]
    line = "a" * 1000

    async def go() -> None:
        over = [(f"X-Pad-{i}", line) for i in range(HEADER_BYTES // 1000 + 8)]
        out = await raw(port, upgrade_request(port, "/v1/sessions?limit=1", ip=next_ip(),
                                              extra=over))
        assert out.status == 431, out
        under = [(f"X-Pad-{i}", line) for i in range(HEADER_BYTES // 1000 - 4)]
        out = await raw(port, upgrade_request(port, "/v1/sessions?limit=1", ip=next_ip(),
                                              extra=under))
        assert out.status == 200, out

    run(go())
    bystander.assert_unaffected()


def test_half_open_handshakes_with_a_megabyte_of_headers_take_little_memory(
        stack: Stack, bystander: Bystander) -> None:
    """The reported attack: handshakes that send ~1 MiB of headers (127 lines of 8000
    bytes, under websockets' own bounds) and never finish. Per address, HANDSHAKES_PER_IP
    are read up to MAX_REQUEST_HEADER_BYTES and answered 431, the rest are cut unread; the
    gateway's memory grows by a few MB, not ~1 MB per handshake."""
    port = stack.ports["gateway"]
    addresses, per_address = 25, HANDSHAKES_PER_IP + 2
    block = b"".join(f"X-Pad-{i}: {'a' * 8000}\r\n".encode() for i in range(127))

    async def one(local: str) -> tuple[str, asyncio.StreamWriter | None]:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port,
                                                           local_addr=(local, 0))
        except OSError:
            return "dropped", None
        try:
            writer.write(b"GET /v1/listen HTTP/1.1\r\n" + block)
            await asyncio.wait_for(writer.drain(), 20)
            answer = await asyncio.wait_for(reader.read(12), 10)
        except (ConnectionResetError, BrokenPipeError):
            return "dropped", writer
        if answer.startswith(b"HTTP/1.1 "):
            return answer[9:12].decode(), writer
        return "dropped" if answer == b"" else repr(answer), writer

    async def go() -> tuple[float, list[str]]:
        before = rss_mb(stack.gateway)
        attempts = []
        for _ in range(addresses):
            local = next_local()
            attempts += [one(local) for _ in range(per_address)]
        results = await asyncio.gather(*attempts)
        # a settling time for the measurement, not a wait for an event: what is still in
        # socket buffers reaches the gateway
        await asyncio.sleep(1.0)
        grown = rss_mb(stack.gateway) - before
        for _, writer in results:
            if writer is not None:
                writer.close()
        return grown, [r for r, _ in results]

    grown, outcomes = run(go())
    print(f"\n{len(outcomes)} half-open handshakes of 1 MiB: RSS +{grown:.1f} MB")
    assert outcomes.count("431") == addresses * HANDSHAKES_PER_IP, outcomes
    assert outcomes.count("dropped") == addresses * (per_address - HANDSHAKES_PER_IP), outcomes
    assert grown < 30, f"the gateway grew by {grown:.0f} MB"
    bystander.assert_unaffected()


# --------------------------------------------------------------------------- control messages


def keepalive(size: int) -> str:
    """A keepalive control message of exactly ``size`` bytes."""
    base = json.dumps({"type": "keepalive", "pad": ""})
    return json.dumps({"type": "keepalive", "pad": "x" * (size - len(base))})


@pytest.fixture(scope="module")
def recorded(stack: Stack) -> str:
    """A closed session (1.5 s of JFK), to replay."""
    out = run(talk(stack, "/v1/listen", [pcm(1.5), CLOSE], key=KEY_HOLD))
    assert out.close == 1000, out
    return str(out.messages[0]["session_id"])


def test_control_messages_on_a_listen_socket_are_bounded(stack: Stack,
                                                          bystander: Bystander) -> None:
    """A keepalive of MAX_CONTROL_BYTES is fine; one byte more: message_too_big, 1009,
    though it is far under MAX_MESSAGE_BYTES (1 MiB)."""
    assert len(keepalive(CONTROL_BYTES)) == CONTROL_BYTES
    out = run(talk(stack, "/v1/listen", [pcm(0.3), keepalive(CONTROL_BYTES),
                                         keepalive(CONTROL_BYTES + 1)]))
    assert (out.status, out.close, out.error) == (None, 1009, "message_too_big"), out
    assert str(CONTROL_BYTES) in out.of_type("error")[0]["message"]
    bystander.assert_unaffected()


@pytest.mark.parametrize("where", ["gateway viewer", "fanout viewer", "gateway replay"])
def test_messages_to_viewer_and_replay_sockets_are_bounded(stack: Stack, bystander: Bystander,
                                                           recorded: str, where: str) -> None:
    """Viewer and replay sockets take only control messages: one larger than
    MAX_CONTROL_BYTES gets message_too_big, 1009."""
    server, kind = where.split()

    async def go() -> Outcome:
        if kind == "replay":
            return await talk(stack, f"/v1/sessions/{recorded}/replay?speed=realtime",
                              [keepalive(CONTROL_BYTES + 1)])
        async with held_session(stack) as sid:
            return await talk(stack, f"/v1/sessions/{sid}/results",
                              [keepalive(CONTROL_BYTES), keepalive(CONTROL_BYTES + 1)],
                              server=server)

    out = run(go())
    assert (out.status, out.close, out.error) == (None, 1009, "message_too_big"), out
    assert out.messages[0]["type"] == "session"
    bystander.assert_unaffected()


# --------------------------------------------------------------------------- replay models


@pytest.mark.parametrize("model", [
    "/work/main/.venv", "%2Fetc", "..%2Fmodels", ".", ".cache", "~", "a%5Cb", "C:models",
    "base.en"])  # a name, but not one this deployment serves (REPLAY_MODELS: tiny.en)
def test_replay_models_come_from_an_allowlist(stack: Stack, bystander: Bystander,
                                              recorded: str, model: str) -> None:
    """``?model=`` of a replay: a path, or a name not in REPLAY_MODELS (by default the
    deployment's own model), is refused before the upgrade with HTTP 400 bad_request."""
    out = run(refused(stack, f"/v1/sessions/{recorded}/replay?model={model}"))
    assert (out.status, out.error) == (400, "bad_request"), out
    bystander.assert_unaffected()


def test_replay_with_the_served_model(stack: Stack, bystander: Bystander,
                                      recorded: str) -> None:
    out = run(talk(stack, f"/v1/sessions/{recorded}/replay?model=tiny.en"))
    assert out.close == 1000, out
    assert out.messages[0]["model"] == "tiny.en" and out.messages[-1]["type"] == "closed"
    bystander.assert_unaffected()


# --------------------------------------------------------------------------- log redaction


def test_a_percent_encoded_token_parameter_is_redacted(stack: Stack,
                                                       bystander: Bystander) -> None:
    """``tok%65n=`` with the key itself percent-encoded is a credential to the server (it
    reads the decoded query), so its DEBUG request line must not show it either."""
    encoded = percent_encoded(KEY_ENCODED)
    lower = percent_encoded(KEY_ENCODED, lower=True)

    async def go() -> list[Outcome]:
        outs = []
        for name, value in (("tok%65n", encoded), ("%74%6F%6B%65%6E", lower),
                            ("tok%65n", lower)):
            async with _ws(stack, f"/v1/listen?{name}={value}", key=None) as ws:
                first = json.loads(await ws.recv())
                outs.append(Outcome(messages=[first]))
        return outs

    line = "get /v1/listen?token=<redacted>"
    before = stack.gateway.log().lower().count(line)
    for out in run(go()):
        assert out.messages[0]["type"] == "session", out  # the credential was accepted
    wait_until("the three request lines logged",
               lambda: stack.gateway.log().lower().count(line) >= before + 3)
    log = stack.gateway.log()
    assert "token=<redacted>" in log.lower(), "the request lines were not logged"
    for secret in (KEY_ENCODED, encoded, lower, KEY_ENCODED[4:]):
        assert secret not in log
    bystander.assert_unaffected()


# --------------------------------------------------------------------------- open files


def soft_nofile(svc: Service) -> int:
    limits = Path(f"/proc/{svc.proc.pid}/limits").read_text()
    m = re.search(r"Max open files\s+(\d+)\s+(\d+|unlimited)", limits)
    assert m is not None, limits
    return int(m.group(1))


def hard_limit() -> int:
    import resource
    return resource.getrlimit(resource.RLIMIT_NOFILE)[1]


def test_services_raise_their_open_files_limit(stack: Stack) -> None:
    """Started with a soft limit of 256 under a higher hard one (a shell's ``ulimit -n``
    default), a gateway and a fanout raise the soft limit to the hard one."""
    hard = hard_limit()
    if hard == -1 or hard <= 256:
        pytest.skip(f"the hard limit ({hard}) leaves nothing to raise")
    for module, ready in (("ingest", "gateway listening"), ("fanout", "fanout listening")):
        svc, _ = start_service(module, stack.redis.url, COMMON_ENV, ready, limits=(256, hard))
        try:
            assert soft_nofile(svc) == hard, svc.log()
        finally:
            svc.stop()


def test_running_out_of_file_descriptors_is_logged_once(stack: Stack,
                                                         bystander: Bystander) -> None:
    """A gateway whose hard limit is 64 files, flooded with idle TCP connections: every
    accept fails with "Too many open files" (asyncio retries once a second), which is
    logged once, not once a second; once the connections go, it serves a session."""
    env = {**GATEWAY_ENV, "MAX_HANDSHAKES_PER_IP": "0", "MAX_CONNECTIONS_PER_IP": "0",
           "HANDSHAKE_TIMEOUT_S": "30", "LOG_LEVEL": "INFO"}
    svc, port = start_service("ingest", stack.redis.url, env, "gateway listening",
                              limits=(64, 64))
    try:
        async def flood() -> None:
            conns = []
            for _ in range(120):
                with contextlib.suppress(OSError, TimeoutError):
                    conns.append(await asyncio.wait_for(asyncio.open_connection(
                        "127.0.0.1", port, local_addr=(next_local(), 0)), 2))
            await asyncio.sleep(4.0)  # four rounds of asyncio's accept retries
            for _, writer in conns:
                writer.close()

        run(flood())
        lines = [line for line in svc.log().splitlines()
                 if "Too many open files" in line or "out of system resource" in line]
        assert 1 <= len(lines) <= 2, lines  # the message (and its exception line)
        # the flood's descriptors closed; asyncio accepts again within its 1 s retry delay
        wait_until("half the gateway's descriptors free again", lambda: open_files(svc) <= 32)
        out = run(talk(Stack(stack.redis, svc, svc, {"gateway": port}), "/v1/listen",
                       [pcm(1.0), CLOSE], key=KEY_HOLD))
        assert out.close == 1000 and out.of_type("closed"), out
    finally:
        svc.stop()
    bystander.assert_unaffected()


def test_the_bystander_was_never_disturbed(stack: Stack, bystander: Bystander) -> None:
    """Every JFK session streamed while the cases ran: closed 1000, WER <= 0.10."""
    bystander.stopping.set()
    bystander.join(90)
    assert bystander.runs, "no bystander session finished"
    for _, _, outcome in bystander.runs:
        assert Bystander.problem(outcome) is None, Bystander.problem(outcome)

