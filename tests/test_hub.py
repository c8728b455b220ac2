"""The viewer hub (fanout/hub.py) against a real redis-server: one reader per viewed
session offers each result to every viewer's bounded queue in order, never waits on a
viewer (a full queue fails that viewer alone with too_slow), waits out a Redis restart
without losing or repeating a result, and ends its viewers when the session closes or its
record is gone. Results are written straight into the stream, as the transcriber's
scripts store them (seq beside the packed body)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from common import keys
from common.errors import SessionNotFound, TooSlow
from common.messages import Closed, Final, Partial, Result, pack_result
from common.redis_client import make_redis
from common.settings import RedisSettings
from fanout.hub import EXISTS_EVERY, Hubs, ViewerQueue
from tests.procs import RedisServer, until

pytestmark = pytest.mark.integration

#: The hub's blocking read: short, so that the tests that wait on an idle read are quick.
BLOCK_MS = 100


class Session:
    """A session record and its results stream, written the way the scripts store them."""

    def __init__(self, r: aioredis.Redis) -> None:
        self.r = r
        self.sid = uuid.uuid4().hex
        self.seq = 0

    async def create(self) -> Session:
        await self.r.hset(keys.meta(self.sid), mapping={"state": "active", "seq": 0})
        return self

    async def write(self, *kinds: str) -> list[int]:
        """Store one result per kind (``partial``, ``final``, ``closed``) in one round
        trip; their seqs."""
        pipe = self.r.pipeline(transaction=False)
        seqs = []
        for kind in kinds:
            self.seq += 1
            u = self.seq
            made: dict[str, Result] = {
                "partial": Partial(self.sid, u, f"words {u}", "", float(u), u + 0.5),
                "final": Final(self.sid, u, f"utterance {u}", float(u), u + 0.5),
                "closed": Closed(self.sid, u, float(u)),
            }
            pipe.xadd(keys.results(self.sid),
                      {"seq": self.seq, "m": pack_result(made[kind]), "epoch": 1})
            seqs.append(self.seq)
        await pipe.execute()
        return seqs


@contextlib.asynccontextmanager
async def hubs_on(server: RedisServer, viewer_queue: int = 64) -> AsyncIterator[Hubs]:
    """The hubs of one process, on clients made as the servers make theirs (the blocking
    one waits out outages itself: no client retries)."""
    settings = RedisSettings(redis_url=server.url, redis_block_ms=BLOCK_MS)
    redis = make_redis(settings)
    blocking = make_redis(settings, blocking=True, retries=False)
    hubs = Hubs(redis, blocking, BLOCK_MS, viewer_queue)
    try:
        yield hubs
    finally:
        await hubs.close()
        await blocking.aclose()
        await redis.aclose()


async def received(viewer: ViewerQueue, limit_s: float = 10.0) -> list[Result]:
    """What reaches the viewer's queue up to and including ``closed``."""
    got: list[Result] = []
    try:
        async with asyncio.timeout(limit_s):
            while not got or not isinstance(got[-1], Closed):
                got.append(await viewer.queue.get())
    except TimeoutError:
        raise AssertionError(f"no closed within {limit_s:g} s; got seqs "
                             f"{[m.seq for m in got]}") from None
    return got


def queued(viewer: ViewerQueue) -> list[int]:
    """The seqs waiting in the viewer's queue now, taken out."""
    seqs = []
    while not viewer.queue.empty():
        seqs.append(viewer.queue.get_nowait().seq)
    return seqs


async def blocked_readers(r: aioredis.Redis) -> int:
    """Connections blocked in XREAD on the server now."""
    return sum(1 for c in await r.client_list() if c["cmd"] == "xread" and "b" in c["flags"])


async def no_reader(r: aioredis.Redis) -> bool:
    return await blocked_readers(r) == 0


@pytest.fixture
async def r(module_redis: RedisServer) -> AsyncIterator[aioredis.Redis]:
    async with module_redis.aclient() as client:
        await client.flushall()
        yield client


async def test_a_viewer_attached_before_results_are_written_gets_every_later_one_in_order(
        module_redis: RedisServer, r: aioredis.Redis) -> None:
    s = await Session(r).create()
    await s.write("final", "final")  # history: a viewer reads that itself (XRANGE)
    async with hubs_on(module_redis) as hubs:
        viewer = ViewerQueue(64, partials=True)
        async with hubs.attach(s.sid, viewer):
            later = await s.write("partial", "final", "partial", "final")
            later += await s.write(*["final"] * 10)
            later += await s.write("closed")
            got = await received(viewer)
    assert [m.seq for m in got] == later == list(range(3, 18))
    assert [m.TYPE for m in got[:4]] == ["partial", "final", "partial", "final"]
    assert all(m.session_id == s.sid for m in got)


async def test_two_viewers_of_a_session_share_one_hub_that_goes_with_the_last(
        module_redis: RedisServer, r: aioredis.Redis) -> None:
    s = await Session(r).create()
    async with hubs_on(module_redis) as hubs:
        first, second = ViewerQueue(64, partials=True), ViewerQueue(64, partials=True)
        async with contextlib.AsyncExitStack() as both:
            await both.enter_async_context(hubs.attach(s.sid, first))
            await both.enter_async_context(hubs.attach(s.sid, second))
            assert len(hubs) == 1 and hubs.viewer_count() == 2
            await until("the hub blocked in its read", lambda: blocked_readers(r))
            # between two blocking reads the hub's connection is briefly not blocked: sample
            seen = set()
            for _ in range(10):
                seen.add(await blocked_readers(r))
                await asyncio.sleep(0.03)
            assert max(seen) == 1, f"one reader for both viewers (blocked readers: {seen})"
            await s.write("final", "final")
            await until("both viewers got both finals",
                        lambda: first.queue.qsize() == second.queue.qsize() == 2)
            assert queued(first) == queued(second) == [1, 2]
            async with hubs.attach(s.sid, ViewerQueue(64, partials=True)):
                assert len(hubs) == 1 and hubs.viewer_count() == 3
        # both left: the hub and its read are gone
        assert len(hubs) == 0 and hubs.viewer_count() == 0
        await until("no reader blocked on the session",
                    lambda: no_reader(r))

        # a viewer that comes later starts a new hub, after what is stored by then
        third = ViewerQueue(64, partials=True)
        async with hubs.attach(s.sid, third):
            assert len(hubs) == 1
            await s.write("final", "closed")
            assert [m.seq for m in await received(third)] == [3, 4]
    assert len(hubs) == 0


async def test_a_viewer_whose_queue_is_full_fails_too_slow_and_the_other_keeps_receiving(
        module_redis: RedisServer, r: aioredis.Redis) -> None:
    s = await Session(r).create()
    async with hubs_on(module_redis, viewer_queue=64) as hubs:
        stalled, reading = ViewerQueue(4, partials=True), ViewerQueue(64, partials=True)
        async with hubs.attach(s.sid, stalled), hubs.attach(s.sid, reading):
            written = await s.write(*["final"] * 40, "closed")
            got = await received(reading)
            assert stalled.failed.done()
            failure = stalled.failed.result()
    assert [m.seq for m in got] == written, "the reading viewer got every result"
    assert isinstance(failure, TooSlow) and failure.code == "too_slow"
    assert "fell more than 4 results behind" in str(failure)
    assert queued(stalled) == [1, 2, 3, 4], "nothing is offered to a failed viewer"


async def test_partials_reach_only_the_viewers_that_want_them(
        module_redis: RedisServer, r: aioredis.Redis) -> None:
    s = await Session(r).create()
    async with hubs_on(module_redis) as hubs:
        finals_only, everything = ViewerQueue(64, partials=False), ViewerQueue(64, partials=True)
        async with hubs.attach(s.sid, finals_only), hubs.attach(s.sid, everything):
            await s.write("partial", "partial", "final", "partial", "final", "closed")
            without, with_partials = await received(finals_only), await received(everything)
    assert [(m.TYPE, m.seq) for m in without] == [("final", 3), ("final", 5), ("closed", 6)]
    assert [m.seq for m in with_partials] == [1, 2, 3, 4, 5, 6]


async def test_closed_ends_the_hub_and_its_viewers(
        module_redis: RedisServer, r: aioredis.Redis) -> None:
    s = await Session(r).create()
    async with hubs_on(module_redis) as hubs:
        viewers = [ViewerQueue(64, partials=True) for _ in range(3)]
        async with contextlib.AsyncExitStack() as all_three:
            for v in viewers:
                await all_three.enter_async_context(hubs.attach(s.sid, v))
            await s.write("final", "closed")
            for v in viewers:
                assert [m.TYPE for m in await received(v)] == ["final", "closed"]
            # the hub stopped at closed and let its viewers go, while they are still open
            await until("the hub gone", lambda: len(hubs) == 0)
            assert hubs.viewer_count() == 0
            await until("no reader blocked on the session",
                        lambda: no_reader(r))
            await s.write("final")  # nothing reads after closed
            assert all(v.queue.empty() and not v.failed.done() for v in viewers)
    assert len(hubs) == 0


async def test_a_hub_waits_out_a_redis_restart_and_loses_or_repeats_no_result(
        durable_redis: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="common.streams")
    async with durable_redis.aclient() as r, hubs_on(durable_redis) as hubs:
        s = await Session(r).create()
        viewer = ViewerQueue(64, partials=True)
        async with hubs.attach(s.sid, viewer):
            await s.write("final", "partial", "final")
            await until("the first results", lambda: viewer.queue.qsize() == 3)
            # stored (fsync) but perhaps not yet read when Redis goes away
            await s.write("partial", "final")
            durable_redis.stop()
            await until("the hub's read failing",
                        lambda: f"session {s.sid}: hub: read failed" in caplog.text)
            durable_redis.start()  # same port, same data
            await r.connection_pool.disconnect()  # the test's own client: connect again
            await s.write("final", "partial", "closed")
            got = await received(viewer, limit_s=20)
    assert [m.seq for m in got] == list(range(1, 9))


async def test_a_session_whose_record_expired_ends_its_viewers_with_session_not_found(
        module_redis: RedisServer, r: aioredis.Redis) -> None:
    s = await Session(r).create()
    async with hubs_on(module_redis) as hubs:
        viewers = [ViewerQueue(64, partials=True) for _ in range(2)]
        async with hubs.attach(s.sid, viewers[0]), hubs.attach(s.sid, viewers[1]):
            await s.write("final")
            await r.pexpire(keys.meta(s.sid), 50)  # its retention ran out
            # the hub looks every EXISTS_EVERY empty reads
            failures = await asyncio.wait_for(
                asyncio.gather(*(v.failed for v in viewers)), EXISTS_EVERY * BLOCK_MS / 1000 * 5)
            assert len(hubs) == 0
    assert all(isinstance(f, SessionNotFound) and f.code == "session_not_found"
               for f in failures)
    assert [queued(v) for v in viewers] == [[1], [1]]
