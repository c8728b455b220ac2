"""Hostile input against a running gateway with authentication on.

Real sockets, a real redis-server, a real transcriber. Each case in ``CASES`` sends one
kind of bad (or borderline) input and asserts the exact HTTP status of the refused
upgrade, or the exact close code and ``error`` code after it. All the while a
well-behaved client (the *bystander*) streams the JFK clip at real time, session after
session, through the same gateway; after every case it must still be receiving, and
at the end every one of its sessions must have closed 1000 with an accurate transcript.

The test client stands in for a reverse proxy (``TRUSTED_PROXIES=127.0.0.1``): each
case claims its own client address in ``X-Forwarded-For``, so the per-address cap is
exercised on purpose and never by accident.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import http.client
import itertools
import json
import os
import secrets
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any

import numpy as np
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from common.auth import TokenSigner, hash_key, new_key
from common.client import StreamResult, stream
from tests.audio_refs import frames, load_pcm16, reference, wav16, wer
from tests.procs import RedisServer, Service, start_gateway, start_transcriber
from tests.test_pipeline_e2e import check_protocol, with_tail

pytestmark = pytest.mark.integration

KEY_BYSTANDER, KEY, KEY_CAPPED = new_key(), new_key(), new_key()
KEY_FLOOD, KEY_FLOOD_IP = new_key(), new_key()  # the request-rate cases, one each
SECRET = secrets.token_urlsafe(40)
ORIGIN = "https://app.example"
IP_CAP, KEY_CAP = 2, 16  # the hostile key runs many cases: keep its cap out of their way
IDLE_S, SPEED, BURST_S, HANDSHAKE_S = 2.0, 2.0, 3.0, 2.0
MAX_MESSAGE = 65536
TRANSPORT_MAX = 2 * MAX_MESSAGE  # the default hard bound: twice MAX_MESSAGE_BYTES
# Request rates: a case that floods on purpose uses its own address (or key); the others stay
# far below (address_cap_frees_when_a_session_ends makes ~30 requests from one address, the
# hostile key ~150 in all: its burst covers them, however fast the cases run). Refills are
# slow so that a flood on a slow box still ends in 429.
IP_RATE, IP_BURST, KEY_RATE, KEY_BURST, FAILURE_BURST = 1.0, 40, 2.0, 200, 5
MESSAGES_BURST = 500  # odd_byte_counts sends ~400 small messages at once

GATEWAY_ENV = {
    "AUTH": "required",
    "API_KEYS": f"bystander={hash_key(KEY_BYSTANDER)},hostile={hash_key(KEY)},"
                f"capped={hash_key(KEY_CAPPED)},flood={hash_key(KEY_FLOOD)},"
                f"flood-ip={hash_key(KEY_FLOOD_IP)}",
    "TOKEN_SECRET": SECRET,
    "ALLOWED_ORIGINS": ORIGIN,
    "TRUSTED_PROXIES": "127.0.0.1",
    "MAX_SESSIONS_PER_IP": str(IP_CAP),
    "MAX_SESSIONS_PER_KEY": str(KEY_CAP),
    "CLIENT_IDLE_TIMEOUT_S": str(IDLE_S),
    "MAX_AUDIO_SPEED": str(SPEED),
    "AUDIO_BURST_S": str(BURST_S),
    "HANDSHAKE_TIMEOUT_S": str(HANDSHAKE_S),
    "MAX_MESSAGE_BYTES": str(MAX_MESSAGE),
    "MAX_FRAME_SECONDS": "1.0",
    "RATE_LIMIT_IP_PER_S": str(IP_RATE),
    "RATE_LIMIT_IP_BURST": str(IP_BURST),
    "RATE_LIMIT_KEY_PER_S": str(KEY_RATE),
    "RATE_LIMIT_KEY_BURST": str(KEY_BURST),
    "AUTH_FAILURES_PER_MIN": "6",
    "AUTH_FAILURE_BURST": str(FAILURE_BURST),
    "MAX_MESSAGES_PER_S": "100",
    "MESSAGES_BURST": str(MESSAGES_BURST),
    "RESUME_GRACE_S": "3",
    "LOG_LEVEL": "DEBUG",  # request lines and headers are logged at DEBUG: none may leak
}

JFK = with_tail(load_pcm16("fw_jfk"))
CLOSE = json.dumps({"type": "close"})
_ips = (f"10.{i // 250 % 250}.{i % 250}.1" for i in itertools.count(1000))


def next_ip() -> str:
    return next(_ips)


# --------------------------------------------------------------------------- the stack


@dataclasses.dataclass
class Secure:
    redis: RedisServer
    gateway: Service
    port: int
    minted: list[str] = dataclasses.field(default_factory=list)

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def http(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
        out, body = self.request("GET", path, headers)
        return out.status or 0, body

    def request(self, method: str, path: str,
                headers: dict[str, str] | None = None) -> tuple[Outcome, Any]:
        """One HTTP request (from a new client address unless ``headers`` names one): its
        status, JSON error code and Retry-After, and its body."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request(method, path,
                         headers={"X-Forwarded-For": next_ip(), **(headers or {})})
            resp = conn.getresponse()
            body: Any = resp.read()
            with contextlib.suppress(ValueError):
                body = json.loads(body)
            out = Outcome(status=resp.status, retry_after=resp.getheader("Retry-After"))
            if isinstance(body, dict):
                out.error, out.detail = body.get("code"), body.get("message")
            return out, body
        finally:
            conn.close()

    def mint(self, key: str = KEY, **params: Any) -> str:
        query = "&".join(f"{k}={v}" for k, v in params.items())
        status, body = self.http(f"/v1/token?{query}", {"Authorization": f"Bearer {key}"})
        assert status == 200, body
        self.minted.append(body["token"])
        return str(body["token"])


class Bystander(threading.Thread):
    """Streams JFK at real time through the gateway, one session after another."""

    def __init__(self, secure: Secure) -> None:
        super().__init__(daemon=True)
        self.secure = secure
        self.stopping = threading.Event()
        self.runs: list[tuple[float, float, StreamResult | BaseException]] = []
        self.sid: str | None = None
        self.last_message = time.monotonic()
        self.started = threading.Event()

    def _on(self, msg: dict[str, Any]) -> None:
        self.last_message = time.monotonic()
        if msg["type"] == "session":
            self.sid = msg["session_id"]
            self.started.set()

    def run(self) -> None:
        headers = {"Authorization": f"Bearer {KEY_BYSTANDER}", "X-Forwarded-For": "10.0.0.1",
                   "Origin": ORIGIN}
        while not self.stopping.is_set():
            began = time.monotonic()
            try:
                outcome: StreamResult | BaseException = asyncio.run(stream(
                    f"{self.secure.ws_url}/v1/listen", frames(JFK), pace=1.0,
                    on_message=self._on, headers=headers, read_timeout=60))
            except Exception as exc:
                outcome = exc
            self.runs.append((began, time.monotonic(), outcome))

    @staticmethod
    def problem(outcome: StreamResult | BaseException) -> str | None:
        if isinstance(outcome, BaseException):
            return f"bystander session failed: {outcome!r}"
        try:
            check_protocol(outcome)
        except AssertionError as exc:
            return f"bystander session broke the protocol: {exc}"
        score = wer(reference("fw_jfk"), outcome.text)
        return None if score <= 0.10 else f"bystander WER {score:.2f}: {outcome.text!r}"

    def assert_unaffected(self) -> None:
        """Still receiving now, and every session so far was clean."""
        assert self.is_alive(), "bystander stopped"
        silent = time.monotonic() - self.last_message
        assert silent < 6.0, f"bystander has received nothing for {silent:.1f} s"
        for _, _, outcome in self.runs:
            assert self.problem(outcome) is None, self.problem(outcome)


@pytest.fixture(scope="module")
def secure() -> Iterator[Secure]:
    server = RedisServer()
    server.start()
    worker = start_transcriber(server.url)
    gateway, port = start_gateway(server.url, **GATEWAY_ENV)
    yield Secure(server, gateway, port)
    gateway.stop()
    worker.stop()
    server.stop()


@pytest.fixture(scope="module")
def bystander(secure: Secure) -> Iterator[Bystander]:
    b = Bystander(secure)
    b.start()
    assert b.started.wait(30), "bystander did not start"
    yield b
    b.stopping.set()
    b.join(90)


# --------------------------------------------------------------------------- clients


@dataclasses.dataclass
class Outcome:
    status: int | None = None  # HTTP status when the upgrade was refused
    close: int | None = None  # close code after the upgrade
    error: str | None = None  # code of the error message, or of the JSON error body
    dropped: bool = False  # the server cut the connection without answering
    messages: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    subprotocol: str | None = None
    retry_after: str | None = None  # Retry-After of a refused request
    detail: str | None = None  # the message of a JSON error body

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [m for m in self.messages if m.get("type") == kind]


Send = bytes | str | Callable[[ClientConnection], Awaitable[None]]


def _connect(secure: Secure, path: str, *, cred: str | None = KEY, how: str = "header",
             ip: str | None = None, origin: str | None = None,
             headers: Sequence[tuple[str, str]] = ()) -> Any:
    hdrs = [("X-Forwarded-For", ip or next_ip()), *headers]
    subprotocols = None
    if cred is not None and how == "header":
        hdrs.append(("Authorization", f"Bearer {cred}"))
    elif cred is not None and how == "query":
        path += ("&" if "?" in path else "?") + f"token={cred}"
    elif cred is not None and how == "subprotocol":
        subprotocols = ["stt", f"bearer.{cred}"]
    return connect(f"{secure.ws_url}{path}", additional_headers=hdrs, origin=origin,
                   subprotocols=subprotocols, max_size=None, compression=None,
                   open_timeout=10)


async def session(secure: Secure, path: str = "/v1/listen", sends: Sequence[Send] = (),
                  *, gap: float = 0.0, read_timeout: float = 30.0, **conn: Any) -> Outcome:
    """Connect, send, then read every message until the server closes."""
    out = Outcome()
    try:
        async with _connect(secure, path, **conn) as ws:
            out.subprotocol = ws.subprotocol

            async def reader() -> None:
                with contextlib.suppress(ConnectionClosed):
                    async for raw in ws:
                        out.messages.append(json.loads(raw))

            task = asyncio.create_task(reader())
            try:
                for item in sends:
                    if callable(item):
                        await item(ws)
                    else:
                        await ws.send(item)
                    if gap:
                        await asyncio.sleep(gap)  # the case's pace between messages
            except ConnectionClosed:
                pass
            await asyncio.wait_for(task, read_timeout)
            out.close = ws.close_code
    except InvalidStatus as exc:
        out.status = exc.response.status_code
        out.retry_after = exc.response.headers.get("Retry-After")
        try:
            body = json.loads(exc.response.body)
            out.error, out.detail = body["code"], body["message"]
        except (ValueError, KeyError, TypeError):
            pass
        return out
    errors = out.of_type("error")
    out.error = errors[-1]["code"] if errors else None
    return out


def pcm(seconds: float, start: float = 0.0) -> bytes:
    a = int(start * 16000)
    return JFK[a:a + int(seconds * 16000)].astype("<i2").tobytes()


def audio_frames(seconds: float, frame_s: float = 0.1) -> list[bytes]:
    return [f for f, _ in frames(JFK[:int(seconds * 16000)], frame_s)]


def wav_with(fmt: bytes | None = None, fmt_size: int | None = None, data_size: int | None = None,
             data: bytes = b"") -> bytes:
    """A WAV message with chosen lies: fmt chunk body and size, data chunk size."""
    fmt = fmt if fmt is not None else struct.pack("<HHIIHH", 1, 1, 16000, 32000, 2, 16)
    body = b"WAVE" + b"fmt " + struct.pack("<I", fmt_size if fmt_size is not None else len(fmt))
    body += fmt + b"data" + struct.pack("<I", data_size if data_size is not None else len(data))
    body += data
    return b"RIFF" + struct.pack("<I", len(body)) + body


def f32(values: Sequence[float]) -> bytes:
    return np.asarray(values, dtype="<f4").tobytes()


async def invalid_utf8_text(ws: ClientConnection) -> None:
    async with ws.send_context():
        ws.protocol.send_text(b"\xff\xfe not utf-8")


async def raw_request(secure: Secure, request: bytes, trickle_s: float = 0.0) -> Outcome:
    """Write an HTTP request on a raw socket (optionally one byte every ``trickle_s``)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", secure.port)
    out = Outcome()
    try:
        if trickle_s:
            for i in range(len(request)):
                writer.write(request[i:i + 1])
                await writer.drain()
                await asyncio.sleep(trickle_s)  # the slow client is the case
                if reader.at_eof():
                    break
        else:
            writer.write(request)
            await writer.drain()
    except (ConnectionResetError, BrokenPipeError):
        pass
    try:
        answer = await asyncio.wait_for(reader.read(65536), 10)
    except ConnectionResetError:
        answer = b""
    writer.close()
    if answer.startswith(b"HTTP/1.1 "):
        out.status = int(answer[9:12])
    else:
        out.dropped = True
    return out


def listen_request(secure: Secure, extra: str = "") -> bytes:
    key = base64.b64encode(secrets.token_bytes(16)).decode()
    return (f"GET /v1/listen HTTP/1.1\r\nHost: 127.0.0.1:{secure.port}\r\n"
            f"Authorization: Bearer {KEY}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n").encode()


# --------------------------------------------------------------------------- the cases


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    run: Callable[[Secure, Bystander], Awaitable[Outcome]]
    status: int | None = None
    close: int | None = None
    error: str | None = None
    dropped: bool = False
    check: Callable[[Outcome], None] | None = None


def listen(query: str = "", sends: Sequence[Send] = (), **kw: Any) -> Callable[
        [Secure, Bystander], Awaitable[Outcome]]:
    return lambda s, b: session(s, "/v1/listen" + query, sends, **kw)


def closed_after(seconds: float) -> Callable[[Outcome], None]:
    def check(out: Outcome) -> None:
        assert out.messages[0]["type"] == "session"
        closed = out.of_type("closed")
        assert closed and abs(closed[0]["duration"] - seconds) < 0.01, out.messages
    return check


async def expired_token(s: Secure, b: Bystander) -> Outcome:
    token = await asyncio.to_thread(s.mint, expires_in=1)
    await asyncio.sleep(1.3)  # the token's lifetime running out is the case
    return await session(s, sends=[CLOSE], cred=token, how="query")


async def reused_token(s: Secure, b: Bystander) -> Outcome:
    token = await asyncio.to_thread(s.mint)
    first = await session(s, sends=[pcm(0.5), CLOSE], cred=token, how="query")
    assert first.close == 1000, first
    return await session(s, sends=[CLOSE], cred=token, how="query")


async def token_resumes_its_own_session(s: Secure, b: Bystander) -> Outcome:
    token = await asyncio.to_thread(s.mint)
    async with _connect(s, "/v1/listen", cred=token, how="query") as ws:
        sid = json.loads(await ws.recv())["session_id"]
        await ws.send(pcm(0.5))
    out = await session(s, f"/v1/listen?session={sid}", [pcm(0.5), CLOSE], cred=token,
                        how="query")
    assert out.messages[0].get("resumed") is True, out.messages
    return out


def forged(change: dict[str, Any]) -> Callable[[Secure, Bystander], Awaitable[Outcome]]:
    async def run(s: Secure, b: Bystander) -> Outcome:
        token = await asyncio.to_thread(s.mint, max_session_s=5)
        prefix, body, sig = token.split(".")
        claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
        claims.update(change)
        body = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
        return await session(s, sends=[CLOSE], cred=f"{prefix}.{body}.{sig}", how="query")
    return run


async def foreign_secret_token(s: Secure, b: Bystander) -> Outcome:
    token, _ = TokenSigner(secrets.token_urlsafe(40)).mint("hostile", 60, 60)
    return await session(s, sends=[CLOSE], cred=token, how="query")


def mint_with(cred: str | None, query: str) -> Callable[[Secure, Bystander], Awaitable[Outcome]]:
    async def run(s: Secure, b: Bystander) -> Outcome:
        credential = cred if cred != "TOKEN" else await asyncio.to_thread(s.mint)
        headers = {"Authorization": f"Bearer {credential}"} if credential else {}
        status, body = await asyncio.to_thread(s.http, f"/v1/token?{query}", headers)
        return Outcome(status=status, error=body.get("code") if isinstance(body, dict) else None)
    return run


def http_get(path: Callable[[Bystander], str], cred: str | None) -> Callable[
        [Secure, Bystander], Awaitable[Outcome]]:
    async def run(s: Secure, b: Bystander) -> Outcome:
        credential = await asyncio.to_thread(s.mint) if cred == "TOKEN" else cred
        headers = {"Authorization": f"Bearer {credential}"} if credential else {}
        status, body = await asyncio.to_thread(s.http, path(b), headers)
        return Outcome(status=status, error=body.get("code") if isinstance(body, dict) else None)
    return run


def on_bystander(path: str, cred: str = KEY) -> Callable[[Secure, Bystander], Awaitable[Outcome]]:
    """A WebSocket on the bystander's session (resume, viewer) by another principal."""
    async def run(s: Secure, b: Bystander) -> Outcome:
        credential = await asyncio.to_thread(s.mint) if cred == "TOKEN" else cred
        return await session(s, path.format(sid=b.sid), [pcm(0.5)], cred=credential,
                             how="query" if cred == "TOKEN" else "header")
    return run


async def too_many_from_one_address(s: Secure, b: Bystander) -> Outcome:
    ip = next_ip()
    async with _connect(s, "/v1/listen", ip=ip) as one, _connect(s, "/v1/listen", ip=ip) as two:
        await one.recv()
        await two.recv()
        return await session(s, sends=[CLOSE], ip=ip)


async def address_cap_frees_when_a_session_ends(s: Secure, b: Bystander) -> Outcome:
    ip = next_ip()
    async with _connect(s, "/v1/listen", ip=ip) as one:
        await one.recv()
        assert (await session(s, sends=[CLOSE], ip=ip)).close == 1000
        for _ in range(30):  # the slot is released once the server's handler has finished
            out = await session(s, sends=[CLOSE], ip=ip)
            if out.status != 429:
                break
            await asyncio.sleep(0.1)
        return out


async def too_many_for_one_key(s: Secure, b: Bystander) -> Outcome:
    conns = [_connect(s, "/v1/listen", cred=KEY_CAPPED) for _ in range(KEY_CAP)]
    opened = [await c.__aenter__() for c in conns]
    try:
        for ws in opened:
            await ws.recv()
        return await session(s, sends=[CLOSE], cred=KEY_CAPPED)
    finally:
        for c in conns:
            await c.__aexit__(None, None, None)


async def over_the_duration_cap(s: Secure, b: Bystander) -> Outcome:
    token = await asyncio.to_thread(s.mint, max_session_s=3)
    return await session(s, sends=audio_frames(5.0), gap=0.1, cred=token, how="query")


def said_before_the_cap(out: Outcome) -> None:
    """Nothing lost: the speech before the cap came back as a final, then closed."""
    kinds = [m["type"] for m in out.messages]
    assert kinds[-2:] == ["closed", "error"], kinds
    text = " ".join(f["text"] for f in out.of_type("final")).lower()
    assert "americans" in text, out.messages


async def slowloris(s: Secure, b: Bystander) -> Outcome:
    started = time.monotonic()
    out = await raw_request(s, listen_request(s, "X-Padding: " + "a" * 200 + "\r\n"),
                            trickle_s=0.05)
    took = time.monotonic() - started
    assert took < HANDSHAKE_S + 2.0, f"slow handshake held for {took:.1f} s"
    return out


def idle_drained(out: Outcome) -> None:
    assert [m["type"] for m in out.messages][-2:] == ["closed", "error"], out.messages


def flooded(out: Outcome) -> None:
    assert out.messages[0]["type"] == "session"


def nested(depth: int) -> str:
    """JSON nested ``depth`` deep in a control message under MAX_CONTROL_BYTES (4 KiB)."""
    return '{"a":' + "[" * depth + "]" * depth + "}"


def retry_after_given(out: Outcome) -> None:
    assert out.retry_after is not None and int(out.retry_after) >= 1, out


async def request_flood_from_one_address(s: Secure, b: Bystander) -> Outcome:
    ip = next_ip()
    outs = [await asyncio.to_thread(s.request, "GET", "/v1/token", {
        "Authorization": f"Bearer {KEY_FLOOD_IP}", "X-Forwarded-For": ip})
            for _ in range(IP_BURST + 15)]
    statuses = [o.status for o, _ in outs]
    assert statuses[:IP_BURST] == [200] * IP_BURST, statuses
    assert await asyncio.to_thread(lambda: s.mint(KEY_FLOOD_IP)), "other addresses are not"
    return outs[-1][0]


async def request_flood_for_one_key(s: Secure, b: Bystander) -> Outcome:
    outs = [await asyncio.to_thread(s.request, "GET", "/v1/sessions?limit=1", {
        "Authorization": f"Bearer {KEY_FLOOD}"}) for _ in range(KEY_BURST + 20)]
    statuses = [o.status for o, _ in outs]  # each from its own address
    assert statuses[:KEY_BURST] == [200] * KEY_BURST, statuses
    assert (await asyncio.to_thread(s.http, "/v1/sessions?limit=1", {
        "Authorization": f"Bearer {KEY}"}))[0] == 200, "other keys are not"
    return outs[-1][0]


async def brute_force_handshakes(s: Secure, b: Bystander) -> Outcome:
    ip = next_ip()
    for _ in range(FAILURE_BURST):
        out = await session(s, sends=[CLOSE], cred=new_key(), ip=ip)
        assert (out.status, out.error) == (401, "unauthorized"), out
    locked = await session(s, sends=[CLOSE], cred=new_key(), ip=ip)
    assert (locked.status, locked.error) == (429, "rate_limited"), locked
    return await session(s, sends=[CLOSE], ip=ip)  # the right key: still locked out


async def brute_force_over_http(s: Secure, b: Bystander) -> Outcome:
    ip = next_ip()
    for _ in range(FAILURE_BURST):
        out, _ = await asyncio.to_thread(s.request, "GET", "/v1/sessions", {
            "Authorization": f"Bearer {new_key()}", "X-Forwarded-For": ip})
        assert (out.status, out.error) == (401, "unauthorized"), out
    out, _ = await asyncio.to_thread(s.request, "GET", "/v1/token", {
        "Authorization": f"Bearer stt1.{'A' * 40}.{'B' * 43}", "X-Forwarded-For": ip})
    return out


def revoke(token: str, key: str | None = KEY,
           method: str = "POST") -> Callable[[Secure], Outcome]:
    """POST /v1/token/revoke with the token in X-Session-Token, authenticated by ``key``."""
    def run(s: Secure) -> Outcome:
        auth = {"Authorization": f"Bearer {key}"} if key else {}
        out, body = s.request(method, "/v1/token/revoke", {**auth, "X-Session-Token": token})
        if out.status == 200:
            assert body["revoked"] is True, body
        return out
    return run


async def revoked_token(s: Secure, b: Bystander) -> Outcome:
    token = await asyncio.to_thread(s.mint)
    assert (await asyncio.to_thread(revoke(token), s)).status == 200
    assert (await asyncio.to_thread(revoke(token), s)).status == 200  # idempotent
    out = await session(s, sends=[CLOSE], cred=token, how="subprotocol")
    assert out.detail == "token revoked", out
    return out


async def revoke_a_used_token(s: Secure, b: Bystander) -> Outcome:
    token = await asyncio.to_thread(s.mint)
    assert (await session(s, sends=[pcm(0.3), CLOSE], cred=token, how="query")).close == 1000
    return await asyncio.to_thread(revoke(token), s)


def revoke_with(key: str | None = KEY,
                method: str = "POST") -> Callable[[Secure, Bystander], Awaitable[Outcome]]:
    """Revocations that must be refused; ``key`` "TOKEN": authenticate with the token."""
    async def run(s: Secure, b: Bystander) -> Outcome:
        minted = await asyncio.to_thread(s.mint)
        credential = minted if key == "TOKEN" else key
        out = await asyncio.to_thread(revoke(minted, credential, method), s)
        again = await session(s, sends=[pcm(0.3), CLOSE], cred=minted, how="query")
        assert again.close == 1000, "a refused revocation must leave the token usable"
        return out
    return run


async def forged_token_revoked(s: Secure, b: Bystander) -> Outcome:
    token = await asyncio.to_thread(s.mint)
    prefix, body, sig = token.split(".")
    return await asyncio.to_thread(revoke(f"{prefix}.{body}.{sig[::-1]}"), s)


def too_big_for_the_message_limit(out: Outcome) -> None:
    assert out.messages[0]["type"] == "session"
    assert str(MAX_MESSAGE) in out.of_type("error")[0]["message"]


def viewer(sends: Sequence[Send]) -> Callable[[Secure, Bystander], Awaitable[Outcome]]:
    """A viewer of the bystander's session (an API key reads any session) that sends."""
    return lambda s, b: session(s, f"/v1/sessions/{b.sid}/results", sends)


CASES: list[Case] = [
    # ------------------------------------------------ refused before the upgrade
    Case("no_credentials", listen(sends=[CLOSE], cred=None), status=401, error="unauthorized"),
    Case("wrong_api_key", listen(sends=[CLOSE], cred=new_key()), status=401,
         error="unauthorized"),
    Case("basic_auth_instead_of_bearer", listen(sends=[CLOSE], cred=None, headers=[
        ("Authorization", "Basic " + base64.b64encode(b"admin:admin").decode())]),
         status=401, error="unauthorized"),
    Case("two_authorization_headers", listen(sends=[CLOSE], cred=None, headers=[
        ("Authorization", f"Bearer {KEY}"), ("Authorization", f"Bearer {KEY}")]),
         status=400, error="bad_request"),
    Case("two_upgrade_headers", listen(sends=[CLOSE], headers=[("Upgrade", "websocket")]),
         status=400, error="bad_request"),
    Case("expired_token", expired_token, status=401, error="unauthorized"),
    Case("reused_token", reused_token, status=401, error="unauthorized"),
    Case("forged_token_longer_session", forged({"max": 1e9}), status=401,
         error="unauthorized"),
    Case("forged_token_later_expiry", forged({"exp": 9e9}), status=401, error="unauthorized"),
    Case("token_signed_with_another_secret", foreign_secret_token, status=401,
         error="unauthorized"),
    Case("token_cannot_mint_tokens", mint_with("TOKEN", ""), status=401, error="unauthorized"),
    Case("mint_without_credentials", mint_with(None, ""), status=401, error="unauthorized"),
    Case("mint_absurd_expiry", mint_with(KEY, "expires_in=1e12"), status=400,
         error="bad_request"),
    Case("mint_nan_session_length", mint_with(KEY, "max_session_s=nan"), status=400,
         error="bad_request"),
    Case("wrong_origin", listen(sends=[CLOSE], origin="https://evil.example"), status=403,
         error="origin_not_allowed"),
    Case("listing_with_a_session_token", http_get(lambda b: "/v1/sessions", "TOKEN"),
         status=403, error="forbidden"),
    Case("someone_elses_transcript_with_a_token",
         http_get(lambda b: f"/v1/sessions/{b.sid}/transcript.txt", "TOKEN"), status=403,
         error="forbidden"),
    Case("sessions_api_without_credentials", http_get(lambda b: "/v1/sessions", None),
         status=401, error="unauthorized"),
    Case("too_many_sessions_from_one_address", too_many_from_one_address, status=429,
         error="too_many_sessions"),
    Case("too_many_sessions_for_one_key", too_many_for_one_key, status=429,
         error="too_many_sessions"),
    Case("slowloris_handshake", slowloris, dropped=True),
    # ------------------------------------------------ request rates (HTTP 429, Retry-After)
    Case("request_flood_from_one_address", request_flood_from_one_address, status=429,
         error="rate_limited", check=retry_after_given),
    Case("request_flood_for_one_api_key", request_flood_for_one_key, status=429,
         error="rate_limited", check=retry_after_given),
    Case("brute_force_handshakes_lock_the_address_out", brute_force_handshakes, status=429,
         error="rate_limited", check=retry_after_given),
    Case("brute_force_over_http_locks_the_address_out", brute_force_over_http, status=429,
         error="rate_limited", check=retry_after_given),
    # ------------------------------------------------ token revocation
    Case("revoked_token", revoked_token, status=401, error="unauthorized"),
    Case("revoke_a_used_token", revoke_a_used_token, status=409, error="token_used"),
    Case("revoke_another_keys_token", revoke_with(KEY_CAPPED), status=403, error="forbidden"),
    Case("revoke_with_the_token_itself", revoke_with("TOKEN"), status=401,
         error="unauthorized"),
    Case("revoke_without_credentials", revoke_with(None), status=401, error="unauthorized"),
    Case("revoke_with_get", revoke_with(method="GET"), status=405,
         error="method_not_allowed"),
    Case("revoke_a_forged_token", forged_token_revoked, status=400, error="bad_request"),
    Case("header_flood", lambda s, b: raw_request(s, listen_request(
        s, "".join(f"X-H{i}: x\r\n" for i in range(300)))), status=431),
    Case("request_line_too_long", lambda s, b: raw_request(
        s, f"GET /v1/listen?{'a' * 10000} HTTP/1.1\r\n\r\n".encode()), status=414),
    Case("plain_get_on_the_websocket_endpoint", lambda s, b: raw_request(
        s, f"GET /v1/listen HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n\r\n"
        .encode()), status=426),
    # ------------------------------------------------ after the upgrade: limits
    Case("oversized_message", listen(sends=[b"\0" * (MAX_MESSAGE + 2)]), close=1009,
         error="message_too_big", check=too_big_for_the_message_limit),
    Case("oversized_text_message", listen(sends=[json.dumps(  # 2-byte characters in UTF-8
        {"type": "keepalive", "pad": "é" * (MAX_MESSAGE // 2)}, ensure_ascii=False)]),
         close=1009, error="message_too_big", check=too_big_for_the_message_limit),
    # beyond the WebSocket layer's hard bound: refused from the frame header, unread
    Case("message_beyond_the_transport_bound", listen(sends=[b"\0" * (TRANSPORT_MAX + 1)]),
         close=1009),
    Case("thousands_of_tiny_messages", listen(sends=[b"\0\0"] * (MESSAGES_BURST * 6)),
         close=1008, error="too_many_messages", check=flooded),
    Case("oversized_message_to_a_viewer", viewer([b"\0" * (MAX_MESSAGE + 1)]), close=1009,
         error="message_too_big"),
    Case("message_flood_on_a_viewer", viewer(['{"type": "keepalive"}'] * (MESSAGES_BURST * 6)),
         close=1008, error="too_many_messages"),
    Case("too_much_audio_in_one_message", listen(sends=[pcm(1.5)]), close=1009,
         error="message_too_big"),
    Case("ten_times_real_time_flood", listen(sends=audio_frames(11.0), gap=0.01),
         close=1008, error="too_fast", check=flooded),
    Case("idle_client", listen(sends=[], read_timeout=IDLE_S + 20), close=1008,
         error="idle_timeout", check=idle_drained),
    Case("session_over_its_duration_cap", over_the_duration_cap, close=1008,
         error="session_too_long", check=said_before_the_cap),
    # ------------------------------------------------ ownership
    Case("resume_someone_elses_session", on_bystander("/v1/listen?session={sid}"),
         close=1008, error="forbidden"),
    Case("resume_someone_elses_session_with_a_token",
         on_bystander("/v1/listen?session={sid}", "TOKEN"), close=1008, error="forbidden"),
    Case("view_someone_elses_session_with_a_token",
         on_bystander("/v1/sessions/{sid}/results", "TOKEN"), close=1008, error="forbidden"),
    Case("resume_unknown_session", listen(f"?session={'ab' * 16}", [CLOSE]), close=1008,
         error="session_not_found"),
    Case("resume_malformed_session_id", listen("?session=../../etc", [CLOSE]), close=1008,
         error="bad_request"),
    # ------------------------------------------------ query parameters
    Case("sample_rate_zero", listen("?sample_rate=0", [pcm(0.1)]), close=1003,
         error="unsupported_audio"),
    Case("sample_rate_absurd", listen("?sample_rate=99999999999999", [pcm(0.1)]), close=1003,
         error="unsupported_audio"),
    Case("sample_rate_not_a_number", listen("?sample_rate=16k", [pcm(0.1)]), close=1003,
         error="unsupported_audio"),
    Case("sample_rate_blank", listen("?sample_rate=", [pcm(0.1)]), close=1003,
         error="unsupported_audio"),
    Case("encoding_unknown", listen("?encoding=mp3", [pcm(0.1)]), close=1003,
         error="unsupported_audio"),
    Case("encoding_blank", listen("?encoding=", [pcm(0.1)]), close=1003,
         error="unsupported_audio"),
    Case("channels_zero", listen("?channels=0", [pcm(0.1)]), close=1003,
         error="unsupported_audio"),
    Case("channels_seven", listen("?channels=7", [pcm(0.1)]), close=1003,
         error="unsupported_audio"),
    Case("language_injection", listen("?language=en%27%3B--", [pcm(0.1)]), close=1008,
         error="bad_request"),
    Case("after_without_session", listen("?after=5", [pcm(0.1)]), close=1008,
         error="bad_request"),
    Case("no_parameters_at_all_means_defaults", listen("", [pcm(0.5), CLOSE]), close=1000,
         check=closed_after(0.5)),
    # ------------------------------------------------ audio payloads
    Case("odd_byte_counts", listen("", [pcm(1.0)[i:j] for i, j in itertools.pairwise(
        [0, *itertools.accumulate(n % 13 * 2 + 1 for n in range(400)), 32000]) if i < j]
        + [CLOSE]), close=1000, check=closed_after(1.0)),
    Case("nan_float_samples", listen("?encoding=pcm_f32le", [f32([0.1, float("nan"), 0.2])]),
         close=1007, error="invalid_audio"),
    Case("infinite_float_samples", listen("?encoding=pcm_f32le", [f32([float("inf")] * 4)]),
         close=1007, error="invalid_audio"),
    Case("text_where_binary_is_due", listen("", ["hello, this is not audio"]), close=1007,
         error="invalid_audio"),
    Case("invalid_base64", listen("?encoding=wav", ["!!!!not base64!!!!"]), close=1007,
         error="invalid_audio"),
    Case("invalid_utf8_text_frame", listen("", [invalid_utf8_text]), close=1007),
    Case("truncated_wav_header", listen("?encoding=wav", [wav16(JFK[:1600])[:30]]),
         close=1007, error="invalid_audio"),
    Case("wav_lying_data_size", listen("?encoding=wav", [
        wav_with(data_size=0x7FFFFFF0, data=pcm(0.5)), CLOSE]), close=1000,
         check=closed_after(0.5)),
    Case("wav_lying_fmt_chunk_size", listen("?encoding=wav", [
        wav_with(fmt_size=0x7FFFFFF0, data=pcm(0.5))]), close=1007, error="invalid_audio"),
    Case("wav_absurd_sample_rate", listen("?encoding=wav", [
        wav_with(struct.pack("<HHIIHH", 1, 1, 3, 6, 2, 16), data=pcm(0.1))]), close=1003,
         error="unsupported_audio"),
    Case("wav_zero_channels", listen("?encoding=wav", [
        wav_with(struct.pack("<HHIIHH", 1, 0, 16000, 0, 0, 16), data=pcm(0.1))]),
         close=1003, error="unsupported_audio"),
    Case("wav_12_bit_samples", listen("?encoding=wav", [
        wav_with(struct.pack("<HHIIHH", 1, 1, 16000, 24000, 2, 12), data=pcm(0.1))]),
         close=1003, error="unsupported_audio"),
    Case("wav_stream_without_header", listen("?encoding=wav", [pcm(0.1)]), close=1007,
         error="invalid_audio"),
    Case("audio_after_close_is_ignored", listen("", [pcm(0.5), CLOSE, pcm(0.5), pcm(0.5)]),
         close=1000, check=closed_after(0.5)),
    Case("audio_before_the_session_message", listen("", [pcm(0.3), pcm(0.3), CLOSE]),
         close=1000, check=closed_after(0.6)),
    # ------------------------------------------------ control messages
    Case("invalid_json", listen("", [pcm(0.2), '{"type": ']), close=1007,
         error="invalid_message"),
    Case("deeply_nested_json", listen("", [nested(2000)]), close=1007,
         error="invalid_message"),
    Case("control_message_over_4_kib", listen("", [pcm(0.2), json.dumps(
        {"type": "keepalive", "pad": "x" * 4096})]), close=1009, error="message_too_big"),
    Case("unknown_message_type", listen("", ['{"type": "rewind"}']), close=1007,
         error="invalid_message"),
    Case("message_type_not_a_string", listen("", ['{"type": ["close"]}']), close=1007,
         error="invalid_message"),
    # ------------------------------------------------ credentials that work
    Case("token_in_subprotocol_is_not_echoed", lambda s, b: _minted_session(s, "subprotocol"),
         close=1000, check=lambda out: _selected_stt(out)),
    Case("token_resumes_its_own_session", token_resumes_its_own_session, close=1000),
    Case("address_cap_frees_when_a_session_ends", address_cap_frees_when_a_session_ends,
         close=1000),
]


async def _minted_session(s: Secure, how: str) -> Outcome:
    token = await asyncio.to_thread(s.mint)
    return await session(s, sends=[pcm(0.3), CLOSE], cred=token, how=how, origin=ORIGIN)


def _selected_stt(out: Outcome) -> None:
    assert out.subprotocol == "stt"


def test_there_are_at_least_30_hostile_cases() -> None:
    assert len(CASES) >= 30
    assert len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_hostile_input(secure: Secure, bystander: Bystander, case: Case) -> None:
    out = asyncio.run(asyncio.wait_for(case.run(secure, bystander), 90))
    got = (out.status, out.close, out.error, out.dropped)
    assert got == (case.status, case.close, case.error, case.dropped), out
    if case.check is not None:
        case.check(out)
    bystander.assert_unaffected()


def test_cli_authenticates_with_an_api_key(secure: Secure) -> None:
    def stt(*args: str, key: str | None = None) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if k != "STT_API_KEY"}
        if key:
            env["STT_API_KEY"] = key
        return subprocess.run([sys.executable, "-m", "fanout.cli", "--url",
                               f"http://127.0.0.1:{secure.port}", *args], env=env,
                              capture_output=True, text=True, timeout=60)

    refused = stt("sessions")
    assert refused.returncode == 1 and "(unauthorized)" in refused.stderr, refused.stderr
    listed = stt("sessions", "--json", key=KEY)
    assert listed.returncode == 0, listed.stderr
    assert "sessions" in json.loads(listed.stdout)


def test_bystander_sessions_were_all_clean(secure: Secure, bystander: Bystander) -> None:
    """Every JFK session streamed while the cases ran: closed 1000, WER <= 0.10."""
    bystander.stopping.set()
    bystander.join(90)
    assert not bystander.is_alive()
    assert bystander.runs, "no bystander session finished"
    for _, _, outcome in bystander.runs:
        assert Bystander.problem(outcome) is None, Bystander.problem(outcome)
    spans = sorted((a, b) for a, b, _ in bystander.runs)
    gaps = [b2 - a1 for (_, a1), (b2, _) in itertools.pairwise(spans)]
    assert max(gaps, default=0.0) < 2.0, f"the bystander paused between sessions: {gaps}"


def test_no_credentials_in_the_gateway_log(secure: Secure) -> None:
    """The gateway logged at DEBUG (request lines, headers) while keys and tokens flew."""
    log = secure.gateway.log()
    assert "Authorization" in log and "token=" in log, "the log shows no requests at all"
    for secret in [KEY_BYSTANDER, KEY, KEY_CAPPED, KEY_FLOOD, KEY_FLOOD_IP, *secure.minted]:
        assert secret not in log
