"""How full Redis is, read from ``INFO memory``, and the refusal of new sessions above a
watermark.

With ``maxmemory`` reached and the ``noeviction`` policy (docker-compose.yml's, and the
only safe one: eviction would drop unread audio), Redis refuses every write that adds data.
A session opened then could store neither its audio nor its results: it would hang. So
the gateway refuses new sessions (and resumes, and replays) *before* that, once used
memory passes ``STORAGE_HIGH_WATERMARK`` of ``maxmemory``: HTTP 503 ``storage_full`` with
``Retry-After``. A live session whose writes are refused anyway (the watermark is a
fraction, not a promise) ends with ``storage_full`` and close 1013 after
``STORAGE_FULL_GRACE_S`` (``ingest/writer.py``), and may resume when there is room.

Memory is read at most once per ``STORAGE_CHECK_S`` per process, whatever the number of
requests; on a Redis Cluster every primary is read and the fullest one counts (a session's
keys live on one slot: the node that holds it must have room, and which node a new
session lands on is not known before its id is drawn).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from common import keys
from common.backoff import REDIS_DOWN
from common.errors import SessionNotFound, StorageFull
from common.sessions import Sessions

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Memory:
    """Redis memory as ``INFO memory`` reports it (of the fullest primary on a cluster)."""

    used: int  # used_memory, bytes
    limit: int  # maxmemory, bytes; 0 = no limit

    @property
    def fraction(self) -> float:
        return self.used / self.limit if self.limit > 0 else 0.0

    @classmethod
    def from_info(cls, info: dict[str, Any]) -> Memory:
        """From one node's ``INFO memory``, or a cluster client's answer (node → info)."""
        if "used_memory" in info:
            return cls(int(info["used_memory"]), int(info.get("maxmemory", 0) or 0))
        nodes = [cls.from_info(node) for node in info.values() if isinstance(node, dict)]
        if not nodes:
            return cls(0, 0)
        return max(nodes, key=lambda m: (m.fraction, m.used))


class StorageWatch:
    """Refuses new sessions while Redis is above its memory watermark (``check``)."""

    def __init__(self, redis: Any, watermark: float, check_s: float,
                 retry_after_s: float, clock: Any = time.monotonic) -> None:
        self.redis = redis
        self.watermark = watermark
        self.check_s = check_s
        self.retry_after_s = retry_after_s
        self.clock = clock
        self.memory = Memory(0, 0)
        self._read_at = float("-inf")

    @property
    def full(self) -> bool:
        return self.watermark > 0 and self.memory.limit > 0 \
            and self.memory.fraction >= self.watermark

    async def read(self, fresh: bool = False) -> Memory:
        """Memory now, read from Redis at most once per ``check_s`` (``fresh``: now). A
        failed read keeps the last value (an unreachable Redis is refused by the request's
        own commands)."""
        now = self.clock()
        if fresh or now - self._read_at >= self.check_s:
            self._read_at = now
            try:
                self.memory = Memory.from_info(await self._info())
            except REDIS_DOWN as exc:
                log.warning("storage: INFO memory failed: %s", exc)
        return self.memory

    async def _info(self) -> dict[str, Any]:
        primaries = getattr(self.redis, "PRIMARIES", None)
        if primaries is not None:  # a cluster client: every primary
            return dict(await self.redis.info("memory", target_nodes=primaries))
        return dict(await self.redis.info("memory"))

    async def check(self) -> None:
        """StorageFull (503, ``Retry-After``) while Redis is above the watermark."""
        await self.read()
        if self.full:
            m = self.memory
            raise StorageFull(
                f"storage is full ({m.used / 2**20:.0f} of {m.limit / 2**20:.0f} MiB used); "
                "try again later", self.retry_after_s)

    def register_gauges(self, registry: CollectorRegistry) -> None:
        """``stt_redis_memory_used_bytes``, ``stt_redis_memory_max_bytes`` and
        ``stt_storage_full`` (1 while new sessions are refused), as last read."""
        Gauge("stt_redis_memory_used_bytes", "Redis used_memory (the fullest primary)",
              registry=registry).set_function(lambda: self.memory.used)
        Gauge("stt_redis_memory_max_bytes", "Redis maxmemory (0 = no limit)",
              registry=registry).set_function(lambda: self.memory.limit)
        Gauge("stt_storage_full", "1 while new sessions are refused for lack of Redis memory",
              registry=registry).set_function(lambda: float(self.full))


#: Oldest index entries looked at per round of a retention sweep.
SWEEP_PAGE = 100
#: The lock one gateway holds while it sweeps (the others skip that round).
SWEEP_LOCK = "stt:retention:lock"


class Retention:
    """Keeps Redis under ``RETENTION_MAX_BYTES``: the oldest *closed* sessions are deleted
    first (``Sessions.delete``: every key, the listing entry), never an active one, so
    Redis' own eviction never has to choose (``noeviction``) and no audio that is still to
    be transcribed is dropped. One gateway sweeps at a time (a lock key); memory is
    ``INFO memory`` (the fullest primary on a cluster), and the bytes a deletion frees are
    estimated with ``MEMORY USAGE`` of the session's keys, since ``UNLINK`` frees them in
    the background."""

    def __init__(self, store: Sessions, watch: StorageWatch, max_bytes: int,
                 registry: CollectorRegistry | None = None) -> None:
        self.store = store
        self.watch = watch
        self.max_bytes = max_bytes
        self.deleted = Counter("stt_retention_deleted", "closed sessions deleted to stay "
                               "under RETENTION_MAX_BYTES (oldest first)",
                               registry=registry)

    async def sweep(self) -> int:
        """One pass: delete the oldest closed sessions while Redis uses more than the budget.
        Returns the number deleted."""
        if self.max_bytes <= 0:
            return 0
        redis = self.store.redis
        used = (await self.watch.read(fresh=True)).used
        if used <= self.max_bytes:
            return 0
        if not await redis.set(SWEEP_LOCK, "1", nx=True, px=60_000):
            return 0  # another gateway is sweeping
        deleted = 0
        try:
            start = 0
            while used > self.max_bytes:
                oldest = await redis.zrange(keys.INDEX, start, start + SWEEP_PAGE - 1)
                if not oldest:
                    break
                for member in oldest:
                    sid = member.decode()
                    if used <= self.max_bytes:
                        break
                    if not await self.store.closed(sid):
                        start += 1  # active (or gone: dropped from the index by a listing)
                        continue
                    freed = await self._usage(sid)
                    try:
                        await self.store.delete(sid)
                    except SessionNotFound:
                        continue
                    deleted += 1
                    self.deleted.inc()
                    used -= freed
        finally:
            await redis.unlink(SWEEP_LOCK)
        if deleted:
            log.info("retention: deleted the %d oldest closed sessions (Redis used %.0f MiB "
                     "of a %.0f MiB budget)", deleted, self.watch.memory.used / 2**20,
                     self.max_bytes / 2**20)
        return deleted

    async def _usage(self, sid: str) -> int:
        total = 0
        for key in keys.session_keys(sid):
            total += int(await self.store.redis.memory_usage(key) or 0)
        return total

    async def run(self, interval_s: float) -> None:
        """Sweep every ``interval_s`` until cancelled; Redis outages are waited out."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.sweep()
            except REDIS_DOWN as exc:
                log.warning("retention: sweep failed: %s", exc)
