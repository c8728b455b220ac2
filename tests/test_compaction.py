"""Compaction of closed sessions' audio (``common/compaction.py``, ``Sessions.compact``)
against a real redis-server: FLAC gives the samples back identical, Opus the same length
within a small error, markers where they were; only a closed session is compacted, the
compacted form keeps the record's TTL, readers see the same audio (a read that the
compaction overtakes too), and deletion removes it."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import Iterator

import numpy as np
import pytest

from common import compaction, keys
from common.client import listen_url, stream
from common.messages import AudioFrame, AudioMarker
from common.sessions import Sessions
from tests.audio_refs import frames, load_pcm16, reference, wer
from tests.conftest import Stack
from tests.procs import RedisServer, start_gateway, start_transcriber, wait_until
from tests.test_pipeline_e2e import with_tail

pytestmark = pytest.mark.integration

SID = "c" * 32
FRAME = 160  # 10 ms: more entries than one XRANGE page


def test_flac_is_lossless_and_opus_keeps_the_length_and_the_signal() -> None:
    pcm = load_pcm16("ds_ldc93s1")
    flac = compaction.encode(pcm, "flac")
    assert np.array_equal(np.concatenate(list(compaction.decode(flac, "flac", len(pcm)))), pcm)
    opus = compaction.encode(pcm, "opus", 24000)
    back = np.concatenate(list(compaction.decode(opus, "opus", len(pcm))))
    assert len(back) == len(pcm)
    assert len(opus) < len(flac) < 2 * len(pcm)
    # lossy, but the same signal: most of its energy, in step (no shift in time)
    err = np.sum((back.astype(float) - pcm) ** 2) / np.sum(pcm.astype(float) ** 2)
    assert err < 0.3, err
    with pytest.raises(ValueError):
        compaction.Encoder("mp3")


async def record(r: object, store: Sessions, pcm: np.ndarray, closed: bool = True) -> None:
    await store.create(SID, {"model": "tiny.en"})
    entries: list[AudioFrame | AudioMarker] = []
    seq = 0
    for i, start in enumerate(range(0, len(pcm), FRAME)):
        seq += 1
        entries.append(AudioFrame(seq, start, pcm[start:start + FRAME].tobytes()))
        if i == 100:
            seq += 1
            entries.append(AudioMarker("finalize", seq, start + FRAME))
    entries.append(AudioMarker("close", seq + 1, len(pcm)))
    for start in range(0, len(entries), 64):
        assert await store.append(SID, 1, entries[start:start + 64])
    if closed:
        await store.redis.hset(keys.meta(SID), "state", "closed")
        for key in (keys.meta(SID), keys.audio(SID), keys.results(SID)):
            await store.redis.expire(key, 3600)


async def read_back(store: Sessions) -> tuple[np.ndarray, list[tuple[str, int]]]:
    pcm: list[bytes] = []
    markers: list[tuple[str, int]] = []
    at = 0
    async for entry in store.audio(SID):
        if isinstance(entry, AudioFrame):
            assert entry.offset == at, "frames are contiguous"
            pcm.append(entry.pcm)
            at += entry.samples
        else:
            markers.append((entry.kind, entry.offset))
    return np.frombuffer(b"".join(pcm), dtype="<i2"), markers


def test_a_closed_session_is_compacted_and_read_back_whole(own_redis: RedisServer) -> None:
    pcm = load_pcm16("ds_ldc93s1")

    async def run() -> None:
        async with own_redis.aclient() as r:
            store = Sessions(r)
            await record(r, store, pcm, closed=False)
            assert await store.compact(SID, "flac", 0) is None  # still active: untouched
            assert await r.exists(keys.audio(SID))
            await r.hset(keys.meta(SID), "state", "closed")
            await r.expire(keys.meta(SID), 3600)
            before, before_markers = await read_back(store)
            done = await store.compact(SID, "flac", 0)
            assert done is not None and done.samples == len(pcm)
            assert done.compact_bytes < done.raw_bytes / 2, done
            assert not await r.exists(keys.audio(SID))
            assert 3500 < await r.ttl(keys.audio_z(SID)) <= 3600
            after, markers = await read_back(store)
            assert np.array_equal(after, pcm) and np.array_equal(before, pcm)
            assert markers == before_markers == [("finalize", 101 * FRAME), ("close", len(pcm))]
            assert await store.audio_samples(SID) == len(pcm)
            assert await store.compact(SID, "flac", 0) is None  # once
            await store.delete(SID)
            assert await r.keys(f"*{SID}*") == []

    asyncio.run(run())


def test_a_read_that_the_compaction_overtakes_goes_on_from_the_compacted_form(
        own_redis: RedisServer) -> None:
    pcm = load_pcm16("ds_ldc93s1")

    async def run() -> None:
        async with own_redis.aclient() as r:
            store = Sessions(r)
            await record(r, store, pcm)
            got: list[bytes] = []
            reader = store.audio(SID)
            async for entry in reader:  # the first page, then the stream is gone
                if isinstance(entry, AudioFrame):
                    got.append(entry.pcm)
                if len(got) == 400:
                    assert await store.compact(SID, "flac", 0) is not None
                    break
            async for entry in reader:
                if isinstance(entry, AudioFrame):
                    got.append(entry.pcm)
            assert np.array_equal(np.frombuffer(b"".join(got), dtype="<i2"), pcm)

    asyncio.run(run())


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    """A gateway and a transcriber that compacts closed sessions losslessly (FLAC); the
    other tests' services keep raw streams (COMPACT_CODEC=off in tests/procs.py)."""
    server = RedisServer()
    server.start()
    worker = start_transcriber(server.url, COMPACT_CODEC="flac")
    gateway, port = start_gateway(server.url)
    yield Stack(server, gateway, worker, port)
    gateway.stop()
    worker.stop()
    server.stop()


def test_the_worker_compacts_a_closed_session_and_exports_and_replays_read_it(
        stack: Stack) -> None:
    """Through the real services: the transcriber that closed the session compacts it
    (FLAC here); the WAV export is still the streamed audio sample for sample; then the
    same session compacted with Opus (the default) is replayed through the transcribers as
    accurately as the raw audio was transcribed."""
    pcm = with_tail(load_pcm16("fw_jfk"), 1.0)
    res = asyncio.run(stream(listen_url(stack.ws_url), frames(pcm), pace=None))
    sid = res.messages[0].message["session_id"]
    r = stack.redis.client()
    wait_until("the closed session's audio compacted",
               lambda: r.exists(keys.audio_z(sid)) and not r.exists(keys.audio(sid)), 15)
    assert r.hget(keys.audio_z(sid), "codec") == b"flac"
    assert 0 < r.ttl(keys.audio_z(sid)) <= r.ttl(keys.meta(sid)) + 1
    with urllib.request.urlopen(f"{stack.http_url}/v1/sessions/{sid}/audio.wav") as resp:
        body = resp.read()
    assert np.array_equal(np.frombuffer(body[44:], dtype="<i2"), pcm)

    async def as_opus_then_replay() -> list[dict[str, object]]:
        sid2 = "d" * 32  # the same audio, recorded raw, closed, compacted with Opus
        async with stack.redis.aclient() as ar:
            store = Sessions(ar)
            await store.create(sid2, {"model": "tiny.en", "language": "en"})
            assert await store.append(sid2, 1, split(pcm))
            await ar.hset(keys.meta(sid2), mapping={"state": "closed", "duration": 12.0})
            done = await store.compact(sid2, "opus", 24000)
            assert done is not None and done.compact_bytes < done.raw_bytes / 8, done
            assert not await ar.exists(keys.audio(sid2))
        from websockets.asyncio.client import connect
        async with connect(f"{stack.ws_url}/v1/sessions/{sid2}/replay?speed=max") as ws:
            return [json.loads(m) async for m in ws]

    replayed = asyncio.run(as_opus_then_replay())
    text = " ".join(str(m["text"]) for m in replayed if m["type"] == "final")
    assert replayed[-1]["type"] == "closed", replayed[-3:]
    # one clip: two words of 22 at most (the pooled WER on 25 clips is in docs/storage.md)
    assert wer(reference("fw_jfk"), text) <= wer(reference("fw_jfk"), res.text) + 0.1, text


def split(pcm: np.ndarray) -> list[AudioFrame | AudioMarker]:
    entries: list[AudioFrame | AudioMarker] = [
        AudioFrame(1000 + i, start, pcm[start:start + 1600].tobytes())
        for i, start in enumerate(range(0, len(pcm), 1600))]
    entries.append(AudioMarker("close", 1000 + len(entries), len(pcm)))
    return entries


def test_retention_deletes_the_oldest_closed_sessions_first_and_never_an_active_one(
        own_redis: RedisServer) -> None:
    """Over RETENTION_MAX_BYTES, a sweep deletes closed sessions oldest first until the
    estimate is under the budget; an older active session is kept; under it, nothing."""
    from common.storage import Retention, StorageWatch

    pcm = np.tile(load_pcm16("ds_ldc93s1"), 8)  # ~23 s: about 1 MB of stream each

    async def run() -> None:
        async with own_redis.aclient() as r:
            store = Sessions(r)
            sids = [f"{i:032x}" for i in range(5)]
            for i, sid in enumerate(sids):
                await store.create(sid, {"model": "tiny.en"})
                await r.zadd(keys.INDEX, {sid: 1000 + i})  # creation order = index order
                assert await store.append(sid, 1, split(pcm))
                if i != 0:  # the oldest one is still active
                    await r.hset(keys.meta(sid), "state", "closed")
            watch = StorageWatch(r, 0.9, 1.0, 30.0)
            used = (await watch.read(fresh=True)).used
            one = sum([int(await r.memory_usage(k) or 0) for k in keys.session_keys(sids[1])])
            assert one > 500_000
            keeper = Retention(store, watch, used - int(1.5 * one))
            assert await keeper.sweep() == 2
            assert [await store.exists(sid) for sid in sids] == [True, False, False, True, True]
            assert await r.zscore(keys.INDEX, sids[1]) is None
            await asyncio.sleep(0.2)  # UNLINK frees in the background
            under = Retention(store, watch, (await watch.read(fresh=True)).used + 10_000)
            assert await under.sweep() == 0
            assert not await r.exists("stt:retention:lock")

    asyncio.run(run())
