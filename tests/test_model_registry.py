"""Model identity against a real redis-server: a session queues on its model's work queue
and only a worker serving that model takes it (common/work_queue.py, the LEASE_ACQUIRE
model check); workers announce what they serve in the registry and gateways read it
(common/models.py): live, expired, forgotten after the grace, a model nobody serves refused
or warned about, and the autoscaling gauges per model (ingest/monitor.py). A worker serves
one model under one name and never loads another (transcriber/inference.py)."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis.asyncio as aioredis
from prometheus_client import generate_latest

from common import keys
from common.errors import BadRequest, ModelUnavailable
from common.messages import Warning, unpack_result
from common.metrics import gateway_metrics, worker_metrics
from common.models import ServedModels, WorkerInfo, announce, read_registry, withdraw
from common.session_meta import SessionMeta
from common.sessions import Sessions, create_session
from common.settings import TranscriberSettings
from common.work_queue import WorkQueue, queue_wait
from ingest.monitor import SessionMonitor
from tests.procs import RedisServer
from transcriber.commit import OTHER_MODEL, SessionWriter
from transcriber.config import WorkerConfig
from transcriber.inference import Inference
from transcriber.model import served_name

pytestmark = pytest.mark.integration


@pytest.fixture
async def r(module_redis: RedisServer) -> AsyncIterator[aioredis.Redis]:
    async with module_redis.aclient() as client:
        await client.flushall()
        yield client


def worker(name: str, model: str, free: int = 2) -> WorkerInfo:
    return WorkerInfo(name, model, "cpu", 0, 4, free, "host", 9100)


def test_the_default_model_keeps_the_old_queue_and_others_get_their_own() -> None:
    assert keys.work_queue("tiny.en") == keys.work_queue("") == "stt:sessions"
    assert keys.work_queue("tiny-copy") == "stt:sessions:tiny-copy"


@pytest.mark.parametrize(("path", "name", "served"), [
    ("", "", "tiny.en"),  # the bundled model
    ("tiny.en", "", "tiny.en"),
    ("/models/whisper-small-ct2/", "", "whisper-small-ct2"),  # a directory: its last part
    ("base.en", "", "base.en"),  # a faster-whisper name
    ("/models/x", "small", "small"),  # STT_MODEL names it
])
def test_a_worker_serves_its_model_under_one_name(path: str, name: str, served: str) -> None:
    assert served_name(path, name) == served


def test_a_worker_loads_its_one_model_once_whatever_sessions_ask() -> None:
    """No model cache any more: the worker's model is the only one it can ever load."""
    loads: list[str] = []

    class Counting(Inference):
        def _load_whisper(self, name: str, tail_frames: int) -> Any:
            loads.append(name)
            return object()

    s = dataclasses.replace(TranscriberSettings(), model="/models/copy", served_model="")
    inference = Counting(s, WorkerConfig.from_settings(s), worker_metrics(), vad=object())  # type: ignore[arg-type]
    try:
        inference.load()
        inference.load()
        assert loads == ["/models/copy"] and inference.model_name == "copy"
    finally:
        inference.executor.shutdown()


def test_device_index_reaches_ctranslate2() -> None:
    """DEVICE_INDEX is faster-whisper's device_index: CTranslate2 itself refuses a CPU
    device that does not exist (on a GPU machine it picks the GPU)."""
    s = dataclasses.replace(TranscriberSettings(), device="cpu", device_index=1)
    inference = Inference(s, WorkerConfig.from_settings(s), worker_metrics(), vad=object())  # type: ignore[arg-type]
    try:
        with pytest.raises(ValueError, match="Invalid CPU device index: 1"):
            inference.load()
    finally:
        inference.executor.shutdown()


async def test_a_session_is_taken_only_by_a_worker_of_its_model(r: aioredis.Redis) -> None:
    def queue(consumer: str, model: str) -> WorkQueue:
        return WorkQueue(r, r, consumer, 5000, takeover_scan=10, block_ms=10,
                         metrics=worker_metrics(), model=model)

    tiny, copy = queue("w-tiny", "tiny.en"), queue("w-copy", "tiny-copy")
    for q in (tiny, copy):
        await q.ensure_group()
    await create_session(r, "a" * 32, {"model": "tiny-copy"})
    await create_session(r, "b" * 32, {"model": "tiny.en"})
    assert (await tiny.next_entry(set()))[1] == "b" * 32  # type: ignore[index]
    assert await tiny.next_entry(set()) is None
    assert (await copy.next_entry(set()))[1] == "a" * 32  # type: ignore[index]


async def test_a_session_of_another_model_on_the_old_queue_is_moved_not_taken(
        r: aioredis.Redis) -> None:
    """An entry queued on ``stt:sessions`` before queues were per model: the worker of the
    default model does not run it (no epoch, no owner) and moves it to its model's queue."""
    sid = "c" * 32
    await create_session(r, sid, {"model": "tiny-copy"})
    await r.xadd(keys.SESSIONS, {"sid": sid})  # as an older gateway queued it
    q = WorkQueue(r, r, "w-tiny", 5000, 10, 10, worker_metrics(), "tiny.en")
    await q.ensure_group()
    entry, got = await q.next_entry(set())  # type: ignore[misc]
    assert got == sid
    assert await SessionWriter.acquire(r, sid, "w-tiny", entry, 5000, "tiny.en") == OTHER_MODEL
    meta = SessionMeta.decode(await r.hgetall(keys.meta(sid)))
    assert meta.epoch == 0 and meta.owner == "" and meta.model == "tiny-copy"
    await q.reroute(entry, sid, meta.model)
    assert await r.xlen(keys.SESSIONS) == 0
    assert [f[b"sid"].decode() for _, f in await r.xrange(keys.work_queue("tiny-copy"))] == [
        sid, sid]  # its own entry and the moved one: the second is dropped as a duplicate


async def test_the_worker_writes_the_model_it_serves_into_the_record(
        r: aioredis.Redis) -> None:
    sid = "d" * 32
    await create_session(r, sid, {"model": ""})  # named none: the default queue's
    assert await SessionWriter.acquire(r, sid, "w", b"1-0", 5000, "tiny.en") == 1
    assert SessionMeta.decode(await r.hgetall(keys.meta(sid))).model == "tiny.en"


async def test_the_registry_keeps_live_workers_and_forgets_dead_ones_after_the_grace(
        r: aioredis.Redis) -> None:
    await announce(r, worker("w1", "tiny.en", free=3), ttl_ms=60000)
    await announce(r, worker("w2", "tiny.en", free=1), ttl_ms=60000)
    await announce(r, worker("w3", "tiny-copy"), ttl_ms=1)  # a worker that stopped beating
    await r.hset(keys.WORKERS, "junk", "not json")
    await asyncio.sleep(0.01)
    reg = await read_registry(r, grace_s=60.0)
    served = reg.served()
    assert list(served) == ["tiny.en"]
    assert served["tiny.en"].to_dict() == {"name": "tiny.en", "workers": 2, "capacity": 8,
                                           "free_slots": 4, "devices": ["cpu"]}
    assert reg.seen() == {"tiny.en", "tiny-copy"}  # tiny-copy: within the grace
    assert not await r.hexists(keys.WORKERS, "junk")
    assert (await read_registry(r, grace_s=0.0)).seen() == {"tiny.en"}  # grace over
    assert not await r.hexists(keys.WORKERS, "w3")
    await withdraw(r, "w1")
    assert [w.name for w in (await read_registry(r, 60.0)).live] == ["w2"]


async def test_a_model_nobody_knows_is_refused_and_a_configured_one_accepted(
        r: aioredis.Redis) -> None:
    await announce(r, worker("w1", "tiny-copy"), ttl_ms=60000)
    models = ServedModels(r, default="tiny.en", accepted="ghost, ../bad", grace_s=60.0)
    for name in ("tiny.en", "tiny-copy", "ghost"):  # default, served, MODELS
        await models.check(name)
    with pytest.raises(ModelUnavailable) as refused:
        await models.check("no-such-model")
    assert refused.value.code == "model_unavailable" and refused.value.http_status == 503
    with pytest.raises(BadRequest):
        await models.check("../bad")
    assert await models.listing() == {"default": "tiny.en", "models": [
        {"name": "tiny-copy", "workers": 1, "capacity": 4, "free_slots": 2,
         "devices": ["cpu"]}]}


@dataclass(eq=False)
class Waiting:
    sid: str
    model: str
    samples_sent: int = 0


async def test_the_monitor_warns_a_session_whose_model_nobody_serves_and_sets_the_gauges(
        r: aioredis.Redis) -> None:
    store = Sessions(r)
    served = Waiting("e" * 32, "tiny-copy")
    unserved = Waiting("f" * 32, "ghost")
    for s in (served, unserved):
        await store.create(s.sid, {"model": s.model})
    await announce(r, worker("w1", "tiny-copy", free=0), ttl_ms=60000)
    metrics = gateway_metrics()
    monitor = SessionMonitor(store, 5.0, 3.0, models=ServedModels(r, "tiny.en", "ghost"),
                             metrics=metrics)
    for s in (served, unserved):
        monitor.watch(s)
    await asyncio.sleep(0.05)  # the oldest entry has waited a little (Redis time)
    await monitor.tick()
    await monitor.tick()  # told once

    async def codes(sid: str) -> list[str]:
        out = []
        for _id, fields in await r.xrange(keys.results(sid)):
            result = unpack_result(fields)
            assert isinstance(result, Warning)
            out.append(result.code)
        return out

    assert await codes(unserved.sid) == ["queued", "model_unavailable"]
    assert await codes(served.sid) == ["queued"]
    text = generate_latest(metrics.registry).decode()
    assert 'stt_sessions_waiting{model="ghost"} 1.0' in text
    assert 'stt_sessions_waiting{model="tiny.en"} 0.0' in text
    assert 'stt_worker_free_slots{model="tiny-copy"} 0.0' in text
    assert 'stt_worker_capacity{model="tiny-copy"} 4.0' in text
    assert 'stt_workers{model="ghost"} 0.0' in text
    assert "stt_sessions_queued 2.0" in text
    waiting, oldest = await queue_wait(r, "ghost", (await read_registry(r, 60.0)).now_ms)
    assert waiting == 1 and 0.04 <= oldest < 5.0
    await monitor.close()
