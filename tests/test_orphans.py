"""Orphan sessions and cap slots, with real sockets against a gateway with authentication on.

* Sockets reset right after the 101 (before or while the ``session`` message goes out), many
  times from one address: the gateway never has more sessions open for that address than
  its cap, every session it created gets its close marker at once or after the resume
  grace, and the address is admitted again afterwards.
* Sockets dropped after the ``session`` message keep their cap slot through the resume
  grace (HTTP 429 for a further session meanwhile), and free it when their stream is
  closed; a resume within the grace takes the same slot over.
* ``/v1/sessions/{id}/replay/`` (trailing slash) is admitted exactly like ``/replay``: a
  used session token is refused, the caps apply; other spellings are 404.

No transcriber: sessions are only created, fed and closed, which is what the caps count.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import secrets
import socket
import struct
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import numpy as np
import pytest
import redis.asyncio as aioredis
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from common import keys
from common.auth import hash_key, new_key
from common.client import StreamResult, stream
from common.messages import AudioMarker, unpack_audio_entry
from common.settings import GatewaySettings
from ingest.gateway import Gateway
from tests.audio_refs import frames, load_pcm16, reference, wer
from tests.procs import RedisServer, Service, start_gateway, start_transcriber, until

pytestmark = pytest.mark.integration

KEY_RESET, KEY_GRACE, KEY_REPLAY, KEY_CAPPED = new_key(), new_key(), new_key(), new_key()
KEY_INPROC = new_key()
SECRET = secrets.token_urlsafe(40)
IP_CAP, KEY_CAP = 5, 8
GRACE_S = 3.0
API_KEYS = (f"reset={hash_key(KEY_RESET)},grace={hash_key(KEY_GRACE)},"
            f"replay={hash_key(KEY_REPLAY)},capped={hash_key(KEY_CAPPED)},"
            f"inproc={hash_key(KEY_INPROC)}")
GATEWAY_ENV = {
    "AUTH": "required",
    "API_KEYS": API_KEYS,
    "TOKEN_SECRET": SECRET,
    "TRUSTED_PROXIES": "127.0.0.1",  # each test claims its own client address
    "MAX_SESSIONS_PER_IP": str(IP_CAP),
    "MAX_SESSIONS_PER_KEY": str(KEY_CAP),
    "RESUME_GRACE_S": str(GRACE_S),
    "HEARTBEAT_S": "1",  # cap leases renewed (and unstarted upgrades swept) every second
    "MAX_BACKLOG": "100000",  # no transcriber takes the sessions
    "CLOSE_DRAIN_TIMEOUT_S": "1",
}


@pytest.fixture(scope="module")
def stack() -> Iterator[tuple[RedisServer, Service, int]]:
    server = RedisServer()
    server.start()
    gateway, port = start_gateway(server.url, **GATEWAY_ENV)
    yield server, gateway, port
    gateway.stop()
    server.stop()


# --------------------------------------------------------------------------- clients


def upgrade_request(port: int, path: str, ip: str, key: str | None) -> bytes:
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    ws_key = base64.b64encode(secrets.token_bytes(16)).decode()
    return (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{auth}"
            f"X-Forwarded-For: {ip}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {ws_key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode()


async def reset_after_101(port: int, ip: str, key: str | None = KEY_RESET,
                          path: str = "/v1/listen") -> int:
    """A handshake whose socket is reset (SO_LINGER 0: RST, no close frame) as soon as the
    response headers are read, before any WebSocket message. The response status."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(upgrade_request(port, path, ip, key))
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        return int(head[9:12])
    finally:
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()


def ws_connect(port: int, path: str, ip: str, key: str | None = None,
               token: str | None = None) -> Any:
    if token is not None:
        path += ("&" if "?" in path else "?") + f"token={token}"
    headers = [("X-Forwarded-For", ip)]
    if key is not None:
        headers.append(("Authorization", f"Bearer {key}"))
    return connect(f"ws://127.0.0.1:{port}{path}", additional_headers=headers,
                   open_timeout=10, compression=None)


async def status_of(port: int, path: str, ip: str, key: str | None = None,
                    token: str | None = None, hold_s: float = 0.0) -> tuple[int, str | None]:
    """Connect: (101, first message type), or the refused upgrade's (status, error code).
    ``hold_s``: stay connected that long after the first message."""
    try:
        async with ws_connect(port, path, ip, key, token) as ws:
            first = json.loads(await asyncio.wait_for(ws.recv(), 10))
            await asyncio.sleep(hold_s)
            return 101, first.get("type")
    except InvalidStatus as exc:
        code = None
        with contextlib.suppress(ValueError, KeyError, TypeError):
            code = json.loads(exc.response.body)["code"]
        return exc.response.status_code, code


async def open_session(port: int, ip: str, key: str) -> tuple[ClientConnection, str]:
    """A /v1/listen socket that got its 'session' message: (socket, session id)."""
    ws = await ws_connect(port, "/v1/listen", ip, key)
    hello = json.loads(await asyncio.wait_for(ws.recv(), 10))
    assert hello["type"] == "session", hello
    return ws, str(hello["session_id"])


@contextlib.asynccontextmanager
async def holding(port: int, ips: list[str], key: str) -> AsyncIterator[None]:
    """One open session from each of ``ips`` (repeat an address to hold several) while the
    block runs."""
    held = [await open_session(port, ip, key) for ip in ips]
    try:
        yield
    finally:
        for ws, _ in held:
            await ws.close()


async def assert_refused_at_cap(r: aioredis.Redis, port: int, key: str,
                                attempts: list[tuple[str, str]]) -> None:
    """Each (path, address) upgrade gets 429 too_many_sessions and indexes no session."""
    count = await r.zcard(keys.INDEX)
    for path, ip in attempts:
        assert await status_of(port, path, ip, key) == (429, "too_many_sessions"), path
    assert await r.zcard(keys.INDEX) == count


def drop(ws: ClientConnection) -> None:
    """Vanish without a close frame (a lost network, a killed tab)."""
    ws.transport.abort()


# --------------------------------------------------------------------------- Redis side


def ip_set(ip: str) -> str:
    return keys.connections("ip", ip)


async def created(r: aioredis.Redis, since: float = 0.0) -> list[str]:
    """Ids of the sessions created since ``since`` (unix time)."""
    return [m.decode() for m in await r.zrangebyscore(keys.INDEX, since, "+inf")]


async def close_time(r: aioredis.Redis, sid: str) -> float | None:
    """When the session's audio stream got its close marker (unix time), or None."""
    last = await r.xrevrange(keys.audio(sid), count=1)
    if not last:
        return None
    entry = unpack_audio_entry(last[0][1])
    if not (isinstance(entry, AudioMarker) and entry.kind == "close"):
        return None
    return int(last[0][0].split(b"-")[0]) / 1000


async def created_at(r: aioredis.Redis, sid: str) -> float:
    return float(await r.hget(keys.meta(sid), "created") or 0)


async def of_principal(r: aioredis.Redis, sids: list[str], account: str) -> list[str]:
    return [s for s in sids if (await r.hget(keys.meta(s), "account") or b"").decode()
            == account]


# --------------------------------------------------------------------------- resets after 101


def test_sockets_reset_right_after_the_101_never_exceed_the_address_cap(
        stack: tuple[RedisServer, Service, int]) -> None:
    server, gateway, port = stack
    ip = "10.60.0.1"

    async def run() -> None:
        async with server.aclient() as r:
            began = time.time() - 1
            peak = {"open": 0, "members": 0}
            passes = [0]
            stop = asyncio.Event()

            async def watch() -> None:
                """Sessions of this attack still open (no close marker), and cap members."""
                while not stop.is_set():
                    members = await r.zcard(ip_set(ip))
                    mine = await of_principal(r, await created(r, began), "reset")
                    still_open = [s for s in mine if await close_time(r, s) is None]
                    peak["open"] = max(peak["open"], len(still_open))
                    peak["members"] = max(peak["members"], members)
                    passes[0] += 1
                    await asyncio.sleep(0.02)  # sampling interval

            watcher = asyncio.create_task(watch())
            statuses: list[int] = []
            for _ in range(9):  # 45 handshakes, 5 at a time
                statuses += await asyncio.gather(
                    *(reset_after_101(port, ip) for _ in range(5)))
                await asyncio.sleep(0.1)  # the attack's pace: waves, not one burst
            accepted = statuses.count(101)
            assert set(statuses) <= {101, 429}, statuses
            assert accepted >= IP_CAP, statuses

            mine = await of_principal(r, await created(r, began), "reset")
            assert 1 <= len(mine) <= accepted, (len(mine), accepted)
            seen = passes[0]  # the watcher's view after the last wave: a whole pass more
            await until("the watcher's next passes", lambda: passes[0] >= seen + 2)
            assert peak["open"] <= IP_CAP, f"{peak['open']} sessions open at once"

            async def all_closed() -> bool:
                return all([await close_time(r, s) is not None for s in mine])

            await until("every created session closed", all_closed, GRACE_S + 3)
            stop.set()
            await watcher
            assert peak["open"] <= IP_CAP, f"{peak['open']} sessions open at once"
            assert peak["members"] <= IP_CAP, peak
            # closed at once (the 'session' message never went out) or after the grace
            # (it did, and the client may have seen the id), never later
            late = []
            for sid in mine:
                took = (await close_time(r, sid) or 0) - await created_at(r, sid)
                if took > GRACE_S + 2.0:
                    late.append((sid, round(took, 2)))
            assert not late, late

            async def slots_free() -> bool:
                return await r.zcard(ip_set(ip)) == 0

            await until("the address's cap slots freed", slots_free, 10)
            assert await status_of(port, "/v1/listen", ip, KEY_RESET) == (101, "session")

    asyncio.run(asyncio.wait_for(run(), 60))
    assert "Traceback" not in gateway.log(), gateway.log()[-3000:]


async def test_a_session_whose_session_message_cannot_be_sent_closes_at_once(
        stack: tuple[RedisServer, Service, int]) -> None:
    """Deterministic: an in-process gateway whose session creation is slowed down, so the
    client's reset always arrives before the 'session' message goes out. With a resume
    grace of a minute, the session is closed (and its slot freed) at once."""
    server, _, _ = stack
    ip = "10.61.0.1"
    settings = GatewaySettings(
        redis_url=server.url, host="127.0.0.1", port=0, auth="required", api_keys=API_KEYS,
        trusted_proxies="127.0.0.1", resume_grace_s=60.0, heartbeat_s=1.0,
        max_sessions_per_ip=IP_CAP, max_backlog=100000, rate_limit_ip_per_s=0.0,
        rate_limit_key_per_s=0.0)
    gw = Gateway(settings)
    create = gw.store.create

    async def slow_create(sid: str, fields: dict[str, str | int]) -> int:
        generation = await create(sid, fields)
        await asyncio.sleep(0.3)  # the client's RST arrives meanwhile
        return generation

    gw.store.create = slow_create  # type: ignore[method-assign]
    served = await gw.start()
    port = served.port
    try:
        async with server.aclient() as r:
            began = time.time() - 1
            assert [await reset_after_101(port, ip, KEY_INPROC) for _ in range(3)] == [101] * 3

            async def three_closed() -> bool:
                mine = await of_principal(r, await created(r, began), "inproc")
                return len(mine) == 3 and all(
                    [await close_time(r, s) is not None for s in mine])

            took = await until("the three sessions closed", three_closed, 10)
            assert took < 5, took  # not after the 60 s grace

            async def slots_free() -> bool:
                return await r.zcard(ip_set(ip)) == 0

            await until("their cap slots freed", slots_free, 5)
            for sid in await of_principal(r, await created(r, began), "inproc"):
                marker = unpack_audio_entry((await r.xrange(keys.audio(sid)))[-1][1])
                assert marker == AudioMarker("close", 1, 0), marker
    finally:
        await gw.close()


def test_a_good_session_is_served_while_one_address_resets_sockets() -> None:
    """With a transcriber: one address resets sockets after the 101 in a loop while a client
    elsewhere streams the JFK clip; that session is transcribed and closed as usual, and the
    attacker never has more than its cap of sessions open."""
    server = RedisServer()
    server.start()
    worker = start_transcriber(server.url)
    gateway, port = start_gateway(server.url, **GATEWAY_ENV)
    ip = "10.67.0.1"
    pcm = load_pcm16("fw_jfk")
    pcm = np.concatenate([pcm, np.zeros(2 * 16000, dtype=np.int16)])

    async def run() -> tuple[StreamResult, list[int], int]:
        async with server.aclient() as r:
            began = time.time() - 1
            done = asyncio.Event()
            statuses: list[int] = []
            peak = 0

            async def attack() -> None:
                nonlocal peak
                while not done.is_set():
                    statuses.extend(await asyncio.gather(
                        *(reset_after_101(port, ip) for _ in range(5))))
                    mine = await of_principal(r, await created(r, began), "reset")
                    still_open = [s for s in mine if await close_time(r, s) is None]
                    peak = max(peak, len(still_open))
                    await asyncio.sleep(0.05)  # the attack's pace

            attacker = asyncio.create_task(attack())
            try:
                good = await stream(
                    f"ws://127.0.0.1:{port}/v1/listen", frames(pcm), pace=1.0,
                    headers={"Authorization": f"Bearer {KEY_GRACE}",
                             "X-Forwarded-For": "10.67.9.9"}, read_timeout=60)
            finally:
                done.set()
                await attacker
            return good, statuses, peak

    try:
        good, statuses, peak = asyncio.run(asyncio.wait_for(run(), 90))
        assert statuses.count(101) >= IP_CAP, statuses
        assert peak <= IP_CAP, f"{peak} attacker sessions open at once"
        assert good.close_code == 1000, (good.close_code, good.close_reason)
        assert good.of_type("closed"), good.messages[-3:]
        score = wer(reference("fw_jfk"), good.text)
        assert score <= 0.10, (score, good.text)
    finally:
        gateway.stop()
        worker.stop()
        server.stop()


# --------------------------------------------------------------------------- resume grace


def test_dropped_sockets_hold_their_slot_through_the_resume_grace(
        stack: tuple[RedisServer, Service, int]) -> None:
    server, gateway, port = stack
    ip = "10.62.0.1"

    async def run() -> None:
        async with server.aclient() as r:
            opened = [await open_session(port, ip, KEY_GRACE) for _ in range(IP_CAP)]
            assert (await status_of(port, "/v1/listen", ip, KEY_GRACE))[0] == 429
            for ws, _ in opened:
                drop(ws)
            dropped_at = time.monotonic()
            sids = [sid for _, sid in opened]

            # detached, waiting out the grace: still counted
            for sid in sids:
                await asyncio.to_thread(gateway.wait_log, f"session {sid}: socket done")
            assert await status_of(port, "/v1/listen", ip, KEY_GRACE) == \
                (429, "too_many_sessions")
            assert await r.zcard(ip_set(ip)) == IP_CAP
            assert sorted(m.decode() for m in await r.zrange(ip_set(ip), 0, -1)) == \
                sorted(sids)

            # a resume within the grace takes its own slot over: no second one needed
            resumed, kept = await ws_connect(
                port, f"/v1/listen?session={sids[0]}&after=0", ip, KEY_GRACE), sids[0]
            hello = json.loads(await asyncio.wait_for(resumed.recv(), 10))
            assert hello["type"] == "session" and hello["resumed"] is True, hello
            assert hello["session_id"] == kept
            assert await r.zcard(ip_set(ip)) == IP_CAP
            assert (await status_of(port, "/v1/listen", ip, KEY_GRACE))[0] == 429

            # the others are closed after the grace and free their slots; not before
            others = sids[1:]

            async def others_closed() -> bool:
                return all([await close_time(r, s) is not None for s in others])

            await until("the dropped sessions closed", others_closed, GRACE_S + 3)
            closed_after = time.monotonic() - dropped_at
            assert GRACE_S - 0.2 <= closed_after <= GRACE_S + 3, closed_after
            for sid in others:
                assert await close_time(r, sid) is not None

            async def one_left() -> bool:
                return await r.zcard(ip_set(ip)) == 1

            await until("only the resumed session still counted", one_left, 5)
            assert [m.decode() for m in await r.zrange(ip_set(ip), 0, -1)] == [kept]
            assert await close_time(r, kept) is None, "the resumed session was closed"
            assert await status_of(port, "/v1/listen", ip, KEY_GRACE) == (101, "session")

            # past the grace of its first drop, the resumed session still lives and counts
            # (the time passing is what is tested: no event to wait for)
            await asyncio.sleep(max(0.0, dropped_at + GRACE_S + 1.5 - time.monotonic()))
            assert await close_time(r, kept) is None
            assert kept in [m.decode() for m in await r.zrange(ip_set(ip), 0, -1)]

            # a clean close ends it and frees its slot at once (no transcriber: the
            # drain gives up after CLOSE_DRAIN_TIMEOUT_S, the stream is closed anyway)
            await resumed.send(json.dumps({"type": "close"}))
            with contextlib.suppress(ConnectionClosed):
                async for _ in resumed:
                    pass

            async def kept_left() -> bool:
                return kept not in [m.decode() for m in await r.zrange(ip_set(ip), 0, -1)]

            await until("the resumed session's slot freed", kept_left, 5)
            assert await close_time(r, kept) is not None

    asyncio.run(asyncio.wait_for(run(), 60))


def test_a_resume_after_the_grace_is_counted_again_and_caps_still_hold(
        stack: tuple[RedisServer, Service, int]) -> None:
    """A session resumed after its stream closed (to read what is left) is a new slot: with
    the address at its cap it is refused like a new session."""
    server, _, port = stack
    ip = "10.63.0.1"

    async def run() -> None:
        async with server.aclient() as r:
            ws, sid = await open_session(port, ip, KEY_GRACE)
            drop(ws)  # at once: its results reader is still starting

            async def closed() -> bool:
                return await close_time(r, sid) is not None and \
                    await r.zcard(ip_set(ip)) == 0

            await until("the dropped session closed", closed, GRACE_S + 3)
            async with holding(port, [ip] * IP_CAP, KEY_GRACE):
                await assert_refused_at_cap(r, port, KEY_GRACE,
                                            [(f"/v1/listen?session={sid}&after=0", ip)])

    asyncio.run(asyncio.wait_for(run(), 60))


def test_resumes_of_one_session_share_its_slot_and_end_the_previous_socket(
        stack: tuple[RedisServer, Service, int]) -> None:
    """Resuming needs no second slot, so resumes must not pile up sockets: each resume ends
    the socket it took the session from (``session_taken``)."""
    server, _, port = stack
    ip = "10.66.0.1"

    async def run() -> None:
        async with server.aclient() as r:
            ws, sid = await open_session(port, ip, KEY_GRACE)
            sockets = [ws]
            for _ in range(IP_CAP + 3):
                newer = await ws_connect(port, f"/v1/listen?session={sid}&after=0", ip,
                                         KEY_GRACE)
                hello = json.loads(await asyncio.wait_for(newer.recv(), 10))
                assert hello["type"] == "session" and hello["resumed"] is True, hello
                sockets.append(newer)
            assert await r.zcard(ip_set(ip)) == 1
            for old in sockets[:-1]:  # each got the error, then the close
                messages = []
                with contextlib.suppress(ConnectionClosed):
                    async for raw in old:
                        messages.append(json.loads(raw))
                assert [m.get("code") for m in messages if m["type"] == "error"] == \
                    ["session_taken"], messages
                assert old.close_code == 1008
            assert await close_time(r, sid) is None  # the last one still writes it
            await sockets[-1].send(json.dumps({"type": "close"}))
            with contextlib.suppress(ConnectionClosed):
                async for _ in sockets[-1]:
                    pass

            async def freed() -> bool:
                return await r.zcard(ip_set(ip)) == 0

            await until("its slot freed", freed, 5)
            assert await close_time(r, sid) is not None

    asyncio.run(asyncio.wait_for(run(), 60))


# --------------------------------------------------------------------------- replay routes


def mint(port: int, key: str) -> str:
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/v1/token", headers={"Authorization": f"Bearer {key}",
                                                  "X-Forwarded-For": "10.64.9.9"})
        resp = conn.getresponse()
        body = json.loads(resp.read())
        assert resp.status == 200, body
        return str(body["token"])
    finally:
        conn.close()


async def closed_session(r: aioredis.Redis, port: int, ip: str, token: str) -> str:
    """A session the token opened, with a little audio, closed as a transcriber would."""
    async with ws_connect(port, "/v1/listen", ip, token=token) as ws:
        hello = json.loads(await asyncio.wait_for(ws.recv(), 10))
        sid = str(hello["session_id"])
        await ws.send(b"\0\0" * 1600)
        await ws.send(json.dumps({"type": "close"}))
        with contextlib.suppress(ConnectionClosed):
            async for _ in ws:
                pass
    await r.hset(keys.meta(sid), "state", "closed")
    return sid


def test_trailing_slash_replay_is_admitted_like_replay(
        stack: tuple[RedisServer, Service, int]) -> None:
    server, _, port = stack

    async def run() -> None:
        async with server.aclient() as r:
            token = await asyncio.to_thread(mint, port, KEY_REPLAY)
            sid = await closed_session(r, port, "10.64.0.1", token)
            before = await r.zcard(keys.INDEX)

            # the token has opened its one session: every spelling of replay refuses it
            for path in (f"/v1/sessions/{sid}/replay", f"/v1/sessions/{sid}/replay/",
                         f"/v1/sessions/{sid}/replay/?speed=max", "/v1/listen"):
                assert await status_of(port, path, "10.64.0.2", token=token) == \
                    (401, "unauthorized"), path
            assert await r.zcard(keys.INDEX) == before, "a used token opened a session"

            # a fresh token's first use on /replay/ uses it up, as /replay does
            fresh = await asyncio.to_thread(mint, port, KEY_REPLAY)
            got = await status_of(port, f"/v1/sessions/{'ab' * 16}/replay/", "10.64.0.3",
                                  token=fresh)
            assert got[0] == 101, got  # then refused on the socket: not its session
            assert await status_of(port, "/v1/listen", "10.64.0.3", token=fresh) == \
                (401, "unauthorized")

            # other spellings are no route at all
            for path in (f"/v1/sessions/{sid}//replay", f"/v1/sessions//{sid}/replay",
                         f"/v1/sessions/{sid}/%72eplay", f"/v1/sessions/{sid}/replay//"):
                assert (await status_of(port, path, "10.64.0.4", KEY_REPLAY))[0] == 404, path
            assert await r.zcard(keys.INDEX) == before

            # under its caps an API key replays through /replay/: a new session. (Held a
            # moment: redis-py can swallow the cancellation of a results reader that is
            # still connecting, and the replay handler then waits for that reader.)
            assert await status_of(port, f"/v1/sessions/{sid}/replay/?speed=max",
                                   "10.64.0.5", KEY_REPLAY, hold_s=0.5) == (101, "session")
            assert await r.zcard(keys.INDEX) == before + 1

            # at the address's cap, /replay/ is refused like /replay and /v1/listen
            ip = "10.64.0.6"
            async with holding(port, [ip] * IP_CAP, KEY_REPLAY):
                await assert_refused_at_cap(r, port, KEY_REPLAY, [
                    (path, ip) for path in (f"/v1/sessions/{sid}/replay/",
                                            f"/v1/sessions/{sid}/replay", "/v1/listen")])

    asyncio.run(asyncio.wait_for(run(), 60))


def test_trailing_slash_replay_counts_against_the_key_cap(
        stack: tuple[RedisServer, Service, int]) -> None:
    server, _, port = stack

    async def run() -> None:
        async with server.aclient() as r:
            token = await asyncio.to_thread(mint, port, KEY_CAPPED)
            sid = await closed_session(r, port, "10.65.0.1", token)
            async with holding(port, [f"10.65.1.{i}" for i in range(KEY_CAP)], KEY_CAPPED):
                await assert_refused_at_cap(r, port, KEY_CAPPED, [
                    (f"/v1/sessions/{sid}/replay/", "10.65.2.0"),
                    (f"/v1/sessions/{sid}/replay", "10.65.2.1")])

    asyncio.run(asyncio.wait_for(run(), 60))
