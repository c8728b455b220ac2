"""The work queue (common/work_queue.py) and the lease table (transcriber/leases.py)
against a real redis-server: new entries are claimed, expired leases taken over (never our
own), renewed entries kept, and an entry finished or handed back leaves exactly what it
should on the queue."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest
import redis.asyncio as aioredis

from common import keys
from common.metrics import worker_metrics
from common.work_queue import WorkQueue
from tests.procs import RedisServer
from transcriber.leases import Lease, Leases

pytestmark = pytest.mark.integration

LEASE_MS = 200


@pytest.fixture
async def r(module_redis: RedisServer) -> AsyncIterator[aioredis.Redis]:
    async with module_redis.aclient() as client:
        await client.flushall()
        yield client


@pytest.fixture
def queue(r: aioredis.Redis) -> Callable[[str], WorkQueue]:
    """``queue(consumer)``: that worker's view of the queue (waits 10 ms for new entries)."""
    def make(consumer: str) -> WorkQueue:
        return WorkQueue(r, r, consumer, LEASE_MS, takeover_scan=10, block_ms=10,
                         metrics=worker_metrics())
    return make


async def pending(r: aioredis.Redis) -> dict[bytes, str]:
    """Pending entry id → its consumer."""
    rows = await r.xpending_range(keys.SESSIONS, keys.GROUP, min="-", max="+", count=100)
    return {p["message_id"]: p["consumer"].decode() for p in rows}


async def test_a_new_entry_is_claimed_once(r: aioredis.Redis,
                                           queue: Callable[[str], WorkQueue]) -> None:
    a, b = queue("a"), queue("b")
    await a.ensure_group()
    await b.ensure_group()  # a second worker: the group exists already
    entry = await r.xadd(keys.SESSIONS, {"sid": "s1"})
    assert await a.waiting() == [(entry, "s1")]
    assert await a.next_entry(set()) == (entry, "s1")
    assert await b.next_entry(set()) is None  # a holds it, and its lease is fresh
    assert await pending(r) == {entry: "a"}
    assert await a.waiting() == []


async def test_an_expired_lease_is_taken_over_but_not_our_own_or_a_renewed_one(
        r: aioredis.Redis, queue: Callable[[str], WorkQueue]) -> None:
    a, b = queue("a"), queue("b")
    await a.ensure_group()
    first = await r.xadd(keys.SESSIONS, {"sid": "s1"})
    second = await r.xadd(keys.SESSIONS, {"sid": "s2"})
    assert await a.next_entry(set()) == (first, "s1")
    assert await a.next_entry(set()) == (second, "s2")
    await asyncio.sleep(LEASE_MS / 1000 + 0.05)
    assert await a.next_entry({first, second}) is None  # ours: a late renewal, still ours
    await a.renew([first])
    assert await b.next_entry(set()) == (second, "s2")  # a stopped renewing it
    assert b.metrics.registry.get_sample_value("stt_worker_takeovers_total") == 1
    assert await pending(r) == {first: "a", second: "b"}


async def test_a_finished_entry_is_gone_and_a_handed_back_one_is_queued_again(
        r: aioredis.Redis, queue: Callable[[str], WorkQueue]) -> None:
    a = queue("a")
    await a.ensure_group()
    first = await r.xadd(keys.SESSIONS, {"sid": "s1"})
    second = await r.xadd(keys.SESSIONS, {"sid": "s2"})
    await a.next_entry(set())
    await a.next_entry(set())
    await a.finish(first)
    await a.hand_back(second, "s2")
    assert await pending(r) == {}
    entries = await r.xrange(keys.SESSIONS)
    assert [(fields[b"sid"], entry_id > second) for entry_id, fields in entries] == \
        [(b"s2", True)]  # a new entry, after the old one, for the next worker
    assert [sid for _e, sid in await a.waiting()] == ["s2"]


async def test_an_expired_entry_deleted_meanwhile_is_acknowledged_not_run(
        r: aioredis.Redis, queue: Callable[[str], WorkQueue]) -> None:
    a, b = queue("a"), queue("b")
    await a.ensure_group()
    entry = await r.xadd(keys.SESSIONS, {"sid": "s1"})
    await a.next_entry(set())
    await r.xdel(keys.SESSIONS, entry)
    await asyncio.sleep(LEASE_MS / 1000 + 0.05)
    assert await b.next_entry(set()) is None
    assert await pending(r) == {}


def test_the_lease_table_is_one_record_per_session() -> None:
    leases = Leases()
    old = Lease("s1", b"1-0", share="app")
    leases.add(old)
    newer = Lease("s1", b"2-0", share="app")
    leases.add(newer)  # a newer lease on the session replaces the record
    leases.discard(old)  # an older task's clean-up leaves the newer one alone
    assert leases.get("s1") is newer and len(leases) == 1
    assert leases.holdings() == {}  # no writer yet: it holds no slot
    newer.writer = object()  # type: ignore[assignment]
    parked = Lease("s2", b"3-0", share="app", writer=object(), parked=True)  # type: ignore[arg-type]
    leases.add(parked)
    assert leases.holdings() == {"app": [newer]} and leases.held("app") == 1
    assert leases.entry_ids() == {b"2-0", b"3-0"}
