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

import dataclasses
import logging
import time
from typing import Any

from prometheus_client import CollectorRegistry, Gauge

from common.backoff import REDIS_DOWN
from common.errors import StorageFull

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

    async def read(self) -> Memory:
        """Memory now, read from Redis at most once per ``check_s``. A failed read keeps
        the last value (an unreachable Redis is refused by the request's own commands)."""
        now = self.clock()
        if now - self._read_at >= self.check_s:
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
