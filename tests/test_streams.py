"""The audio appender against a real redis-server: concurrent appends of many sessions keep
each session's frames whole and in order, fencing and idempotence hold per session, and a
Redis failure reaches every caller."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from common import keys
from common.messages import AudioFrame, unpack_audio_entry
from common.streams import AudioAppender
from tests.procs import RedisServer

pytestmark = pytest.mark.integration

SESSIONS = 40
FRAMES = 25


@pytest.fixture(scope="module")
def server(module_redis: RedisServer) -> RedisServer:
    return module_redis


def frame(seq: int) -> AudioFrame:
    return AudioFrame(seq, (seq - 1) * 160, seq.to_bytes(2, "little") * 160)


async def setup(r: aioredis.Redis, sids: list[str]) -> None:
    await r.flushall()
    for sid in sids:
        await r.hset(keys.meta(sid), mapping={"attach": 1})


async def stored_seqs(r: aioredis.Redis, sid: str) -> list[int]:
    entries = await r.xrange(keys.audio(sid))
    out = []
    for _id, fields in entries:
        entry = unpack_audio_entry(fields)
        assert isinstance(entry, AudioFrame)
        assert entry.pcm == frame(entry.seq).pcm
        out.append(entry.seq)
    return out


@pytest.mark.parametrize("max_batch", [1, 8, 256])
def test_concurrent_sessions_keep_every_frame_in_order(server: RedisServer,
                                                       max_batch: int) -> None:
    appender: AudioAppender | None = None

    async def run() -> tuple[list[list[int]], list[bool]]:
        nonlocal appender
        async with server.aclient() as r:
            sids = [f"s{i:03d}" for i in range(SESSIONS)]
            await setup(r, sids)
            appender = AudioAppender(r, max_batch=max_batch)

            async def session(sid: str) -> bool:
                ok = True
                for seq in range(1, FRAMES + 1):
                    ok &= await appender.append(sid, 1, [frame(seq)])
                    if seq == 10:  # a retried write (reply lost): a no-op, not a duplicate
                        ok &= await appender.append(sid, 1, [frame(9), frame(10)])
                return ok

            oks = await asyncio.gather(*(session(s) for s in sids))
            seqs = [await stored_seqs(r, s) for s in sids]
        return seqs, list(oks)

    seqs, oks = asyncio.run(run())
    assert all(oks)
    assert all(s == list(range(1, FRAMES + 1)) for s in seqs)
    assert appender is not None
    appends = SESSIONS * (FRAMES + 1)
    if max_batch == 1:
        assert appender.round_trips == appends
    else:  # the sessions' appends of one loop turn share a round trip, at most max_batch
        assert -(-appends // max_batch) <= appender.round_trips <= appends // 4


def test_a_fenced_session_is_refused_without_affecting_the_others(server: RedisServer) -> None:
    async def run() -> tuple[list[bool], list[int], list[int]]:
        async with server.aclient() as r:
            await setup(r, ["a", "b", "c"])
            await r.hset(keys.meta("b"), "attach", 2)  # b was resumed on another connection
            appender = AudioAppender(r)
            oks = await asyncio.gather(*(appender.append(s, 1, [frame(1), frame(2)])
                                         for s in ("a", "b", "c")))
            a, b = await stored_seqs(r, "a"), await stored_seqs(r, "b")
        return list(oks), a, b

    oks, a, b = asyncio.run(run())
    assert oks == [True, False, True]
    assert a == [1, 2] and b == []


def test_redis_down_fails_every_waiting_append_and_appends_work_again(
        server: RedisServer) -> None:
    async def run() -> None:
        async with server.aclient() as r:
            sids = [f"s{i}" for i in range(10)]
            await setup(r, sids)
            appender = AudioAppender(r)
            server.stop()
            results = await asyncio.gather(*(appender.append(s, 1, [frame(1)]) for s in sids),
                                           return_exceptions=True)
            assert all(isinstance(x, RedisConnectionError) for x in results), results
            server.start()
            await setup(r, sids)
            assert all(await asyncio.gather(*(appender.append(s, 1, [frame(1)]) for s in sids)))
            assert [await stored_seqs(r, s) for s in sids] == [[1]] * 10

    asyncio.run(run())


def test_a_failing_script_call_fails_alone_and_the_connection_stays_in_step(
        server: RedisServer) -> None:
    async def run() -> None:
        async with server.aclient(max_connections=1) as r:  # every round on one connection
            await setup(r, ["a", "b", "c"])
            await r.set(keys.audio("b"), "not a stream")  # b's XADD gets a WRONGTYPE error
            appender = AudioAppender(r)
            replies = await appender.append_many(
                [(s, 1, [frame(1), frame(2)]) for s in ("a", "b", "c")])
            assert replies[0] == 2 and replies[2] == 2
            assert isinstance(replies[1], ResponseError) and "WRONGTYPE" in str(replies[1])
            # the next rounds read their own replies, not ones left over from this round
            assert await appender.append_many([("a", 1, [frame(3)]), ("c", 1, [frame(3)])]) \
                == [1, 1]
            assert await r.get(keys.audio("b")) == b"not a stream"
            assert [await stored_seqs(r, s) for s in ("a", "c")] == [[1, 2, 3]] * 2

    asyncio.run(run())


def test_appends_go_on_after_redis_loses_its_scripts(server: RedisServer) -> None:
    async def run() -> None:
        async with server.aclient() as r:
            await setup(r, ["a", "b"])
            appender = AudioAppender(r)
            assert await appender.append_many([(s, 1, [frame(1)]) for s in "ab"]) == [1, 1]
            await r.script_flush()  # as after a restart: EVALSHA answers NOSCRIPT
            assert await appender.append_many([(s, 1, [frame(2)]) for s in "ab"]) == [1, 1]
            assert [await stored_seqs(r, s) for s in "ab"] == [[1, 2]] * 2

    asyncio.run(run())
