"""Storage: one Redis against a 3-primary Redis Cluster (3 replicas), and what waiting for a
replica would cost.

    python -m bench.storage [--sessions 200] [--seconds 5]

* appends: ``sessions`` sessions, one 100 ms frame each per round, through the gateway's
  ``AudioAppender.append_many`` (one hand-packed pipeline on one Redis; the cluster
  client's pipeline, split per node, on a cluster), as many rounds as fit in ``seconds``:
  frames per second and the gateway process's CPU per frame;
* creations: sessions created per second (``create_session``: record, index, queue) with
  64 at a time in flight;
* WAIT: one Redis with one replica; a fenced commit-sized script call alone, and followed
  by ``WAIT 1 1000`` on the same connection: the round trip a replicated final would cost.

Every server is a local ``redis-server`` on this machine: a cluster of six processes on a
2-core box measures the client's cost and the protocol's overhead, not the capacity of six
machines.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import tempfile
import time
from typing import Any

from bench.appends import appender_for
from common import keys
from common.messages import AudioFrame
from common.redis_client import make_redis
from common.sessions import create_session
from common.settings import RedisSettings
from tests.procs import RedisClusterServers, RedisServer, free_port, wait_until

FRAME_BYTES = 3200


async def appends(url: str, sessions: int, seconds: float) -> dict[str, float]:
    r = make_redis(RedisSettings(redis_url=url), read_timeout=False, retries=False)
    try:
        sids = [f"{i:032x}" for i in range(sessions)]
        appender = await appender_for(r, sids)
        pcm = bytes(FRAME_BYTES)
        seq = 0
        frames = 0
        cpu = time.process_time()
        began = time.monotonic()
        while time.monotonic() - began < seconds:
            seq += 1
            replies = await appender.append_many(
                [(sid, 1, [AudioFrame(seq, seq * 1600, pcm)]) for sid in sids])
            assert all(reply == 1 for reply in replies), replies[:3]
            frames += len(sids)
        wall = time.monotonic() - began
        cpu = time.process_time() - cpu
        for sid in sids:
            await r.delete(keys.audio(sid), keys.meta(sid))
        return {"frames_per_s": frames / wall, "cpu_us_per_frame": cpu * 1e6 / frames}
    finally:
        await r.aclose()


async def creations(url: str, seconds: float, in_flight: int = 64) -> dict[str, float]:
    r = make_redis(RedisSettings(redis_url=url))
    try:
        made = 0
        began = time.monotonic()
        n = 0
        while time.monotonic() - began < seconds:
            batch = [f"{n + i:032x}" for i in range(in_flight)]
            n += in_flight
            await asyncio.gather(*(create_session(r, sid, {"model": "tiny.en"})
                                   for sid in batch))
            made += len(batch)
        return {"sessions_per_s": made / (time.monotonic() - began)}
    finally:
        await r.aclose()


async def wait_cost(url: str, calls: int = 500) -> dict[str, float]:
    r = make_redis(RedisSettings(redis_url=url))
    try:
        script = r.register_script(
            "redis.call('HINCRBY', KEYS[1], 'seq', 1) "
            "redis.call('XADD', KEYS[2], '*', 'm', ARGV[1]) return 1")
        body = b"x" * 600  # a final with its words, packed
        out: dict[str, list[float]] = {"commit": [], "commit_then_wait": []}
        for _ in range(calls):
            for name in out:
                began = time.perf_counter()
                if name == "commit":
                    await script(keys=["m{a}", "r{a}"], args=[body])
                else:
                    pipe = r.pipeline(transaction=False)  # one connection: WAIT covers it
                    pipe.evalsha(script.sha, 2, "m{a}", "r{a}", body)
                    pipe.execute_command("WAIT", 1, 1000)
                    got = await pipe.execute()
                    assert got[1] == 1, got
                out[name].append(time.perf_counter() - began)
        return {f"{name}_p50_ms": statistics.median(v) * 1000 for name, v in out.items()} | {
            f"{name}_p99_ms": sorted(v)[int(0.99 * len(v))] * 1000 for name, v in out.items()}
    finally:
        await r.aclose()


def _link_up(node: Any) -> bool:
    try:
        return bool(node.info("replication").get("master_link_status") == "up")
    except Exception:  # not started yet
        return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", type=int, default=200)
    ap.add_argument("--seconds", type=float, default=5.0)
    args = ap.parse_args()
    results: dict[str, Any] = {}
    single = RedisServer()
    single.start()
    cluster = RedisClusterServers(masters=3, replicas=1)
    cluster.start()
    try:
        for name, url in (("one Redis", single.url), ("cluster 3+3", cluster.url)):
            results[name] = asyncio.run(appends(url, args.sessions, args.seconds)) | \
                asyncio.run(creations(url, args.seconds))
    finally:
        cluster.stop()
        single.stop()
    primary = RedisServer()
    primary.start()
    replica_port = free_port()
    # the replica writes the primary's snapshot to its --dir: a scratch folder, not the cwd
    scratch = tempfile.TemporaryDirectory(prefix="stt-replica-")
    replica = subprocess.Popen(["redis-server", "--port", str(replica_port), "--save", "",
                                "--dir", scratch.name,
                                "--appendonly", "no", "--replicaof", "127.0.0.1",
                                str(primary.port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        import redis

        wait_until("the replica in sync", lambda: _link_up(redis.Redis(port=replica_port)), 15)
        results["WAIT"] = asyncio.run(wait_cost(primary.url))
    finally:
        replica.terminate()
        replica.wait()
        scratch.cleanup()
        primary.stop()
    for name, values in results.items():
        print(name + ": " + ", ".join(f"{k} {v:,.2f}" for k, v in values.items()))
    one, many = results["one Redis"], results["cluster 3+3"]
    print(f"cluster / one Redis: appends {many['frames_per_s'] / one['frames_per_s']:.2f}x, "
          f"creations {many['sessions_per_s'] / one['sessions_per_s']:.2f}x, gateway CPU per "
          f"frame {many['cpu_us_per_frame'] / one['cpu_us_per_frame']:.2f}x")


if __name__ == "__main__":
    main()
