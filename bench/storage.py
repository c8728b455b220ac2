"""Storage: one Redis against a 3-primary Redis Cluster (3 replicas), and what waiting for a
replica costs (REDIS_REPLICA_ACKS).

    python -m bench.storage [--sessions 200] [--seconds 5]

* appends: ``sessions`` sessions, one 100 ms frame each per round, through the gateway's
  ``AudioAppender.append_many`` (one hand-packed pipeline on one Redis; the cluster
  client's pipeline, split per node, on a cluster), as many rounds as fit in ``seconds``:
  frames per second and the gateway process's CPU per frame;
* creations: sessions created per second (``create_session``: record, index, queue) with
  64 at a time in flight;
* replication: one Redis with one replica; the appends above without and with
  ``REDIS_REPLICA_ACKS=1`` (a ``WAIT`` after each pipeline), and the transcriber's
  ``SessionWriter.commit`` of a 12-word final without and with it (COMMIT, then ``WAIT``
  on the same connection): what a replicated final costs.

Every server is a local ``redis-server`` on this machine: a cluster of six processes on a
2-core box measures the client's cost and the protocol's overhead, not the capacity of six
machines.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

from bench.appends import appender_for
from common import keys
from common.messages import AudioFrame, Final, Word
from common.redis_client import make_redis
from common.sessions import create_session
from common.settings import RedisSettings
from tests.procs import RedisClusterServers, RedisServer, wait_until
from transcriber.commit import SessionWriter

FRAME_BYTES = 3200


async def appends(url: str, sessions: int, seconds: float,
                  replica_acks: int = 0) -> dict[str, float]:
    r = make_redis(RedisSettings(redis_url=url), read_timeout=False, retries=False)
    try:
        sids = [f"{i:032x}" for i in range(sessions)]
        appender = await appender_for(r, sids, replica_acks)
        pcm = bytes(FRAME_BYTES)
        seq = 0
        frames = 0
        cpu = time.process_time()
        began = time.monotonic()
        failed = 0
        while time.monotonic() - began < seconds:
            seq += 1
            batch = [(sid, 1, [AudioFrame(seq, seq * 1600, pcm)]) for sid in sids]
            try:
                replies = await appender.append_many(batch)
            except Exception:
                # (redis-py's cluster pipeline sometimes fails a round on a connection closed
                # under it: 'NoneType' object has no attribute 'writelines')
                failed += 1
                replies = await appender.append_many(batch)
            assert all(reply == 1 for reply in replies), replies[:3]
            frames += len(sids)
        wall = time.monotonic() - began
        cpu = time.process_time() - cpu
        for sid in sids:
            await r.delete(keys.audio(sid), keys.meta(sid))
        return {"frames_per_s": frames / wall, "cpu_us_per_frame": cpu * 1e6 / frames,
                "failed_rounds": failed}
    finally:
        await r.aclose()


async def creations(url: str, seconds: float, in_flight: int = 64) -> dict[str, float]:
    r = make_redis(RedisSettings(redis_url=url))
    try:
        made = failed = 0
        began = time.monotonic()
        n = 0
        while time.monotonic() - began < seconds:
            batch = [f"{n + i:032x}" for i in range(in_flight)]
            n += in_flight
            got = await asyncio.gather(*(create_session(r, sid, {"model": "tiny.en"})
                                         for sid in batch), return_exceptions=True)
            # a creation that failed is made again (create_session is idempotent), as a
            # client would retry it; counted (redis-py's cluster client: see appends)
            again = [sid for sid, g in zip(batch, got, strict=True) if isinstance(g, Exception)]
            failed += len(again)
            await asyncio.gather(*(create_session(r, sid, {"model": "tiny.en"})
                                   for sid in again))
            made += len(batch)
        return {"sessions_per_s": made / (time.monotonic() - began), "failed_creations": failed}
    finally:
        await r.aclose()


async def commit_cost(url: str, calls: int = 500) -> dict[str, float]:
    """Time per final written by the transcriber's SessionWriter, without and with
    REDIS_REPLICA_ACKS=1 (its COMMIT script, then WAIT on the same connection)."""
    r = make_redis(RedisSettings(redis_url=url), retries=False)
    try:
        out: dict[str, list[float]] = {"commit": [], "commit_acked": []}
        writers = {}
        for name in out:
            sid = f"bench-{name}"
            await r.hset(keys.meta(sid), mapping={"epoch": 1, "seq": 0, "next_utterance": 0})
            writers[name] = SessionWriter(r, sid, 1, replica_acks=int(name == "commit_acked"))
        words = tuple(Word(f"word{i}", i * 0.3, i * 0.3 + 0.25, 0.9) for i in range(12))
        for u in range(calls):
            for name, writer in writers.items():
                final = Final(writer.sid, u, "a final of twelve words " * 3, u, u + 3.0, words)
                began = time.perf_counter()
                assert await writer.commit(final, (u + 1) * 48000, u + 1, "prompt", "0-0") > 0
                out[name].append(time.perf_counter() - began)
        return {f"{name}_p50_ms": statistics.median(v) * 1000 for name, v in out.items()} | {
            f"{name}_p99_ms": sorted(v)[int(0.99 * len(v))] * 1000 for name, v in out.items()}
    finally:
        await r.aclose()


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
    replica = RedisServer(replica_of=primary)
    replica.start()
    try:
        wait_until("the replica in sync", replica.in_sync, 15)
        results["primary+replica"] = asyncio.run(appends(primary.url, args.sessions,
                                                         args.seconds))
        results["primary+replica, acks 1"] = asyncio.run(
            appends(primary.url, args.sessions, args.seconds, replica_acks=1))
        results["WAIT"] = asyncio.run(commit_cost(primary.url))
    finally:
        replica.stop()
        primary.stop()
    for name, values in results.items():
        print(name + ": " + ", ".join(f"{k} {v:,.2f}" for k, v in values.items()))
    one, many = results["one Redis"], results["cluster 3+3"]
    print(f"cluster / one Redis: appends {many['frames_per_s'] / one['frames_per_s']:.2f}x, "
          f"creations {many['sessions_per_s'] / one['sessions_per_s']:.2f}x, gateway CPU per "
          f"frame {many['cpu_us_per_frame'] / one['cpu_us_per_frame']:.2f}x")
    plain, acked = results["primary+replica"], results["primary+replica, acks 1"]
    print(f"appends with REDIS_REPLICA_ACKS=1 / without: "
          f"{acked['frames_per_s'] / plain['frames_per_s']:.2f}x frames per second, "
          f"{acked['cpu_us_per_frame'] / plain['cpu_us_per_frame']:.2f}x CPU per frame")


if __name__ == "__main__":
    main()
