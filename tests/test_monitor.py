"""The gateway's session monitor against a real redis-server: one pass tells queued
sessions their position, warns a session whose transcription lags, and refreshes every
heartbeat, in one pipeline whatever the number of sessions."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest
import redis.asyncio as aioredis

from common import keys
from common.messages import Warning, unpack_result
from common.sessions import Sessions
from ingest.monitor import SessionMonitor
from tests.procs import RedisServer, until

pytestmark = pytest.mark.integration


@dataclass(eq=False)
class FakeSession:
    sid: str
    samples_sent: int = 0
    ended: bool = False

    def gone(self) -> None:
        self.ended = True


async def warnings_of(r: aioredis.Redis, sid: str) -> list[Warning]:
    out = []
    for _id, fields in await r.xrange(keys.results(sid)):
        result = unpack_result(fields)
        assert isinstance(result, Warning)
        out.append(result)
    return out


def test_one_pass_tells_positions_lag_and_refreshes_heartbeats(own_redis: RedisServer) -> None:
    async def run() -> None:
        async with own_redis.aclient() as r:
            store = Sessions(r)
            sessions = [FakeSession(f"{i:032x}") for i in range(4)]
            for s in sessions:
                await store.create(s.sid, {"model": "tiny.en"})
                await r.hset(keys.meta(s.sid), "heartbeat", "1.000")
            await r.xgroup_create(keys.SESSIONS, keys.GROUP, id="0")
            # a transcriber took the first two; the second is 5 s behind, the first keeps up
            await r.xreadgroup(keys.GROUP, "w1", {keys.SESSIONS: ">"}, count=2)
            for s, processed in zip(sessions[:2], (16000 * 10, 16000 * 5), strict=True):
                await r.hset(keys.meta(s.sid), mapping={"epoch": 1, "processed_sample": processed})
                s.samples_sent = 16000 * 10
            monitor = SessionMonitor(store, heartbeat_s=5.0, lag_warning_s=3.0)
            for s in sessions:
                monitor.watch(s)
            await monitor.tick()  # the first pass marks the taken sessions as owned
            await monitor.tick()
            await monitor.tick()  # nothing changed: no repeated notices
            got = [await warnings_of(r, s.sid) for s in sessions]
            assert got[0] == []
            assert [(w.code, w.message) for w in got[1]] == [
                ("lag", "transcription is 5.0 s behind the audio")]
            assert [w.message for w in got[2]] == [
                "waiting for a free transcriber (position 1 in queue)"]
            assert [w.message for w in got[3]] == [
                "waiting for a free transcriber (position 2 in queue)"]
            for s in sessions:
                assert float(await r.hget(keys.meta(s.sid), "heartbeat")) > 1.0
            await monitor.close()

    asyncio.run(run())


def test_a_redis_outage_is_counted_and_the_monitor_keeps_running(
        durable_redis: RedisServer) -> None:
    # A durable Redis: the session's record survives the restart. An empty one would tell a
    # tick between the restart and the test restoring the record that the session is gone,
    # and the monitor rightly stops watching it (a race that failed 2 runs of 3).
    own_redis = durable_redis

    async def run() -> None:
        async with own_redis.aclient() as r:
            store = Sessions(r)
            errors: list[int] = []
            monitor = SessionMonitor(store, heartbeat_s=5.0, lag_warning_s=3.0,
                                     on_redis_error=lambda: errors.append(1), interval_s=0.05)
            session = FakeSession("a" * 32)
            await store.create(session.sid, {"model": "tiny.en"})
            own_redis.stop()
            monitor.watch(session)
            await until("the monitor counting the outage", lambda: errors)
            own_redis.start()
            await r.hset(keys.meta(session.sid), "heartbeat", "1.000")
            monitor.heartbeat_s = 0.0  # every pass beats

            async def beaten() -> bool:
                return float(await r.hget(keys.meta(session.sid), "heartbeat")) > 1.0

            await until("the heartbeat refreshed after the outage", beaten)
            await monitor.close()

    asyncio.run(run())


def test_a_deleted_session_is_told_and_no_longer_watched(own_redis: RedisServer) -> None:
    async def run() -> None:
        async with own_redis.aclient() as r:
            store = Sessions(r)
            kept, deleted = FakeSession("a" * 32), FakeSession("b" * 32)
            monitor = SessionMonitor(store, heartbeat_s=5.0, lag_warning_s=3.0)
            for s in (kept, deleted):
                await store.create(s.sid, {"model": "tiny.en"})
                monitor.watch(s)
            await monitor.tick()
            assert not kept.ended and not deleted.ended
            await store.delete(deleted.sid)
            await monitor.tick()
            assert deleted.ended and not kept.ended
            assert list(monitor._sessions) == [kept]
            await monitor.close()

    asyncio.run(run())
