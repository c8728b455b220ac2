"""Gateway load: many sockets sending 100 ms frames; frame→XADD latency and gateway CPU.

The load generator is this process, on loopback; the gateway and Redis are
separate processes. No transcriber runs: this measures ingest alone. Every
loop is bounded in sockets and seconds.
"""

from __future__ import annotations

import asyncio
import functools
import shlex
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
from websockets.asyncio.client import connect
from websockets.frames import Frame, Opcode

from bench.sessions import cpu_seconds, summary
from common.client import listen_url
from tests.procs import ROOT, RedisServer, start_gateway

FRAME = 1600  # 100 ms at 16 kHz


async def _load(url: str, sockets: int, seconds: float, settle_s: float,
                probe: Callable[[], list[float]], memory: Callable[[], float]
                ) -> tuple[dict[str, list[float]], int, float, list[float], float]:
    """Open every socket, wait ``settle_s``, then send 100 ms frames from all of them for
    ``seconds``. Returns the send times per session, the sockets that failed, how long
    opening them took, the change in ``probe()`` (CPU seconds) while they sent, and
    ``memory()`` (the gateway's RSS) once every socket was open."""
    rng = np.random.default_rng(1)
    payload = (rng.normal(0, 300, FRAME)).astype("<i2").tobytes()
    sent: dict[str, list[float]] = {}
    # (transport, frame, send times) per socket, in 10 phases 10 ms apart
    phases: list[list[tuple[asyncio.Transport, bytes, list[float]]]] = [[] for _ in range(10)]
    failures = 0
    done = asyncio.Event()
    all_ready = asyncio.Event()

    def ready() -> None:
        if len(sent) + failures >= sockets:
            all_ready.set()

    async def client(i: int) -> None:
        nonlocal failures
        try:
            async with connect(url, compression=None, open_timeout=60) as ws:
                hello = await ws.recv()
                times: list[float] = []
                sent[session_id_of(hello)] = times
                # Framed (and masked) once by websockets, then written as is by one driver
                # loop: the load generator must cost less than the gateway it measures.
                raw = Frame(Opcode.BINARY, payload).serialize(mask=True, extensions=[])
                phases[i % 10].append((ws.transport, raw, times))
                ready()
                await done.wait()
                ws.transport.abort()
        except Exception:
            failures += 1
            ready()

    tasks = []
    opened = time.monotonic()
    for i in range(sockets):
        tasks.append(asyncio.create_task(client(i)))
        if i % 50 == 49:
            await asyncio.sleep(0.05)  # don't SYN-flood the listener
    await all_ready.wait()
    connect_s = time.monotonic() - opened
    # The connection storm (every socket opened at once) is over before frames are timed:
    # this measures sockets that stream, not the handshakes.
    await asyncio.sleep(settle_s)
    rss = memory()
    before = probe()
    t0 = time.monotonic()
    for k in range(int(seconds * 100)):  # every 10 ms, one phase's sockets send a frame
        delay = t0 + k * 0.01 - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        now = time.time()
        for transport, raw, times in phases[k % 10]:
            times.append(now)
            transport.write(raw)
    used = [b - a for a, b in zip(before, probe(), strict=True)]
    await asyncio.sleep(1.0)  # let the last frames land
    done.set()
    await asyncio.gather(*tasks)
    return sent, failures, connect_s, used, rss


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _total_rss_mb(pids: list[int]) -> float:
    return sum(_rss_mb(p) for p in pids)


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f} ms"


def session_id_of(hello: str | bytes) -> str:
    import json

    return str(json.loads(hello)["session_id"])


def gateway_suite(socket_counts: list[int], seconds: float,
                  variants: list[tuple[str, str]] | None = None,
                  settle_s: float = 2.0, rounds: int = 1) -> dict[str, Any]:
    """Each variant (name, extra gateway flags) at each socket count. ``procs:N`` among a
    variant's flags runs N gateway processes sharing the port (``--reuse-port``); ``--code
    DIR`` runs the gateway from another checkout (a ``git worktree`` of an older revision),
    so a change is compared with the code before it in one run. With ``rounds`` > 1 the
    variants take turns, round after round (a drift of the machine then touches each
    alike), and every round's row is kept."""
    out: dict[str, Any] = {"seconds": seconds, "settle_s": settle_s, "rounds": rounds,
                           "variants": {}}
    variants = variants or [("default", "")]
    for name, gateway_args in variants:
        out["variants"][name] = {"gateway_args": gateway_args, "rows": []}
    for _ in range(rounds):
        for name, gateway_args in variants:
            out["variants"][name]["rows"] += _gateway_rows(
                socket_counts, seconds, settle_s, shlex.split(gateway_args), name)
    out["rows"] = out["variants"][next(iter(out["variants"]))]["rows"]  # the first, for plots
    return out


def _gateway_rows(socket_counts: list[int], seconds: float, settle_s: float,
                  extra: list[str], name: str) -> list[dict[str, Any]]:
    code: Path | str = ROOT
    if "--code" in extra:
        i = extra.index("--code")
        code, extra = Path(extra[i + 1]).resolve(), extra[:i] + extra[i + 2:]
    procs = [int(a.split(":", 1)[1]) for a in extra if a.startswith("procs:")]
    extra = [a for a in extra if not a.startswith("procs:")]
    if procs:
        extra += ["--reuse-port", "true"]
    rows = []
    for n in socket_counts:
        server = RedisServer()
        server.start()
        # One load generator on one address: lift the per-address cap for this run.
        flags = ["--max-backlog", "1000000", "--resume-grace-s", "3600",
                 "--max-sessions-per-ip", str(n + 10), *extra]
        gateway, port = start_gateway(server.url, *flags, cwd=code)
        gateways = [gateway] + [start_gateway(server.url, *flags, port=port, cwd=code)[0]
                                for _ in range(max(procs or [1]) - 1)]
        try:
            pids = [g.proc.pid for g in gateways]
            assert server.proc is not None
            rpid = server.proc.pid

            def probe(pids: list[int] = pids, rpid: int = rpid) -> list[float]:
                return [sum(cpu_seconds(p) for p in pids), cpu_seconds(rpid),
                        time.process_time(), time.monotonic()]

            idle_mb = _total_rss_mb(pids)
            sent, failures, connect_s, (cpu, rcpu, own, wall), loaded_mb = asyncio.run(
                _load(listen_url(f"ws://127.0.0.1:{port}"), n, seconds, settle_s, probe,
                      functools.partial(_total_rss_mb, pids)))
            r = server.client()
            lat = []
            for sid, times in sent.items():
                for entry_id, fields in r.xrange(f"stt:{{{sid}}}:audio"):
                    body = msgpack.unpackb(fields[b"m"])
                    k = body["seq"] - 1
                    if body["k"] == "audio" and k < len(times):
                        lat.append(int(entry_id.decode().split("-")[0]) / 1000.0 - times[k])
            cores = cpu / wall
            row: dict[str, Any] = {"sockets": n, "failures": failures, "frames": len(lat),
                   "gateway_processes": len(gateways), "connect_s": connect_s,
                   "expected_frames": n * int(seconds * 10),
                   "frame_to_xadd_ms": {k: (v * 1000 if isinstance(v, float) else v)
                                        for k, v in summary(lat).items()},
                   "gateway_cores": cores, "cores_per_100_sockets": cores * 100 / n,
                   "redis_cores": rcpu / wall, "load_generator_cores": own / wall,
                   "gateway_rss_idle_mb": idle_mb, "gateway_rss_mb": loaded_mb,
                   "gateway_kb_per_socket": (loaded_mb - idle_mb) * 1024 / n}
            rows.append(row)
            lat_ms = row["frame_to_xadd_ms"]
            print(f"[gateway] {name} {n} sockets: frame→XADD p50 {_ms(lat_ms['p50'])} "
                  f"p99 {_ms(lat_ms['p99'])}, {row['frames']}/"
                  f"{row['expected_frames']} frames, {failures} failed, connect {connect_s:.1f} s, "
                  f"gateway "
                  f"{cores:.2f} cores ({row['cores_per_100_sockets']:.3f} per 100 sockets); "
                  f"redis {row['redis_cores']:.2f}, load generator "
                  f"{row['load_generator_cores']:.2f} cores; gateway RSS {idle_mb:.0f} -> "
                  f"{loaded_mb:.0f} MB ({row['gateway_kb_per_socket']:.1f} kB per socket)",
                  flush=True)
        finally:
            for g in gateways:
                g.stop()
            server.stop()
    return rows
