"""Tenants against a live gateway with authentication on: the isolation matrix, keys kept in
Redis, and the quotas (concurrent sessions on two gateways; audio per day).

The matrix: every endpoint x {own tenant's key, own tenant's token, other tenant's key, other
tenant's token, admin, no credential} -> the exact HTTP status (or, after an upgrade, the
first message or error code and the close code). The session every read targets was opened
by the own tenant's token (``acme``); the other tenant is ``beta``; the admin key belongs to
``ops`` with scope ``admin``. A read of another tenant's session must answer exactly as one
of an id that does not exist, and no answer to another tenant may carry the session's id or
words. One gateway and one transcriber serve the whole module; most checks transcribe
nothing (the target session is 4 s of speech).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import http.client
import json
import os
import secrets
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from common import keys
from common.auth import TokenSigner, hash_key, new_key
from common.client import listen_url, stream
from common.tenants import KeyStore, day_of, seconds_to_midnight
from tests.audio_refs import frames, load_pcm16, reference, wer
from tests.procs import (
    RedisServer,
    Service,
    free_port,
    start_gateway,
    start_transcriber,
    until,
    wait_port,
)

pytestmark = pytest.mark.integration

SECRET = secrets.token_urlsafe(40)
KEYS = {name: new_key() for name in ("a1", "b1", "root", "g1", "d1", "e1")}
QUOTA_RETRY_S = 7
ENV = {
    "AUTH": "required",
    "API_KEYS": ",".join([
        f"a1={hash_key(KEYS['a1'])};tenant=acme",
        f"b1={hash_key(KEYS['b1'])};tenant=beta",
        f"root={hash_key(KEYS['root'])};tenant=ops;scopes=admin",
        f"g1={hash_key(KEYS['g1'])};tenant=gamma",
        f"d1={hash_key(KEYS['d1'])};tenant=delta",
        f"e1={hash_key(KEYS['e1'])};tenant=epsilon"]),
    "TOKEN_SECRET": SECRET,
    # every request comes from 127.0.0.1: no per-address limits in the way
    "RATE_LIMIT_IP_PER_S": "0", "RATE_LIMIT_KEY_PER_S": "0", "AUTH_FAILURES_PER_MIN": "0",
    "MAX_SESSIONS_PER_IP": "0", "MAX_VIEWERS_PER_IP": "0",
    "RESUME_GRACE_S": "1",
    "QUOTA_GRANT_S": "1",
    "QUOTA_RETRY_AFTER_S": str(QUOTA_RETRY_S),
    "USAGE_REPORT_S": "0.5",
    "REPLAY_MODELS": "tiny.en",
}
JFK = load_pcm16("fw_jfk")
CREDS = ("own_key", "own_token", "other_key", "other_token", "admin", "none")


@dataclasses.dataclass
class World:
    redis: RedisServer
    gateway: Service
    worker: Service
    port: int
    target: str = ""  # acme's session, opened by the own token
    target_text: str = ""
    beta: str = ""  # beta's session, opened by the other token
    tokens: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def auth(self, cred: str) -> dict[str, str]:
        value = {"own_key": KEYS["a1"], "other_key": KEYS["b1"], "admin": KEYS["root"],
                 "own_token": self.tokens.get("own"), "other_token": self.tokens.get("other"),
                 "none": None}[cred]
        return {"Authorization": f"Bearer {value}"} if value else {}

    def mint(self, key: str) -> str:
        status, body, _ = self.http("GET", "/v1/token?expires_in=600",
                                    {"Authorization": f"Bearer {KEYS[key]}"})
        assert status == 200, body
        return str(body["token"])

    def http(self, method: str, path: str, headers: dict[str, str],
             port: int | None = None) -> tuple[int, Any, dict[str, str]]:
        conn = http.client.HTTPConnection("127.0.0.1", port or self.port, timeout=30)
        try:
            conn.request(method, path, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
            kind = resp.getheader("Content-Type", "")
            body: Any = json.loads(raw) if "json" in kind and raw else raw
            return resp.status, body, {k.lower(): v for k, v in resp.getheaders()}
        finally:
            conn.close()


def outcome(status: int, body: Any) -> str:
    """``"404 session_not_found"``; a success is the status alone."""
    if status < 300:
        return str(status)
    code = body.get("code") if isinstance(body, dict) else repr(body)
    return f"{status} {code}"


async def ws_outcome(url: str, headers: dict[str, str], first: bool = True,
                     ) -> tuple[str, list[Any]]:
    """``"101 session"`` (the first message, when ``first``), ``"101 1000"`` (read to the
    close), ``"101 session_not_found 1008"`` (an error), or the refused upgrade's
    ``"401 unauthorized"``; and what came."""
    try:
        async with connect(url, additional_headers=headers, open_timeout=15,
                           close_timeout=5) as ws:
            got: list[Any] = []
            try:
                async with asyncio.timeout(30):
                    async for raw in ws:
                        msg = json.loads(raw)
                        got.append(msg)
                        if msg.get("type") == "error":
                            with contextlib.suppress(Exception):
                                await ws.wait_closed()
                            return f"101 {msg['code']} {ws.close_code}", got
                        if first:
                            # a resumed session that had ended is delivered and closed at
                            # once: the server may have closed before this goes out
                            with contextlib.suppress(ConnectionClosed):
                                await ws.send(json.dumps({"type": "close"}))
                            return f"101 {msg['type']}", got
            except ConnectionClosed:
                pass
            return f"101 {ws.close_code}", got
    except InvalidStatus as exc:
        body = json.loads(exc.response.body or b"{}")
        return f"{exc.response.status_code} {body.get('code')}", [body]


async def refusal(url: str, headers: dict[str, str]) -> tuple[int, str, str]:
    """(status, error code, Retry-After) of an upgrade that must be refused."""
    try:
        ws = await connect(url, additional_headers=headers, open_timeout=15)
    except InvalidStatus as exc:
        return refused_by(exc)
    await ws.close()
    raise AssertionError("the upgrade was accepted")


def refused_by(exc: InvalidStatus) -> tuple[int, str, str]:
    body = json.loads(exc.response.body)
    return exc.response.status_code, body["code"], exc.response.headers.get("Retry-After", "")


@pytest.fixture(scope="module")
def world(module_redis: RedisServer) -> Iterator[World]:
    module_redis.client().flushall()
    worker = start_transcriber(module_redis.url)
    gateway, port = start_gateway(module_redis.url, **ENV)
    w = World(module_redis, gateway, worker, port)
    try:
        w.tokens["own"], w.tokens["other"] = w.mint("a1"), w.mint("b1")
        speech = frames(JFK[:4 * 16000])
        res = asyncio.run(stream(listen_url(w.ws), speech, pace=None,
                                 headers=w.auth("own_token")))
        assert res.close_code == 1000, res.messages
        w.target = res.of_type("session")[0]["session_id"]
        w.target_text = res.text
        assert "fellow americans" in res.text.lower(), res.text
        res = asyncio.run(stream(listen_url(w.ws), speech[:10], pace=None,
                                 headers=w.auth("other_token")))
        assert res.close_code == 1000
        w.beta = res.of_type("session")[0]["session_id"]
        yield w
    finally:
        gateway.stop()
        worker.stop()


def check_row(world: World, endpoint: str, got: dict[str, str],
              expected: dict[str, str]) -> None:
    assert got == expected, f"{endpoint}: {got}"


def http_row(world: World, method: str, path: str) -> tuple[dict[str, str], dict[str, Any]]:
    got, bodies = {}, {}
    for cred in CREDS:
        status, body, _ = world.http(method, path.format(sid=world.target), world.auth(cred))
        got[cred], bodies[cred] = outcome(status, body), body
    return got, bodies


def no_leak(world: World, bodies: dict[str, Any]) -> None:
    """Nothing answered to the other tenant names the target session or carries its words."""
    for cred in ("other_key", "other_token"):
        text = json.dumps(bodies[cred]) if not isinstance(bodies[cred], bytes) \
            else bodies[cred].decode(errors="replace")
        assert world.target not in text
        for word in ("fellow", "americans"):
            assert word not in text.lower()


def same_as_missing(world: World, method: str, path: str, bodies: dict[str, Any]) -> None:
    """Another tenant's session answers byte for byte as an id that does not exist."""
    missing = uuid.uuid4().hex
    status, body, _ = world.http(method, path.format(sid=missing), world.auth("other_key"))
    assert status == 404
    assert bodies["other_key"] == body and bodies["other_token"] == body


READS = {  # path -> what each credential gets
    "/v1/sessions/{sid}": ["200", "200", "404 session_not_found", "404 session_not_found",
                           "200", "401 unauthorized"],
    "/v1/sessions/{sid}/audio.wav": ["200", "200", "404 session_not_found",
                                     "404 session_not_found", "200", "401 unauthorized"],
    "/v1/sessions/{sid}/transcript.txt": ["200", "200", "404 session_not_found",
                                          "404 session_not_found", "200", "401 unauthorized"],
    "/v1/sessions/{sid}/transcript.json": ["200", "200", "404 session_not_found",
                                           "404 session_not_found", "200",
                                           "401 unauthorized"],
}


@pytest.mark.parametrize("path", list(READS))
def test_show_and_exports(world: World, path: str) -> None:
    got, bodies = http_row(world, "GET", path)
    check_row(world, path, got, dict(zip(CREDS, READS[path], strict=True)))
    no_leak(world, bodies)
    same_as_missing(world, "GET", path, bodies)
    if path.endswith(".txt"):
        for cred in ("own_key", "own_token", "admin"):
            assert "fellow" in bodies[cred].decode().lower()
    if path.endswith(".wav"):
        assert len(bodies["own_key"]) == 44 + 2 * 4 * 16000


def test_listing(world: World) -> None:
    got, bodies = http_row(world, "GET", "/v1/sessions?limit=100")
    check_row(world, "list", got, dict(zip(CREDS, [
        "200", "403 forbidden", "200", "403 forbidden", "200", "401 unauthorized"],
        strict=True)))
    listed = {cred: {s["session_id"]: s["tenant"] for s in bodies[cred]["sessions"]}
              for cred in ("own_key", "other_key", "admin")}
    assert world.target in listed["own_key"] and world.beta not in listed["own_key"]
    assert set(listed["own_key"].values()) == {"acme"}
    assert world.beta in listed["other_key"] and world.target not in listed["other_key"]
    assert set(listed["other_key"].values()) == {"beta"}
    assert {world.target, world.beta} <= set(listed["admin"])
    no_leak(world, bodies)


def test_results_viewer(world: World) -> None:
    got, came = {}, {}
    for cred in CREDS:
        got[cred], came[cred] = asyncio.run(ws_outcome(
            f"{world.ws}/v1/sessions/{world.target}/results", world.auth(cred), first=False))
    check_row(world, "results", got, dict(zip(CREDS, [
        "101 1000", "101 1000", "101 session_not_found 1008", "101 session_not_found 1008",
        "101 1000", "401 unauthorized"], strict=True)))
    assert "fellow" in " ".join(m.get("text", "") for m in came["own_token"]).lower()
    _, body = asyncio.run(ws_outcome(
        f"{world.ws}/v1/sessions/{uuid.uuid4().hex}/results", world.auth("other_key")))
    assert came["other_key"] == came["other_token"] == body  # the same error message
    no_leak(world, came)


def test_replay(world: World) -> None:
    got, came = {}, {}
    for cred in CREDS:
        got[cred], came[cred] = asyncio.run(ws_outcome(
            f"{world.ws}/v1/sessions/{world.target}/replay?speed=max", world.auth(cred)))
    # a token opens one session (its own, already): it cannot replay (docs/security.md)
    check_row(world, "replay", got, dict(zip(CREDS, [
        "101 session", "401 unauthorized", "101 session_not_found 1008",
        "401 unauthorized", "101 session", "401 unauthorized"], strict=True)))
    assert came["own_key"][0]["replay_of"] == world.target
    replay = came["admin"][0]["session_id"]
    # the replay is the admin's tenant's session (its work, its usage)
    assert world.redis.client().hget(keys.meta(replay), "tenant") == b"ops"
    _, body = asyncio.run(ws_outcome(
        f"{world.ws}/v1/sessions/{uuid.uuid4().hex}/replay", world.auth("other_key")))
    assert came["other_key"] == body
    no_leak(world, came)


def test_listen_and_resume(world: World) -> None:
    fresh = {"own_token": world.mint("a1"), "other_token": world.mint("b1")}
    got = {}
    for cred in CREDS:  # a new session: anyone with a credential
        headers = {"Authorization": f"Bearer {fresh[cred]}"} if cred in fresh \
            else world.auth(cred)
        got[cred], _ = asyncio.run(ws_outcome(listen_url(world.ws), headers))
    check_row(world, "listen", got, dict(zip(CREDS, [
        "101 session", "101 session", "101 session", "101 session", "101 session",
        "401 unauthorized"], strict=True)))
    got, came = {}, {}
    for cred in CREDS:  # resuming the target: its own tenant only, and only its writers
        got[cred], came[cred] = asyncio.run(ws_outcome(
            listen_url(world.ws, session=world.target), world.auth(cred)))
    check_row(world, "resume", got, dict(zip(CREDS, [
        "101 session", "101 session", "101 session_not_found 1008",
        "101 session_not_found 1008", "101 forbidden 1008", "401 unauthorized"],
        strict=True)))
    _, body = asyncio.run(ws_outcome(listen_url(world.ws, session=uuid.uuid4().hex),
                                     world.auth("other_key")))
    assert came["other_key"] == came["other_token"] == body
    no_leak(world, came)


def test_usage(world: World) -> None:
    got, bodies = http_row(world, "GET", "/v1/usage")
    check_row(world, "usage", got, dict(zip(CREDS, [
        "200", "403 forbidden", "200", "403 forbidden", "200", "401 unauthorized"],
        strict=True)))
    assert {r["tenant"] for r in bodies["own_key"]["usage"]} == {"acme"}
    assert {r["tenant"] for r in bodies["other_key"]["usage"]} == {"beta"}
    assert {"acme", "beta"} <= {r["tenant"] for r in bodies["admin"]["usage"]}
    acme = next(r for r in bodies["own_key"]["usage"] if r["model"] == "tiny.en")
    assert acme["day"] == day_of(time.time())
    assert acme["received_samples"] >= 4 * 16000  # the target (the listen rows sent nothing)
    status, body, _ = world.http("GET", "/v1/usage?tenant=beta", world.auth("own_key"))
    assert outcome(status, body) == "403 forbidden"
    status, body, _ = world.http("GET", "/v1/usage?tenant=acme", world.auth("admin"))
    assert status == 200 and {r["tenant"] for r in body["usage"]} == {"acme"}
    status, body, _ = world.http("GET", "/v1/usage?from=2026-13-01", world.auth("own_key"))
    assert outcome(status, body) == "400 bad_request"
    no_leak(world, bodies)


def test_the_cli_shows_a_keys_usage(world: World) -> None:
    def stt(*args: str, key: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "STT_API_KEY": KEYS[key]}
        return subprocess.run([sys.executable, "-m", "fanout.cli", "--url",
                               f"http://127.0.0.1:{world.port}", "usage", *args], env=env,
                              capture_output=True, text=True, timeout=60)

    own = stt(key="a1")
    assert own.returncode == 0, own.stderr
    lines = own.stdout.splitlines()
    assert lines[0].split() == ["DAY", "TENANT", "MODEL", "RECEIVED", "TRANSCRIBED"]
    assert {line.split()[1] for line in lines[1:]} == {"acme"}
    other = stt("--tenant", "acme", key="b1")
    assert other.returncode == 1 and "(forbidden)" in other.stderr
    everyone = stt("--json", key="root")
    assert {"acme", "beta"} <= {u["tenant"] for u in json.loads(everyone.stdout)["usage"]}


def test_token_mint(world: World) -> None:
    got, bodies = http_row(world, "GET", "/v1/token")
    check_row(world, "token", got, dict(zip(CREDS, [
        "200", "401 unauthorized", "200", "401 unauthorized", "200", "401 unauthorized"],
        strict=True)))
    signer = TokenSigner(SECRET)
    assert signer.verify(bodies["own_key"]["token"]).tenant == "acme"
    assert signer.verify(bodies["other_key"]["token"]).tenant == "beta"
    assert signer.verify(bodies["admin"]["token"]).tenant == "ops"


def test_delete_and_the_audit_trail(world: World) -> None:
    """Deletion: the other tenant gets 404 and the session stays; the own key, the own
    token (its own session) and the admin (another tenant's) delete. Every deletion, export
    and replay is in the audit trail, which only the admin reads."""
    victim_token = world.mint("a1")

    def victim(headers: dict[str, str]) -> str:
        res = asyncio.run(stream(listen_url(world.ws), frames(JFK[:1600]), pace=None,
                                 headers=headers))
        return str(res.of_type("session")[0]["session_id"])

    victims = {"own_key": victim(world.auth("own_key")),
               "own_token": victim({"Authorization": f"Bearer {victim_token}"}),
               "admin": victim(world.auth("other_key"))}
    got, bodies = {}, {}
    for cred in CREDS:
        headers = {"Authorization": f"Bearer {victim_token}"} if cred == "own_token" \
            else world.auth(cred)
        sid = victims.get(cred, world.target)
        status, body, _ = world.http("DELETE", f"/v1/sessions/{sid}", headers)
        got[cred], bodies[cred] = outcome(status, body), body
    check_row(world, "delete", got, dict(zip(CREDS, [
        "204", "204", "404 session_not_found", "404 session_not_found", "204",
        "401 unauthorized"], strict=True)))
    same_as_missing(world, "DELETE", "/v1/sessions/{sid}", bodies)
    assert world.http("GET", f"/v1/sessions/{world.target}", world.auth("admin"))[0] == 200
    for sid in victims.values():
        assert world.http("GET", f"/v1/sessions/{sid}", world.auth("admin"))[0] == 404

    got, bodies = http_row(world, "GET", "/v1/audit?limit=1000")
    check_row(world, "audit", got, dict(zip(CREDS, [
        "403 forbidden", "403 forbidden", "403 forbidden", "403 forbidden", "200",
        "401 unauthorized"], strict=True)))
    entries = bodies["admin"]["entries"]
    deleted = {(e["target"], e["actor"], e["tenant"]) for e in entries
               if e["action"] == "session_deleted"}
    own_token_owner = f"token:{TokenSigner(SECRET).verify(victim_token).nonce}"
    assert deleted == {(victims["own_key"], "key:a1", "acme"),
                       (victims["own_token"], own_token_owner, "acme"),
                       (victims["admin"], "key:root", "beta")}
    exported = [e for e in entries if e["action"] == "session_exported"]
    assert {e["detail"]["format"] for e in exported} >= {"wav", "txt", "json"}
    assert all(e["target"] == world.target and e["tenant"] == "acme" for e in exported)
    replayed = [e for e in entries if e["action"] == "session_replayed"]
    assert {e["actor"] for e in replayed} == {"key:a1", "key:root"}  # the refused: none
    assert all(e["target"] == world.target and len(e["detail"]["replay"]) == 32
               for e in replayed)
    assert all(abs(e["at"] - time.time()) < 600 for e in entries)
    status, body, _ = world.http("GET", "/v1/audit?tenant=beta", world.auth("admin"))
    assert {e["tenant"] for e in body["entries"]} == {"beta"}


def test_fanout_isolates_tenants_the_same_way(world: World) -> None:
    """``python -m fanout`` (the read side) runs the same checks: show, exports, listing,
    viewer and usage for each kind of credential."""
    port = free_port()
    fanout = Service("fanout", ["--host", "127.0.0.1", "--port", str(port)],
                     {"REDIS_URL": world.redis.url, **ENV}, "fanout listening")
    try:
        fanout.wait_ready()
        wait_port(port)
        for path, row in READS.items():
            got = {cred: outcome(*world.http("GET", path.format(sid=world.target),
                                             world.auth(cred), port)[:2]) for cred in CREDS}
            assert got == dict(zip(CREDS, row, strict=True)), (path, got)
        status, body, _ = world.http("GET", "/v1/sessions?limit=100", world.auth("other_key"),
                                     port)
        assert status == 200 and world.target not in json.dumps(body)
        status, body, _ = world.http("GET", "/v1/usage", world.auth("other_key"), port)
        assert status == 200 and {r["tenant"] for r in body["usage"]} == {"beta"}
        got = {cred: asyncio.run(ws_outcome(
            f"ws://127.0.0.1:{port}/v1/sessions/{world.target}/results", world.auth(cred),
            first=False))[0] for cred in CREDS}
        assert got == dict(zip(CREDS, [
            "101 1000", "101 1000", "101 session_not_found 1008",
            "101 session_not_found 1008", "101 1000", "401 unauthorized"], strict=True)), got
    finally:
        fanout.stop()


def test_keys_kept_in_redis_work_until_revoked(world: World) -> None:
    async def make() -> tuple[str, str]:
        async with world.redis.aclient() as r:
            store = KeyStore(r)
            return await store.create("acme-cli", "acme"), await store.create("ops-cli", "ops",
                                                                               ["admin"])

    key, admin = asyncio.run(make())
    status, body, _ = world.http("GET", "/v1/sessions", {"Authorization": f"Bearer {key}"})
    assert status == 200 and {s["tenant"] for s in body["sessions"]} == {"acme"}
    status, body, _ = world.http("GET", f"/v1/sessions/{world.beta}",
                                 {"Authorization": f"Bearer {key}"})
    assert outcome(status, body) == "404 session_not_found"
    status, body, _ = world.http("GET", f"/v1/sessions/{world.beta}",
                                 {"Authorization": f"Bearer {admin}"})
    assert status == 200

    async def revoke() -> None:
        async with world.redis.aclient() as r:
            await KeyStore(r).revoke("acme-cli")

    asyncio.run(revoke())
    status, body, _ = world.http("GET", "/v1/sessions", {"Authorization": f"Bearer {key}"})
    assert outcome(status, body) == "401 unauthorized"  # at once: no cache


def test_concurrent_session_quota_holds_across_two_gateways(world: World) -> None:
    """Tenant gamma may have 3 sessions: 8 opened at once, 4 on each of two gateways, get
    exactly 3 sessions and 5 refusals (429 quota_exceeded, Retry-After); once one ends,
    another opens."""
    world.redis.client().hset(keys.tenant_quota("gamma"), "max_sessions", 3)
    second, port2 = start_gateway(world.redis.url, **ENV)
    try:
        asyncio.run(_concurrent_quota(world, port2))
    finally:
        second.stop()


async def _concurrent_quota(world: World, port2: int) -> None:
    headers = {"Authorization": f"Bearer {KEYS['g1']}"}
    opened: list[Any] = []
    refused: list[tuple[int, str, str]] = []
    start = asyncio.Event()

    async def one(port: int) -> None:
        await start.wait()
        try:
            ws = await connect(listen_url(f"ws://127.0.0.1:{port}"), additional_headers=headers,
                               open_timeout=15)
        except InvalidStatus as exc:
            refused.append(refused_by(exc))
            return
        assert json.loads(await ws.recv())["type"] == "session"
        opened.append(ws)

    tasks = [asyncio.create_task(one(port)) for port in [world.port, port2] * 4]
    await asyncio.sleep(0.1)
    start.set()
    await asyncio.gather(*tasks)
    try:
        assert len(opened) == 3, refused
        assert refused == [(429, "quota_exceeded", str(QUOTA_RETRY_S))] * 5
        assert world.redis.client().zcard(keys.connections("tenant", "gamma")) == 3
        await opened.pop().close()  # its stream closes after the resume grace (1 s)

        async def another() -> bool:
            try:
                ws = await connect(listen_url(f"ws://127.0.0.1:{port2}"),
                                   additional_headers=headers, open_timeout=15)
            except InvalidStatus:
                return False
            opened.append(ws)
            return True

        await until("a fourth session once one ended", another, 15)
    finally:
        for ws in opened:
            await ws.close()


def test_a_session_reaching_its_audio_quota_gets_its_finals_then_the_error(
        world: World) -> None:
    """Tenant delta may send 4 s of audio a day: the JFK clip sent at once stops there (the
    100 ms message that does not fit is the last one stored); the finals of that audio,
    'closed', then quota_exceeded and close 1008. A new session of delta is refused with
    429 and Retry-After until midnight UTC; its usage is the audio stored."""
    world.redis.client().hset(keys.tenant_quota("delta"), "audio_hours_per_day", 4 / 3600)
    headers = {"Authorization": f"Bearer {KEYS['d1']}"}
    res = asyncio.run(stream(listen_url(world.ws), frames(JFK), pace=None, headers=headers))
    types = [r.message["type"] for r in res.messages]
    assert types[-2:] == ["closed", "error"], types
    assert res.messages[-1].message["code"] == "quota_exceeded"
    assert res.close_code == 1008
    assert res.closed_duration == 4.1  # 40 messages of 100 ms, and the one that did not fit
    words = " ".join(reference("fw_jfk").split()[:6])  # "And so, my fellow Americans, ask"
    assert wer(words, res.text) <= 0.34, res.text
    refused = asyncio.run(refusal(listen_url(world.ws), headers))
    assert refused[:2] == (429, "quota_exceeded")
    assert abs(int(refused[2]) - seconds_to_midnight(time.time())) < 60
    sid = res.of_type("session")[0]["session_id"]

    def usage() -> int:
        raw = world.redis.client().hget(keys.usage("delta", day_of(time.time())),
                                        "received:tiny.en")
        return int(raw or 0)

    asyncio.run(until("delta's usage", lambda: usage() == 41 * 1600, 10))
    assert world.http("GET", f"/v1/sessions/{sid}", headers)[0] == 200


def test_replays_count_in_the_audio_quota(world: World) -> None:
    """Tenant epsilon records 1 s, then gets a quota of 1.5 s a day: one replay of it fits,
    the second does not (quota_exceeded, close 1008, nothing replayed), and what it could
    have taken of the quota is given back."""
    headers = {"Authorization": f"Bearer {KEYS['e1']}"}
    res = asyncio.run(stream(listen_url(world.ws), frames(JFK[:16000]), pace=None,
                             headers=headers))
    assert res.close_code == 1000
    sid = res.of_type("session")[0]["session_id"]
    world.redis.client().hset(keys.tenant_quota("epsilon"), "audio_hours_per_day", 1.5 / 3600)
    url = f"{world.ws}/v1/sessions/{sid}/replay"
    first, _ = asyncio.run(ws_outcome(url, headers))
    assert first == "101 session"
    second, came = asyncio.run(ws_outcome(url, headers))
    assert second == "101 quota_exceeded 1008", came
    assert world.redis.client().get(keys.audio_allowance("epsilon", day_of(time.time()))) \
        == b"16000"
    assert [m["type"] for m in came] == ["error"]  # no session message: none was made
