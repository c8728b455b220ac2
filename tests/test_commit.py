"""The commit fencing (transcriber/commit.py) against a real redis-server: a writer whose
epoch is stale writes nothing, a commit sent again after its reply was lost stores its
final once, and seq strictly increases across owners. (Every interleaving of the lease
protocol: tests/test_lease_protocol.py.)"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from common import keys
from common.errors import StaleLease
from common.messages import Closed, Final, Partial, unpack_result
from common.redis_client import make_redis
from common.scripts import COMMIT
from common.session_meta import SessionMeta
from common.sessions import create_session
from common.settings import RedisSettings
from tests.lossy_proxy import LossyProxy
from tests.procs import RedisServer
from transcriber.commit import CLIENT_BACK, SessionWriter
from transcriber.session import with_retry

pytestmark = pytest.mark.integration

SID = "c" * 32


@pytest.fixture
async def r(module_redis: RedisServer) -> AsyncIterator[aioredis.Redis]:
    """A client of the module's redis-server, emptied, with one session created."""
    async with module_redis.aclient() as client:
        await client.flushall()
        await create_session(client, SID, {"model": ""})
        yield client


async def owner(r: aioredis.Redis, name: str, entry: bytes) -> SessionWriter:
    """A writer that took the session (lease 0 ms: any earlier lease has run out)."""
    epoch = await SessionWriter.acquire(r, SID, name, entry, 0)
    assert epoch is not None and epoch > 0
    return SessionWriter(r, SID, epoch)


def final(u: int) -> Final:
    return Final(SID, u, f"utterance {u}", float(u), u + 0.5, ())


def partial(u: int) -> Partial:
    return Partial(SID, u, "some words", "some", float(u), u + 0.5)


async def meta(r: aioredis.Redis) -> SessionMeta:
    return SessionMeta.decode(await r.hgetall(keys.meta(SID)))


async def results(r: aioredis.Redis) -> list[tuple[int, int, object]]:
    """(seq, epoch, message) of every entry in the results stream."""
    return [(int(f[b"seq"]), int(f[b"epoch"]), unpack_result(f))
            for _id, f in await r.xrange(keys.results(SID))]


async def test_a_stale_epochs_writes_are_refused_and_change_nothing(r: aioredis.Redis) -> None:
    old = await owner(r, "w1", b"1-0")
    assert await old.publish(partial(0)) > 0
    new = await owner(r, "w2", b"2-0")
    assert new.epoch == old.epoch + 1
    before, record = await results(r), await meta(r)
    with pytest.raises(StaleLease):
        await old.publish(partial(0))
    with pytest.raises(StaleLease):
        await old.commit(final(0), 16000, 1, "utterance 0", "0-0")
    with pytest.raises(StaleLease):
        await old.progress(32000)
    with pytest.raises(StaleLease):
        await old.close(Closed(SID, 1, 1.0), 60)
    assert not await old.renew()
    assert not await old.release()
    assert await results(r) == before
    assert await meta(r) == record  # no commit point, progress, state or lease moved
    assert await new.commit(final(0), 16000, 1, "utterance 0", "0-0") > 0
    assert (await meta(r)).next_utterance == 1


async def test_a_commit_sent_again_is_stored_once(r: aioredis.Redis) -> None:
    writer = await owner(r, "w1", b"1-0")
    args = (final(0), 16000, 1, "utterance 0", "1-0")
    assert await writer.commit(*args) > 0
    assert await writer.commit(*args) == 0  # already committed: nothing written
    assert await writer.commit(final(1), 32000, 2, "utterance 1", "2-0") > 0
    assert await writer.commit(*args) == 0  # an older utterance's retry, after a newer one
    finals = [m for _s, _e, m in await results(r) if isinstance(m, Final)]
    assert [f.utterance for f in finals] == [0, 1]
    record = await meta(r)
    assert (record.commit_sample, record.next_utterance, record.resume_id) == (32000, 2, "2-0")


async def test_a_commit_whose_reply_is_lost_is_retried_and_stored_once(
        module_redis: RedisServer, r: aioredis.Redis) -> None:
    """The worker's path: a client that does not retry by itself (``retries=False``) and
    ``with_retry`` around the fenced write. The commit runs, its reply is lost with the
    connection, it is sent again and answers 0 (already committed)."""
    await r.script_load(COMMIT)  # the EVALSHA is the commit itself, not a NOSCRIPT miss
    proxy = LossyProxy(module_redis.port)
    client = make_redis(RedisSettings(redis_url=proxy.url), retries=False)
    try:
        epoch = await SessionWriter.acquire(client, SID, "w1", b"1-0", 0)
        assert epoch is not None
        writer = SessionWriter(client, SID, epoch)
        sha = hashlib.sha1(COMMIT.encode()).hexdigest().encode()
        proxy.drop_reply(sha)
        seq = await with_retry(SID, "commit", lambda: writer.commit(
            final(0), 16000, 1, "utterance 0", "1-0"))
        assert proxy.dropped == [sha]
        assert seq == 0  # the answer of the second try
        finals = [m for _s, _e, m in await results(r) if isinstance(m, Final)]
        assert [f.utterance for f in finals] == [0]
        assert (await meta(r)).next_utterance == 1
    finally:
        await client.aclose()
        proxy.close()


async def test_seq_strictly_increases_across_owners(r: aioredis.Redis) -> None:
    first = await owner(r, "w1", b"1-0")
    seqs = [await first.publish(partial(0)), await first.publish(partial(0)),
            await first.commit(final(0), 16000, 1, "utterance 0", "1-0")]
    second = await owner(r, "w2", b"2-0")
    seqs += [await second.publish(partial(1)),
             await second.commit(final(1), 32000, 2, "utterance 1", "2-0"),
             await second.close(Closed(SID, 2, 2.0), 60)]
    assert seqs == sorted(set(seqs)) and seqs[0] == 1
    stored = await results(r)
    assert [seq for seq, _e, _m in stored] == seqs
    assert [epoch for _s, epoch, _m in stored] == [first.epoch] * 3 + [second.epoch] * 3
    assert (await meta(r)).seq == seqs[-1]


async def test_an_idle_close_is_refused_while_the_client_is_back_and_a_close_is_once(
        r: aioredis.Redis) -> None:
    writer = await owner(r, "w1", b"1-0")
    closed = Closed(SID, 0, 0.0)
    # creation wrote a fresh heartbeat: the client is not idle for a minute
    assert await writer.close(closed, 60, idle_ms=60_000) == CLIENT_BACK
    await r.hset(keys.meta(SID), "heartbeat", "1.000")  # its last sign of life long ago
    read = (await r.xadd(keys.audio(SID), {"m": b"x"})).decode()
    assert await writer.close(closed, 60, idle_ms=60_000, last_read="0-0") == CLIENT_BACK
    assert not (await meta(r)).closed  # audio came after the entry the worker read
    seq = await writer.close(closed, 60, idle_ms=60_000, last_read=read)
    assert (await meta(r)).closed and seq > 0
    assert await writer.close(closed, 60) == 0  # closed already: nothing written
    assert [type(m) for _s, _e, m in await results(r)] == [Closed]
    for key in (keys.audio(SID), keys.results(SID), keys.meta(SID)):
        assert 0 < await r.ttl(key) <= 60
