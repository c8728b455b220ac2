"""The gateway's audio path against a real redis-server: many sessions' writers drained by
one flusher keep every frame in order, share round trips, survive a Redis restart with
their audio buffered, and a session taken by another connection fails alone."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from common import keys
from common.errors import SessionNotFound, SessionTaken, StorageFull, StorageUnavailable
from common.streams import AudioAppender
from ingest.writer import AudioFlusher, AudioWriter
from tests.procs import RedisServer, until
from tests.test_streams import frame, stored_seqs

pytestmark = pytest.mark.integration

SESSIONS = 50
FRAMES = 30
SAMPLES = 160


@contextlib.asynccontextmanager
async def writers_on(server: RedisServer, n: int, max_samples: int = 10**6,
                     timeout_s: float | None = None, full_grace_s: float = 5.0, **client: Any,
                     ) -> AsyncIterator[tuple[aioredis.Redis, AudioFlusher, list[AudioWriter]]]:
    """``n`` sessions' writers on one flusher against an emptied ``server``; the flusher and
    the client are closed when the block ends, a failed assertion included."""
    async with server.aclient(**client) as r:
        await r.flushall()
        flusher = AudioFlusher(AudioAppender(r, timeout_s=timeout_s), 256)
        writers = []
        for i in range(n):
            sid = f"s{i:03d}"
            await r.hset(keys.meta(sid), mapping={"attach": 1})
            writers.append(AudioWriter(flusher, sid, 1, max_samples, full_grace_s))
        try:
            yield r, flusher, writers
        finally:
            await flusher.close()


def test_many_sessions_share_round_trips_and_keep_every_frame_in_order(
        own_redis: RedisServer) -> None:
    async def run() -> None:
        async with writers_on(own_redis, SESSIONS) as (r, flusher, writers):

            async def stream(w: AudioWriter) -> None:
                for seq in range(1, FRAMES + 1):
                    await w.put(frame(seq), 5.0)
                    await asyncio.sleep(0)  # frames arrive over many loop turns
                await w.drain()

            await asyncio.gather(*(stream(w) for w in writers))
            for w in writers:
                assert await stored_seqs(r, w.sid) == list(range(1, FRAMES + 1))
            # one pipeline carries many sessions' frames: far fewer round trips than frames
            assert flusher.appender.round_trips <= SESSIONS * FRAMES / 10

    asyncio.run(run())


def test_a_session_resumed_elsewhere_fails_alone(own_redis: RedisServer) -> None:
    async def run() -> None:
        async with writers_on(own_redis, 3) as (r, _, (a, b, c)):
            await r.hset(keys.meta(b.sid), "attach", 2)  # b was resumed on another connection
            for w in (a, b, c):
                await w.put(frame(1), 5.0)
            await a.drain()
            await c.drain()
            with pytest.raises(SessionTaken):
                await b.drain()
            with pytest.raises(SessionTaken):
                await b.put(frame(2), 5.0)
            assert await stored_seqs(r, a.sid) == [1] and await stored_seqs(r, b.sid) == []

    asyncio.run(run())


def test_a_deleted_session_fails_with_session_not_found_not_taken(
        own_redis: RedisServer) -> None:
    """Its record gone (deleted, or expired), the append is refused as session_not_found:
    the client must not be told that another connection took it."""
    async def run() -> None:
        async with writers_on(own_redis, 2) as (r, _, (a, b)):
            await r.delete(keys.meta(b.sid))
            for w in (a, b):
                await w.put(frame(1), 5.0)
            await a.drain()
            with pytest.raises(SessionNotFound):
                await b.drain()
            assert await stored_seqs(r, b.sid) == []

    asyncio.run(run())


async def fill(r: aioredis.Redis) -> None:
    """Redis full: maxmemory below what it uses, noeviction (what docker-compose.yml sets)."""
    used = int((await r.info("memory"))["used_memory"])
    await r.config_set("maxmemory-policy", "noeviction")
    await r.config_set("maxmemory", used // 2)


async def make_room(r: aioredis.Redis) -> None:
    await r.config_set("maxmemory", 0)


def test_a_full_redis_is_ridden_out_within_the_grace_then_ends_the_session(
        own_redis: RedisServer) -> None:
    """Appends refused for lack of memory stay buffered and are sent again with backoff:
    room made within STORAGE_FULL_GRACE_S, every frame lands in order; no room for longer,
    the writer fails with storage_full (close 1013: the client may resume later)."""
    async def run() -> None:
        async with writers_on(own_redis, 2, full_grace_s=1.5) as (r, _, (a, b)):
            for w in (a, b):
                await w.put(frame(1), 5.0)
                await w.drain()
            await fill(r)
            await a.put(frame(2), 5.0)
            await asyncio.sleep(0.5)
            assert await stored_seqs(r, a.sid) == [1]  # refused, buffered
            await make_room(r)  # room again, within the grace
            await a.put(frame(3), 5.0)
            await a.drain()
            assert await stored_seqs(r, a.sid) == [1, 2, 3]

            await fill(r)
            await b.put(frame(2), 5.0)
            with pytest.raises(StorageFull) as failed:
                await asyncio.wait_for(b.drain(), 10)
            assert failed.value.code == "storage_full" and failed.value.close_code == 1013
            with pytest.raises(StorageFull):
                await b.put(frame(3), 5.0)

    asyncio.run(run())


def test_audio_is_buffered_through_a_redis_restart_and_lands_in_order(
        durable_redis: RedisServer) -> None:
    async def run() -> None:
        async with writers_on(durable_redis, 5) as (r, _, writers):
            for w in writers:
                await w.put(frame(1), 5.0)
                await w.drain()
            errors = []
            for w in writers:
                w.on_redis_error = lambda: errors.append(1)
            durable_redis.stop()
            for seq in range(2, 6):  # the client keeps talking while Redis is away
                for w in writers:
                    await w.put(frame(seq), 5.0)
            await until("the writers seeing the outage", lambda: errors)
            assert all(w.pending == 4 for w in writers)
            durable_redis.start()  # the same port and data
            await asyncio.wait_for(asyncio.gather(*(w.drain() for w in writers)), 10)
            for w in writers:
                assert await stored_seqs(r, w.sid) == [1, 2, 3, 4, 5]

    asyncio.run(run())


def test_a_full_buffer_back_pressures_then_refuses(own_redis: RedisServer) -> None:
    async def run() -> None:
        async with writers_on(own_redis, 1, max_samples=3 * SAMPLES) as (_, _, (w,)):
            own_redis.stop()
            for seq in range(1, 4):
                await w.put(frame(seq), 0.2)
            with pytest.raises(StorageUnavailable):  # no room for 0.2 s: refused, not unbounded
                await w.put(frame(4), 0.2)
            assert w.pending == 3

    asyncio.run(run())


def test_a_stalled_redis_times_out_the_round_trip_and_audio_lands_after(
        own_redis: RedisServer) -> None:
    """The gateway's append client has no per-reply timeout; the round trip is bounded."""
    async def run() -> None:
        async with writers_on(own_redis, 1, timeout_s=0.3, socket_timeout=None) as (r, _, (w,)):
            errors: list[int] = []
            w.on_redis_error = lambda: errors.append(1)
            assert own_redis.proc is not None
            own_redis.proc.send_signal(signal.SIGSTOP)  # accepts nothing, answers nothing
            try:
                await w.put(frame(1), 5.0)
                await until("the stalled round trip ending with an error", lambda: errors)
                assert w.pending == 1
            finally:
                own_redis.proc.send_signal(signal.SIGCONT)
            await asyncio.wait_for(w.drain(), 10)
            assert await stored_seqs(r, w.sid) == [1]

    asyncio.run(run())
