"""Redis credentials and TLS from REDIS_URL, and the least-privilege ACL users.

The ACL test loads ``docker/redis-users.acl`` -- the file the docs tell operators to
use -- into a real redis-server, connects the gateway, the transcriber and fanout each
as its own user, and runs a whole session through them (token auth, a viewer, a
listing, an export, a replay). Nothing may be refused: ``ACL LOG`` must stay empty. So
the documented rules are sufficient, and the negative checks show they are narrow.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import shutil
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from websockets.asyncio.client import connect

from common.auth import hash_key, new_key
from common.client import listen_url, stream
from tests.audio_refs import frames, load_pcm16, reference, wer
from tests.procs import ROOT, Service, free_port, start_gateway, start_transcriber, wait_port
from tests.test_pipeline_e2e import check_protocol, with_tail

pytestmark = pytest.mark.integration

ACL_FILE = ROOT / "docker" / "redis-users.acl"
SERVICES = ("gateway", "transcriber", "fanout")


class OwnRedis:
    """A redis-server started with extra arguments; ``admin`` is a client that may do all."""

    def __init__(self, args: list[str], admin: dict[str, object], tls: bool = False) -> None:
        self.dir = tempfile.mkdtemp(prefix="stt-redis-acl-")
        self.port = free_port()
        ports = ["--port", "0", "--tls-port", str(self.port)] if tls \
            else ["--port", str(self.port)]
        self.proc = subprocess.Popen(
            ["redis-server", "--bind", "127.0.0.1", "--dir", self.dir, "--save", "",
             "--appendonly", "no", *ports, *args],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        self.admin_kwargs = admin
        deadline = time.monotonic() + 10
        while True:
            try:
                self.admin().ping()
                return
            except (redis.ConnectionError, redis.AuthenticationError):
                if self.proc.poll() is not None:
                    self.stop()
                    raise RuntimeError("redis-server refused these arguments") from None
                if time.monotonic() > deadline:
                    self.stop()
                    raise
                time.sleep(0.05)

    def admin(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=10,
                           **self.admin_kwargs)  # type: ignore[arg-type]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def acl_redis() -> Iterator[tuple[OwnRedis, dict[str, str]]]:
    passwords = {name: secrets.token_urlsafe(24) for name in (*SERVICES, "admin")}
    text = ACL_FILE.read_text()
    for name in SERVICES:
        assert f"<{name}-password>" in text
        text = text.replace(f"<{name}-password>", passwords[name])
    text += f"\nuser admin on >{passwords['admin']} ~* &* +@all\n"  # the test's own eyes
    acl = Path(tempfile.mkdtemp(prefix="stt-acl-")) / "users.acl"
    acl.write_text(text)
    server = OwnRedis(["--aclfile", str(acl)],
                      {"username": "admin", "password": passwords["admin"]})
    yield server, passwords
    server.stop()


def url(server: OwnRedis, user: str, password: str) -> str:
    return f"redis://{user}:{password}@127.0.0.1:{server.port}/0"


def metric_line(text: bytes, name: str) -> float:
    for line in text.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def test_the_services_run_a_whole_session_as_least_privilege_acl_users(
        acl_redis: tuple[OwnRedis, dict[str, str]]) -> None:
    server, passwords = acl_redis
    key = new_key()
    auth = {"AUTH": "required", "API_KEYS": f"acl={hash_key(key)}",
            "TOKEN_SECRET": secrets.token_urlsafe(40)}
    worker = start_transcriber(url(server, "transcriber", passwords["transcriber"]))
    gateway, port = start_gateway(url(server, "gateway", passwords["gateway"]),
                                  "--heartbeat-s", "1", **auth)
    fanout_port = free_port()
    fanout = Service("fanout", ["--host", "127.0.0.1", "--port", str(fanout_port)],
                     {"REDIS_URL": url(server, "fanout", passwords["fanout"]), **auth},
                     "fanout listening")
    try:
        fanout.wait_ready()
        wait_port(fanout_port)
        bearer = {"Authorization": f"Bearer {key}"}

        def get(base_port: int, path: str) -> bytes:
            req = urllib.request.Request(f"http://127.0.0.1:{base_port}{path}", headers=bearer)
            with urllib.request.urlopen(req, timeout=30) as resp:
                return bytes(resp.read())

        token = json.loads(get(port, "/v1/token"))["token"]  # consumed: SET NX
        pcm = with_tail(load_pcm16("fw_jfk"))
        res = asyncio.run(stream(listen_url(f"ws://127.0.0.1:{port}", token=token),
                                 frames(pcm), pace=2.0))  # > heartbeat: caps renewed
        check_protocol(res)
        assert wer(reference("fw_jfk"), res.text) <= 0.10, res.text
        sid = res.messages[0].message["session_id"]

        async def view_and_replay() -> tuple[list[str], list[str]]:
            headers = bearer
            viewer_url = f"ws://127.0.0.1:{fanout_port}/v1/sessions/{sid}/results"
            async with connect(viewer_url, additional_headers=headers) as ws:
                viewed = [json.loads(m)["type"] async for m in ws]
            replay_url = f"ws://127.0.0.1:{port}/v1/sessions/{sid}/replay?speed=max"
            async with connect(replay_url, additional_headers=headers) as ws:
                replayed = [json.loads(m)["type"] async for m in ws]
            return viewed, replayed

        viewed, replayed = asyncio.run(view_and_replay())
        assert viewed[0] == "session" and viewed[-1] == "closed" and "final" in viewed
        assert replayed[0] == "session" and replayed[-1] == "closed" and "final" in replayed
        listing = json.loads(get(fanout_port, "/v1/sessions"))
        assert sid in [s["session_id"] for s in listing["sessions"]]
        assert b"fellow Americans" in get(fanout_port, f"/v1/sessions/{sid}/transcript.txt")
        assert len(get(fanout_port, f"/v1/sessions/{sid}/audio.wav")) > 44
        deletion = urllib.request.Request(f"http://127.0.0.1:{port}/v1/sessions/{sid}",
                                          headers=bearer, method="DELETE")
        with urllib.request.urlopen(deletion, timeout=30) as resp:
            assert resp.status == 204  # the gateway's user may unlink a session's keys
        assert not server.admin().exists(f"stt:{{{sid}}}:meta", f"stt:{{{sid}}}:audio")
        assert metric_line(get(port, "/metrics"), "stt_redis_memory_used_bytes") > 0  # INFO
        denied = server.admin().execute_command("ACL", "LOG")
        assert denied == [], f"the documented ACL refused something: {denied}"
    finally:
        fanout.stop()
        gateway.stop()
        worker.stop()


def test_acl_users_cannot_step_outside_their_rules(
        acl_redis: tuple[OwnRedis, dict[str, str]]) -> None:
    server, passwords = acl_redis

    def client(user: str) -> redis.Redis:
        return redis.Redis(port=server.port, username=user, password=passwords[user],
                           socket_timeout=5)

    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=server.port, socket_timeout=5).ping()  # default user is off
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=server.port, username="gateway", password="wrong").ping()
    forbidden = [
        ("fanout", lambda r: r.xadd("stt:{x}:audio", {"m": "1"})),  # read-only
        ("fanout", lambda r: r.hset("stt:{x}:meta", "state", "closed")),
        ("gateway", lambda r: r.xreadgroup("transcribers", "c", {"stt:sessions": ">"})),
        ("gateway", lambda r: r.get("other:key")),
        ("gateway", lambda r: r.flushall()),
        ("gateway", lambda r: r.keys("*")),
        ("transcriber", lambda r: r.config_get("*")),
        ("transcriber", lambda r: r.set("stt:token:x", "1")),
        ("transcriber", lambda r: r.eval("return 1", 0)),
    ]
    for user, action in forbidden:
        with pytest.raises(redis.exceptions.NoPermissionError):
            action(client(user))
    server.admin().execute_command("ACL", "LOG", "RESET")


def test_redis_password_from_the_url() -> None:
    password = secrets.token_urlsafe(16)
    server = OwnRedis(["--requirepass", password],
                      {"password": password})
    try:
        from common.redis_client import make_redis
        from common.settings import RedisSettings

        async def ping(u: str) -> bool:
            client = make_redis(RedisSettings(redis_url=u, redis_retries=0))
            try:
                return bool(await client.ping())
            finally:
                await client.aclose()

        assert asyncio.run(ping(f"redis://:{password}@127.0.0.1:{server.port}/0"))
        with pytest.raises(redis.AuthenticationError):
            asyncio.run(ping(f"redis://:wrong@127.0.0.1:{server.port}/0"))
    finally:
        server.stop()


@pytest.fixture(scope="module")
def tls_redis() -> Iterator[tuple[OwnRedis, Path, str]]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    certs = Path(tempfile.mkdtemp(prefix="stt-tls-"))
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(certs / "key.pem"), "-out", str(certs / "cert.pem"),
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True)
    password = secrets.token_urlsafe(16)
    try:
        server = OwnRedis(
            ["--requirepass", password,
             "--tls-cert-file", str(certs / "cert.pem"), "--tls-key-file", str(certs / "key.pem"),
             "--tls-ca-cert-file", str(certs / "cert.pem"), "--tls-auth-clients", "no"],
            {"password": password, "ssl": True, "ssl_ca_certs": str(certs / "cert.pem")},
            tls=True)
    except RuntimeError:
        pytest.skip("this redis-server was built without TLS")
    yield server, certs / "cert.pem", password
    server.stop()
    shutil.rmtree(certs, ignore_errors=True)


def test_gateway_speaks_tls_to_redis_from_a_rediss_url(
        tls_redis: tuple[OwnRedis, Path, str]) -> None:
    server, ca, password = tls_redis
    tls_url = f"rediss://:{password}@127.0.0.1:{server.port}/0?ssl_ca_certs={ca}"
    gateway, port = start_gateway(tls_url)
    try:
        async def session() -> str:
            async with connect(listen_url(f"ws://127.0.0.1:{port}")) as ws:
                sid = str(json.loads(await ws.recv())["session_id"])
                for chunk, _ in frames(load_pcm16("fw_jfk")[:16000]):
                    await ws.send(chunk)
                await asyncio.sleep(1.0)
            return sid

        sid = asyncio.run(session())
        admin = server.admin()
        deadline = time.monotonic() + 10
        while admin.xlen(f"stt:{{{sid}}}:audio") < 10 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert admin.xlen(f"stt:{{{sid}}}:audio") >= 10  # the 1 s of audio, over TLS
        assert admin.hget(f"stt:{{{sid}}}:meta", "state") == b"active"
        with contextlib.suppress(Exception):
            plain = redis.Redis(port=server.port, password=password, socket_timeout=2)
            plain.ping()
            pytest.fail("the TLS port answered a plain-text client")
    finally:
        gateway.stop()
