"""Writes that wait for a replica (``REDIS_REPLICA_ACKS``, common/replication.py), against a
real primary and its replica (``redis-server --replicaof``), the replica paused with SIGSTOP
to hold its acknowledgement back:

* a final (COMMIT) counts as written only once the replica holds it: with the replica
  paused it fails ``NotReplicated`` after the acknowledgement timeout, is waited out like an
  outage by the worker's retry loop, and is stored exactly once however often it is sent;
* the gateway's audio appends likewise: a round trip the replica has not acknowledged fails
  (its frames stay in the gateway's buffer), and sending it again stores nothing twice;
* a primary without replicas is not held back (acknowledgements are asked of the replicas
  it has);
* without acknowledgements nothing waits for the replica (the default).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
import redis.asyncio as aioredis

from common import keys
from common.backoff import NotReplicated, until_up
from common.messages import AudioFrame, Final, unpack_result
from common.redis_client import make_redis
from common.settings import RedisSettings
from common.streams import AudioAppender
from tests.procs import RedisServer, wait_until
from transcriber.commit import SessionWriter

pytestmark = pytest.mark.integration

#: How long a write waits for a replica that is paused (it fails after this).
ACK_TIMEOUT_MS = 300
#: ... and for one that is there: a busy machine can take longer than 300 ms to answer.
PATIENT_MS = 5000


@pytest.fixture(scope="module")
def pair() -> Iterator[tuple[RedisServer, RedisServer]]:
    primary = RedisServer()
    primary.start()
    replica = RedisServer(replica_of=primary)
    replica.start()
    wait_until("the replica in sync", replica.in_sync, 15)
    yield primary, replica
    replica.stop()
    primary.stop()


@pytest.fixture
async def r(pair: tuple[RedisServer, RedisServer]) -> AsyncIterator[aioredis.Redis]:
    primary, replica = pair
    replica.resume()  # a failed test may have left it paused
    client = make_redis(RedisSettings(redis_url=primary.url), retries=False)
    yield client
    await client.aclose()


async def session(r: aioredis.Redis) -> str:
    sid = uuid.uuid4().hex
    await r.hset(keys.meta(sid), mapping={"epoch": 1, "attach": 1, "state": "active", "seq": 0,
                                          "next_utterance": 0})
    return sid


def final(sid: str, u: int) -> Final:
    return Final(sid, u, f"utterance {u}", float(u), u + 0.5)


async def on_replica(replica: RedisServer, key: str) -> list[dict[bytes, bytes]]:
    async with replica.aclient() as rep:
        return [fields for _id, fields in await rep.xrange(key)]


async def test_a_final_counts_only_once_the_replica_holds_it_and_is_stored_once(
        pair: tuple[RedisServer, RedisServer], r: aioredis.Redis) -> None:
    _primary, replica = pair
    sid = await session(r)
    writer = SessionWriter(r, sid, 1, replica_acks=1, ack_timeout_ms=PATIENT_MS)
    impatient = SessionWriter(r, sid, 1, replica_acks=1, ack_timeout_ms=ACK_TIMEOUT_MS)
    assert await writer.commit(final(sid, 0), 16000, 1, "", "0-0") == 1
    # acknowledged: the replica has it at the moment commit returns
    assert [unpack_result(f).utterance for f in await on_replica(replica, keys.results(sid))] \
        == [0]

    replica.pause()
    began = time.monotonic()
    with pytest.raises(NotReplicated, match="0 of 1 replicas"):
        await impatient.commit(final(sid, 1), 32000, 2, "", "0-0")
    assert time.monotonic() - began >= ACK_TIMEOUT_MS / 1000 * 0.9
    # sent again until acknowledged (the worker's retry loop), the replica resumed meanwhile
    retry = asyncio.create_task(until_up(
        lambda: writer.commit(final(sid, 1), 32000, 2, "", "0-0"), "commit"))
    await asyncio.sleep(1.0)
    assert not retry.done(), "a final the replica lacks is not done"
    replica.resume()
    assert await asyncio.wait_for(retry, 10) == 0  # the primary had it: not stored twice
    stored = [unpack_result(f) for f in await on_replica(replica, keys.results(sid))]
    assert [(m.utterance, m.seq) for m in stored] == [(0, 1), (1, 2)]


async def test_audio_appends_succeed_only_once_replicated_and_a_resend_adds_nothing(
        pair: tuple[RedisServer, RedisServer], r: aioredis.Redis) -> None:
    primary, replica = pair
    sid = await session(r)
    appends = make_redis(RedisSettings(redis_url=primary.url), read_timeout=False,
                         retries=False)
    try:
        appender = AudioAppender(appends, 16, timeout_s=5.0, replica_acks=1,
                                 ack_timeout_ms=PATIENT_MS)
        impatient = AudioAppender(appends, 16, timeout_s=5.0, replica_acks=1,
                                  ack_timeout_ms=ACK_TIMEOUT_MS)
        frames = [AudioFrame(i, (i - 1) * 160, b"\x01\x00" * 160) for i in range(1, 5)]
        assert await appender.append_many([(sid, 1, frames[:2])]) == [2]
        assert len(await on_replica(replica, keys.audio(sid))) == 2

        replica.pause()
        with pytest.raises(NotReplicated):
            await impatient.append_many([(sid, 1, frames)])
        replica.resume()
        # the gateway sends the round again: frames 3 and 4 are there already
        assert await appender.append_many([(sid, 1, frames)]) == [0]
        assert len(await on_replica(replica, keys.audio(sid))) == 4
    finally:
        await appends.aclose()


async def test_without_acknowledgements_nothing_waits_for_the_replica(
        pair: tuple[RedisServer, RedisServer], r: aioredis.Redis) -> None:
    _primary, replica = pair
    sid = await session(r)
    writer = SessionWriter(r, sid, 1)
    replica.pause()
    try:
        began = time.monotonic()
        assert await writer.commit(final(sid, 0), 16000, 1, "", "0-0") == 1
        assert time.monotonic() - began < ACK_TIMEOUT_MS / 1000
    finally:
        replica.resume()


async def test_a_primary_without_replicas_is_not_held_back(own_redis: RedisServer) -> None:
    """A primary with no replica connected (one just promoted, until a replica joins it) has
    none that a failover could promote without the write: acknowledgements are asked of the
    replicas it has, so its writes go on, without waiting out the acknowledgement timeout
    (``WAIT`` asks for the replicas its last ``ROLE`` showed). A replica that joins later
    is waited for again: the first write after it fails the check and is sent again."""
    r = make_redis(RedisSettings(redis_url=own_redis.url), retries=False)
    try:
        sid = await session(r)
        writer = SessionWriter(r, sid, 1, replica_acks=1, ack_timeout_ms=PATIENT_MS)
        appender = AudioAppender(r, 16, replica_acks=1, ack_timeout_ms=PATIENT_MS)
        began = time.monotonic()
        for u in range(3):
            assert await writer.commit(final(sid, u), 16000 * (u + 1), u + 1, "",
                                       "0-0") == u + 1
            assert await appender.append_many(
                [(sid, 1, [AudioFrame(u + 1, u * 160, b"\x01\x00" * 160)])]) == [1]
        assert time.monotonic() - began < PATIENT_MS / 1000 / 2  # six writes, no timeout

        replica = RedisServer(replica_of=own_redis)
        replica.start()
        try:
            wait_until("the replica in sync", replica.in_sync, 15)
            replica.pause()  # it is connected: a write now needs it, and it does not answer
            impatient = SessionWriter(r, sid, 1, replica_acks=1, ack_timeout_ms=ACK_TIMEOUT_MS)
            with pytest.raises(NotReplicated):
                await impatient.commit(final(sid, 3), 16000 * 4, 4, "", "0-0")
            with pytest.raises(NotReplicated):
                await impatient.commit(final(sid, 3), 16000 * 4, 4, "", "0-0")
            replica.resume()
            # the primary had it: not stored twice
            assert await writer.commit(final(sid, 3), 16000 * 4, 4, "", "0-0") == 0
            stored = [unpack_result(f) for f in await on_replica(replica, keys.results(sid))]
            assert [m.utterance for m in stored] == [0, 1, 2, 3]
        finally:
            replica.stop()
    finally:
        await r.aclose()
