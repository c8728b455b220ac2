"""Gateway load: many sockets sending 100 ms frames; frame→XADD latency and gateway CPU.

The load generator is this process, on loopback; the gateway and Redis are
separate processes. No transcriber runs: this measures ingest alone. Every
loop is bounded in sockets and seconds.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import time
from typing import Any

import msgpack
import numpy as np
from websockets.asyncio.client import connect

from bench.sessions import summary
from common.client import listen_url
from tests.procs import RedisServer, start_gateway

FRAME = 1600  # 100 ms at 16 kHz


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _load(url: str, sockets: int, seconds: float) -> tuple[dict[str, list[float]], int]:
    rng = np.random.default_rng(1)
    payload = (rng.normal(0, 300, FRAME)).astype("<i2").tobytes()
    sent: dict[str, list[float]] = {}
    failures = 0
    start_gate = asyncio.Event()
    all_ready = asyncio.Event()

    def ready() -> None:
        if len(sent) + failures >= sockets:
            all_ready.set()

    async def client(i: int) -> None:
        nonlocal failures
        try:
            async with connect(url, compression=None, open_timeout=60) as ws:
                hello = await ws.recv()
                sid = session_id_of(hello)
                times: list[float] = []
                sent[sid] = times
                ready()
                await start_gate.wait()
                t0 = time.monotonic() + (i % 10) * 0.01
                for k in range(int(seconds * 10)):
                    delay = t0 + k * 0.1 - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    times.append(time.time())
                    await ws.send(payload)
                await asyncio.sleep(1.0)  # let the last frames land
                ws.transport.abort()
        except Exception:
            failures += 1
            ready()

    tasks = []
    for i in range(sockets):
        tasks.append(asyncio.create_task(client(i)))
        if i % 50 == 49:
            await asyncio.sleep(0.05)  # don't SYN-flood the listener
    await all_ready.wait()
    start_gate.set()
    await asyncio.gather(*tasks)
    return sent, failures


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f} ms"


def session_id_of(hello: str | bytes) -> str:
    import json

    return str(json.loads(hello)["session_id"])


def gateway_suite(socket_counts: list[int], seconds: float,
                  variants: list[tuple[str, str]] | None = None) -> dict[str, Any]:
    """Each variant (name, extra gateway flags) at each socket count."""
    out: dict[str, Any] = {"seconds": seconds, "variants": {}}
    for name, gateway_args in variants or [("default", "")]:
        rows = _gateway_rows(socket_counts, seconds, shlex.split(gateway_args), name)
        out["variants"][name] = {"gateway_args": gateway_args, "rows": rows}
    out["rows"] = out["variants"][next(iter(out["variants"]))]["rows"]  # the first, for plots
    return out


def _gateway_rows(socket_counts: list[int], seconds: float, extra: list[str],
                  name: str) -> list[dict[str, Any]]:
    rows = []
    for n in socket_counts:
        server = RedisServer()
        server.start()
        # One load generator on one address: lift the per-address cap for this run.
        gateway, port = start_gateway(server.url, "--max-backlog", "1000000",
                                      "--resume-grace-s", "3600",
                                      "--max-sessions-per-ip", str(n + 10), *extra)
        try:
            pid = gateway.proc.pid
            cpu0, wall0 = _cpu_seconds(pid), time.monotonic()
            sent, failures = asyncio.run(_load(listen_url(f"ws://127.0.0.1:{port}"), n, seconds))
            cpu1, wall1 = _cpu_seconds(pid), time.monotonic()
            r = server.client()
            lat = []
            for sid, times in sent.items():
                for entry_id, fields in r.xrange(f"stt:{{{sid}}}:audio"):
                    body = msgpack.unpackb(fields[b"m"])
                    k = body["seq"] - 1
                    if body["k"] == "audio" and k < len(times):
                        lat.append(int(entry_id.decode().split("-")[0]) / 1000.0 - times[k])
            cores = (cpu1 - cpu0) / (wall1 - wall0)
            row: dict[str, Any] = {"sockets": n, "failures": failures, "frames": len(lat),
                   "expected_frames": n * int(seconds * 10),
                   "frame_to_xadd_ms": {k: (v * 1000 if isinstance(v, float) else v)
                                        for k, v in summary(lat).items()},
                   "gateway_cores": cores, "cores_per_100_sockets": cores * 100 / n}
            rows.append(row)
            lat_ms = row["frame_to_xadd_ms"]
            print(f"[gateway] {name} {n} sockets: frame→XADD p50 {_ms(lat_ms['p50'])} "
                  f"p99 {_ms(lat_ms['p99'])}, {row['frames']}/"
                  f"{row['expected_frames']} frames, {failures} failed, gateway "
                  f"{cores:.2f} cores ({row['cores_per_100_sockets']:.3f} per 100 sockets)",
                  flush=True)
        finally:
            gateway.stop()
            server.stop()
    return rows
