"""Real processes for integration tests: redis-server on a free port, and the services."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import redis
import redis.asyncio as aioredis

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(what: str, check: Callable[[], object], limit_s: float = 10.0,
               interval: float = 0.05) -> float:
    """Poll ``check()`` until it is true; the seconds it took. Fails the test, naming
    ``what``, after ``limit_s`` seconds: a wait on a condition instead of a fixed sleep."""
    began = time.monotonic()
    while not check():
        if time.monotonic() - began > limit_s:
            raise AssertionError(f"not within {limit_s:g} s: {what}")
        time.sleep(interval)
    return time.monotonic() - began


async def until(what: str, check: Callable[[], object | Awaitable[object]],
                limit_s: float = 10.0, interval: float = 0.05) -> float:
    """``wait_until`` for a coroutine: ``check`` may be a plain function or return an
    awaitable (a Redis read); the event loop runs while it waits."""
    loop = asyncio.get_running_loop()
    began = loop.time()
    while True:
        got = check()
        if inspect.isawaitable(got):
            got = await got
        if got:
            return loop.time() - began
        if loop.time() - began > limit_s:
            raise AssertionError(f"not within {limit_s:g} s: {what}")
        await asyncio.sleep(interval)


def wait_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on port {port}")


class RedisServer:
    """A redis-server the test owns: it can be stopped, killed and restarted on the same port."""

    def __init__(self, persistence: bool = False, replica_of: RedisServer | None = None,
                 via_port: int | None = None) -> None:
        """``replica_of``: a replica of that server (through ``via_port``, a relay, if
        given)."""
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="stt-redis-")
        self.persistence = persistence
        self.replica_of = replica_of
        self.via_port = via_port
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                "--dir", self.dir, "--save", "", "--protected-mode", "no",
                "--repl-diskless-sync-delay", "0"]  # a replica syncs at once
        args += ["--appendonly", "yes", "--appendfsync", "always"] if self.persistence \
            else ["--appendonly", "no"]
        if self.replica_of is not None:
            args += ["--replicaof", "127.0.0.1", str(self.via_port or self.replica_of.port)]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while True:
            try:
                # the server that answers must be this one, not another on a reused port
                pid = redis.Redis(port=self.port, socket_timeout=1).info("server")["process_id"]
                if pid != self.proc.pid:
                    raise RuntimeError(f"port {self.port} is taken by another redis-server "
                                       f"(pid {pid})")
                return
            except redis.ConnectionError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"redis-server on port {self.port} exited with "
                                       f"{self.proc.returncode}") from None
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a paused one too
            self.proc.terminate()
            self.proc.wait(10)

    def pause(self) -> None:
        """SIGSTOP: it answers nothing and replicates nothing until ``resume``."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def in_sync(self) -> bool:
        """For a replica: its link to the primary is up, and the primary counts it (its
        ROLE lists it: a replica that has loaded the primary's data is listed only after
        its first acknowledgement, and WAIT counts only the replicas listed)."""
        info = redis.Redis(port=self.port, socket_timeout=2).info("replication")
        if info.get("master_link_status") != "up":
            return False
        if self.replica_of is None:
            return True
        role = redis.Redis(port=self.replica_of.port, socket_timeout=2).execute_command("ROLE")
        return any(int(port) == self.port for _ip, port, *_ in role[2])

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=10)

    @contextlib.asynccontextmanager
    async def aclient(self, **options: Any) -> AsyncIterator[aioredis.Redis]:
        """An asyncio client, closed when the block ends (a failed assertion too)."""
        # a test's own client never waits forever on a stalled or vanished server
        options.setdefault("socket_timeout", 30)
        r = aioredis.from_url(self.url, **options)
        try:
            yield r
        finally:
            await r.aclose()


class ReplicationLink:
    """A TCP relay in front of a primary: the replica's ``replicaof`` and the Sentinels'
    ``monitor`` name ``port`` (the same address for both, as Sentinel expects). ``hold()``:
    what the primary sends on a *replication* connection (one that sent PSYNC) from then on
    is thrown away while the connection stays open, so the primary still counts its
    replica as connected but the replica never gets those writes: what a replica misses
    when its primary dies with writes in flight. Other connections pass untouched.
    ``cut()`` closes everything."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.holding = False
        self._socks: list[socket.socket] = []
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def hold(self) -> None:
        self.holding = True

    def cut(self) -> None:
        self._closed = True
        for s in [self._listener, *self._socks]:
            # shutdown first: a close alone does not end a connection that another thread
            # is blocked reading (no FIN would be sent, the peer would hang)
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
                primary = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                continue
            self._socks += [client, primary]
            replication = threading.Event()
            threading.Thread(target=self._pump, args=(client, primary, replication, False),
                             daemon=True).start()
            threading.Thread(target=self._pump, args=(primary, client, replication, True),
                             daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, replication: threading.Event,
              from_primary: bool) -> None:
        try:
            while data := src.recv(65536):
                if not from_primary and (b"PSYNC" in data or b"psync" in data):
                    replication.set()
                if not (from_primary and self.holding and replication.is_set()):
                    dst.sendall(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            dst.close()


class RedisSentinels:
    """A primary, its replica and ``count`` Redis Sentinels watching them as ``master``
    (``redis-server --sentinel``): SIGKILL the primary and the Sentinels promote the
    replica after ``down_after_ms``."""

    def __init__(self, count: int = 3, master: str = "mymaster",
                 down_after_ms: int = 1000) -> None:
        self.primary = RedisServer()
        #: the primary's address for the replica, the Sentinels and the services
        self.link = ReplicationLink(self.primary.port)
        self.replica = RedisServer(replica_of=self.primary, via_port=self.link.port)
        self.master = master
        self.down_after_ms = down_after_ms
        self.ports = [free_port() for _ in range(count)]
        self.dir = tempfile.mkdtemp(prefix="stt-sentinel-")
        self.procs: list[subprocess.Popen[bytes]] = []

    @property
    def addresses(self) -> str:
        """``REDIS_SENTINELS``."""
        return ",".join(f"127.0.0.1:{p}" for p in self.ports)

    def start(self) -> None:
        self.primary.start()
        self.replica.start()
        wait_until("the replica in sync", self.replica.in_sync, 15)
        quorum = len(self.ports) // 2 + 1
        for port in self.ports:
            conf = Path(self.dir) / f"sentinel-{port}.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {self.dir}\n"
                f"sentinel monitor {self.master} 127.0.0.1 {self.link.port} {quorum}\n"
                f"sentinel down-after-milliseconds {self.master} {self.down_after_ms}\n"
                f"sentinel failover-timeout {self.master} 10000\n")
            self.procs.append(subprocess.Popen(
                ["redis-server", str(conf), "--sentinel"],
                stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT))
        wait_until("every Sentinel sees the replica", self._ready, 20, 0.2)

    def _ready(self) -> bool:
        for port in self.ports:
            try:
                s = redis.Redis(port=port, socket_timeout=1)
                if not s.sentinel_slaves(self.master) or len(
                        s.sentinel_sentinels(self.master)) < len(self.ports) - 1:
                    return False
            except redis.RedisError:
                return False
        return True

    def primary_port(self) -> int:
        """The primary's port as the Sentinels say now."""
        s = redis.Redis(port=self.ports[0], socket_timeout=2)
        return int(s.sentinel_get_master_addr_by_name(self.master)[1])

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
        self.replica.stop()
        self.primary.stop()
        self.link.cut()


class RedisClusterServers:
    """A real Redis Cluster on free ports: ``masters`` primaries with ``replicas`` replicas
    each, made of ``redis-server --cluster-enabled yes`` processes joined by
    ``redis-cli --cluster create``. Nodes can be killed (a primary's replica is then
    promoted after ``node_timeout_ms``)."""

    def __init__(self, masters: int = 3, replicas: int = 1, node_timeout_ms: int = 2000) -> None:
        self.masters = masters
        self.replicas = replicas
        self.node_timeout_ms = node_timeout_ms
        self.ports = cluster_ports(masters * (1 + replicas))
        self.dir = tempfile.mkdtemp(prefix="stt-cluster-")
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    @property
    def url(self) -> str:
        """Any node names the whole cluster (``REDIS_URL``)."""
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    def _start_node(self, port: int) -> None:
        node_dir = Path(self.dir) / str(port)
        node_dir.mkdir(exist_ok=True)
        self.procs[port] = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1",
             "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
             "--cluster-node-timeout", str(self.node_timeout_ms), "--dir", str(node_dir),
             "--save", "", "--appendonly", "no", "--protected-mode", "no",
             # a replica that lagged (a test pauses one) may still be promoted
             "--cluster-replica-validity-factor", "0",
             "--logfile", str(node_dir / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)

    def start(self) -> None:
        for port in self.ports:
            self._start_node(port)
        for port in self.ports:
            wait_until(f"cluster node {port}", functools.partial(_pings, port), 10)
        subprocess.run(["redis-cli", "--cluster", "create",
                        *(f"127.0.0.1:{p}" for p in self.ports),
                        "--cluster-replicas", str(self.replicas), "--cluster-yes"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                       timeout=60)
        wait_until("the cluster to be ok", self.healthy, 30, 0.2)

    def healthy(self) -> bool:
        """Every live node says cluster_state:ok, and every live replica has its master's
        data (a replica that never synced is never promoted)."""
        for port, proc in self.procs.items():
            if proc.poll() is not None:
                continue
            node = redis.Redis(port=port, socket_timeout=2)
            if node.cluster("info").get("cluster_state") != "ok":
                return False
            replication = node.info("replication")
            if replication.get("role") == "slave" \
                    and replication.get("master_link_status") != "up":
                return False
        return True

    def client(self) -> redis.RedisCluster:
        return redis.RedisCluster.from_url(self.url, socket_timeout=5)

    def master_of(self, key: str) -> int:
        """The port of the primary that serves ``key``'s slot now."""
        c = self.client()
        try:
            return int(c.get_node_from_key(key).port)
        finally:
            c.close()

    def replica_of(self, port: int) -> int:
        """The port of the replica of the primary on ``port``."""
        node = redis.Redis(port=port, socket_timeout=2)
        try:
            replicas = node.info("replication")
        finally:
            node.close()
        return int(replicas["slave0"]["port"])

    def kill(self, port: int) -> None:
        proc = self.procs[port]
        proc.kill()
        proc.wait(10)

    def pause(self, port: int) -> None:
        """SIGSTOP the node: it answers nothing and replicates nothing until ``resume``."""
        self.procs[port].send_signal(signal.SIGSTOP)

    def resume(self, port: int) -> None:
        self.procs[port].send_signal(signal.SIGCONT)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)


def cluster_ports(n: int) -> list[int]:
    """``n`` ports whose cluster bus ports (port + 10000) are free too: below 55536."""
    out: list[int] = []
    while len(out) < n:
        port = random.randrange(20000, 45000)
        if port in out:
            continue
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 10000))
        except OSError:
            continue
        out.append(port)
    return out


def _pings(port: int) -> bool:
    try:
        return bool(redis.Redis(port=port, socket_timeout=1).ping())
    except redis.ConnectionError:
        return False


#: Test services run without authentication (as `make run` does on 127.0.0.1) unless a
#: test passes AUTH=required (tests/test_security.py does), and without request rate limits
#: (every test client, and the benchmarks' load generators, share 127.0.0.1) unless a test
#: sets them (tests/test_security.py does). Closed sessions keep their raw audio stream
#: unless a test asks for compaction (tests/test_compaction.py does): many tests read the
#: stream of a closed session.
TEST_ENV = {"AUTH": "off", "RATE_LIMIT_IP_PER_S": "0", "RATE_LIMIT_KEY_PER_S": "0",
            "COMPACT_CODEC": "off"}


class Service:
    """``python -m MODULE`` with its log collected; ``ready`` is a line it prints when up."""

    def __init__(self, module: str, args: Sequence[str], env: dict[str, str], ready: str,
                 cwd: Path | str = ROOT) -> None:
        self.module = module
        self.lines: list[str] = []
        self._ready = threading.Event()
        self._marker = ready
        full_env = {**os.environ, **TEST_ENV, **env, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, *args], cwd=cwd, env=full_env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip())
            if self._marker in line:
                self._ready.set()

    def wait_ready(self, timeout: float = 120.0) -> None:
        if not self._ready.wait(timeout):
            raise TimeoutError(f"{self.module} not ready:\n" + "\n".join(self.lines[-40:]))

    def log(self) -> str:
        return "\n".join(self.lines)

    def wait_log(self, text: str, limit_s: float = 10.0) -> float:
        """Wait until a line of the log contains ``text``; the seconds it took."""
        return wait_until(f"{self.module} logging {text!r}",
                          lambda: any(text in line for line in list(self.lines)), limit_s)

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_transcriber(redis_url: str, *args: str, cwd: Path | str = ROOT,
                      **env: str) -> Service:
    """A worker; ``cwd``: the checkout whose code it runs (benchmarks compare revisions)."""
    args = ("--metrics-port", "0", *args)  # several workers share this machine
    svc = Service("transcriber", args, {"REDIS_URL": redis_url, **env}, "ready, capacity",
                  cwd=cwd)
    svc.wait_ready()
    return svc


def start_gateway(redis_url: str, *args: str, port: int = 0, cwd: Path | str = ROOT,
                  **env: str) -> tuple[Service, int]:
    """A gateway on ``port`` (a free one when 0); ``cwd``: the checkout whose code it runs
    (benchmarks compare revisions)."""
    port = port or free_port()
    svc = Service("ingest", ["--host", "127.0.0.1", "--port", str(port), *args],
                  {"REDIS_URL": redis_url, **env}, "gateway listening", cwd=cwd)
    svc.wait_ready()
    wait_port(port)
    return svc, port


class Cluster:
    """A private redis-server with any number of workers and one gateway, for failure tests."""

    def __init__(self, workers: int = 1, worker_args: Sequence[str] = (),
                 gateway_args: Sequence[str] = (), persistence: bool = False,
                 worker_cwd: Path | str = ROOT, gateway_cwd: Path | str = ROOT) -> None:
        self.redis = RedisServer(persistence=persistence)
        self.worker_cwd = worker_cwd
        self.redis.start()
        self.workers: dict[str, Service] = {}
        self.worker_args = list(worker_args)
        for i in range(workers):
            self.add_worker(f"w{i + 1}")
        self.gateway, self.port = start_gateway(self.redis.url, *gateway_args, cwd=gateway_cwd)

    def add_worker(self, name: str) -> Service:
        svc = start_transcriber(self.redis.url, "--consumer", name, *self.worker_args,
                                cwd=self.worker_cwd)
        self.workers[name] = svc
        return svc

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def meta(self, sid: str) -> dict[str, str]:
        raw = self.redis.client().hgetall(f"stt:{{{sid}}}:meta")
        return {k.decode(): v.decode(errors="replace") for k, v in raw.items()}

    def owner(self, sid: str) -> str | None:
        return self.meta(sid).get("owner")

    def result_entries(self, sid: str) -> list[dict[bytes, bytes]]:
        return [fields for _id, fields in self.redis.client().xrange(f"stt:{{{sid}}}:results")]

    def logs(self) -> str:
        parts = [f"--- {name}\n{svc.log()}" for name, svc in self.workers.items()]
        return "\n".join([*parts, f"--- gateway\n{self.gateway.log()}"])

    def close(self) -> None:
        self.gateway.stop()
        for svc in self.workers.values():
            if svc.proc.poll() is None:
                svc.proc.send_signal(signal.SIGCONT)
            svc.stop()
        self.redis.stop()


async def raw(url: str, send: list[str | bytes]) -> tuple[list[dict[str, Any]], int | None]:
    """Send ``send`` on a WebSocket, then read JSON messages to the close: (messages,
    close code). The dialects' hostile-input tests use it."""
    import websockets

    received: list[dict[str, Any]] = []
    async with websockets.connect(url) as ws:
        try:
            for message in send:
                await ws.send(message)
            while True:
                received.append(json.loads(await ws.recv()))
        except websockets.ConnectionClosed:
            pass
        return received, ws.close_code
