"""The gateway's audio appends alone: client CPU per script call, redis-py's pipeline
against ``AudioAppender.append_many`` (hiredis-packed, written straight to a connection).

Rounds of ``sessions`` calls, one 100 ms frame each, against a redis-server of its own; the
two ways alternate so that both see the same machine. CPU is this process's only (the
gateway's cost), measured with ``time.process_time``.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import redis.asyncio as aioredis

from common import keys
from common.messages import AudioFrame
from common.streams import AudioAppender, _script_args, _script_keys
from tests.procs import RedisServer

FRAME_BYTES = 3200  # 100 ms of 16 kHz int16


async def _pipeline(appender: AudioAppender, r: aioredis.Redis,
                    appends: list[tuple[str, int, list[AudioFrame]]]) -> list[Any]:
    """The way before (until 09426a4): redis-py's pipeline of EVALSHA calls."""
    pipe = r.pipeline(transaction=False)
    for sid, generation, entries in appends:
        pipe.evalsha(appender._script.sha, 2, *_script_keys(sid),
                     *_script_args(generation, entries))
    return list(await pipe.execute(raise_on_error=False))


async def appender_for(r: aioredis.Redis, sids: list[str],
                       replica_acks: int = 0) -> AudioAppender:
    """An appender with its script loaded, and a record (attach generation 1) for each of
    ``sids``, as a gateway's sessions have."""
    for sid in sids:
        await r.hset(keys.meta(sid), mapping={"attach": 1})
    appender = AudioAppender(r, replica_acks=replica_acks)
    await r.script_load(appender._script.script)
    return appender


async def _measure(sessions: int, rounds: int, repeats: int) -> dict[str, Any]:
    server = RedisServer()
    server.start()
    try:
        async with server.aclient() as r:
            sids = [f"b{i:04d}" for i in range(sessions)]
            appender = await appender_for(r, sids)
            pcm = bytes(FRAME_BYTES)
            seq = 0
            ways = {"redis_py_pipeline": lambda a: _pipeline(appender, r, a),
                    "append_many": appender.append_many}
            out: dict[str, list[float]] = {name: [] for name in ways}
            for _ in range(repeats):
                for name, way in ways.items():
                    began = time.process_time()
                    for _ in range(rounds):
                        seq += 1
                        replies = await way([(sid, 1, [AudioFrame(seq, seq * 1600, pcm)])
                                             for sid in sids])
                        assert all(reply == 1 for reply in replies), replies[:3]
                    out[name].append((time.process_time() - began) * 1e6 / (rounds * sessions))
                    await r.delete(*(keys.audio(sid) for sid in sids))  # bound the memory
            return {"sessions": sessions, "rounds": rounds, "frame_bytes": FRAME_BYTES,
                    "us_cpu_per_call": out}
    finally:
        server.stop()


def appends_suite(sessions: int = 50, rounds: int = 200, repeats: int = 3) -> dict[str, Any]:
    data = asyncio.run(_measure(sessions, rounds, repeats))
    for name, values in data["us_cpu_per_call"].items():
        print(f"[appends] {name}: " + " / ".join(f"{v:.1f}" for v in values)
              + f" us of CPU per call (rounds of {sessions})", flush=True)
    return data
