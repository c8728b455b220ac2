"""The work queues (``stt:sessions``, group ``transcribers``): their one owner.

There is one queue per model name (``keys.work_queue``: the default model's is
``stt:sessions``, another's ``stt:sessions:<name>``); a worker reads only the queue of the
model it serves, so a session is only ever taken by a worker serving the model it asked
for. A session to transcribe is one entry, added when the session is created
(``common.sessions.create_session``, through ``enqueue``). The entry pending with a
consumer is that worker's lease on it. A worker claims new entries (XREADGROUP), takes
over expired ones (XPENDING IDLE + XCLAIM), renews its own (XCLAIM, idle 0), and
acknowledges and deletes an entry when its session ends (``finish``) or queues it again
for another worker (``hand_back``): ``WorkQueue``. Gateways and replays read how many
sessions wait (``queue_backlog``, ``queue_wait``) and where each waits
(``QueuePositions``). Which epoch owns a session's writes is fenced separately
(``transcriber/commit.py``).

Every command here raises ``REDIS_DOWN`` on an outage; how to wait is the caller's
(``common/backoff.py``).
"""

from __future__ import annotations

import asyncio
import logging
import time

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from common import keys
from common.metrics import WorkerMetrics

log = logging.getLogger(__name__)

#: How long one reading of the queue serves every waiting session's position.
POSITIONS_TTL_S = 1.0
#: Most waiting entries counted one by one where the group's lag is unknown.
WAIT_COUNT_MAX = 10000


async def enqueue(redis: aioredis.Redis, sid: str, model: str) -> bytes:
    """Queue ``sid`` for the workers that serve ``model``; the entry id."""
    return bytes(await redis.xadd(keys.work_queue(model), {"sid": sid}))


async def _group(redis: aioredis.Redis, stream: str) -> dict[str, object] | None:
    """The workers' group on ``stream`` (XINFO GROUPS), None before a worker created it."""
    for g in await redis.xinfo_groups(stream):
        name = g["name"].decode() if isinstance(g["name"], bytes) else g["name"]
        if name == keys.GROUP:
            return dict(g)
    return None


async def queue_backlog(redis: aioredis.Redis, model: str = keys.DEFAULT_MODEL) -> int:
    """Sessions on ``model``'s work queue that no transcriber has taken yet."""
    stream = keys.work_queue(model)
    try:
        group = await _group(redis, stream)
    except ResponseError:  # no queue yet
        return 0
    if group is not None:
        lag = group.get("lag")
        return int(lag) if lag is not None else 0  # type: ignore[call-overload]
    return int(await redis.xlen(stream))  # no worker has created the group yet


async def _last_delivered(redis: aioredis.Redis, stream: str) -> str | None:
    """The group's last-delivered id ("0-0" before a worker created the group); None when
    the queue does not exist."""
    try:
        group = await _group(redis, stream)
    except ResponseError:  # no queue yet
        return None
    if group is None:
        return "0-0"
    ld = group["last-delivered-id"]
    return ld.decode() if isinstance(ld, bytes) else str(ld)


async def waiting_entries(redis: aioredis.Redis, count: int,
                          model: str = keys.DEFAULT_MODEL) -> list[tuple[bytes, str]]:
    """The first ``count`` (entry id, session id) on ``model``'s work queue that no
    transcriber has taken yet (after the group's last-delivered id)."""
    stream = keys.work_queue(model)
    last = await _last_delivered(redis, stream)
    if last is None:
        return []
    entries = await redis.xrange(stream, min=f"({last}", count=count)
    return [(entry_id, fields.get(b"sid", b"").decode()) for entry_id, fields in entries]


async def queue_wait(redis: aioredis.Redis, model: str, now_ms: int) -> tuple[int, float]:
    """(sessions waiting, seconds the oldest of them has waited) on ``model``'s queue;
    ``now_ms``: Redis time (entry ids carry the Redis clock). A session handed back waits
    from its hand-back."""
    stream = keys.work_queue(model)
    try:
        group = await _group(redis, stream)
    except ResponseError:  # no queue yet
        return 0, 0.0
    last = "0-0"
    lag: object = None
    if group is None:
        lag = await redis.xlen(stream)
    else:
        ld = group["last-delivered-id"]
        last = ld.decode() if isinstance(ld, bytes) else str(ld)
        lag = group.get("lag")
    first = await redis.xrange(stream, min=f"({last}", count=1)
    if not first:
        return 0, 0.0
    if lag is None:  # Redis could not tell (deleted entries after the last delivered)
        lag = len(await redis.xrange(stream, min=f"({last}", count=WAIT_COUNT_MAX))
    entry_ms = int(first[0][0].split(b"-")[0])
    return int(lag), max(0.0, (now_ms - entry_ms) / 1000.0)  # type: ignore[call-overload]


class QueuePositions:
    """Each session no transcriber has taken yet: its 1-based position in the queue.

    Read at most once per ``POSITIONS_TTL_S`` for all of a gateway's waiting sessions: each
    reading its own copy every second cost O(waiting²) (half of the gateway's CPU with 200
    sessions queued, measured with py-spy)."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self.redis = redis
        self._positions: dict[str, dict[str, int]] = {}  # by model's queue
        self._at: dict[str, float] = {}
        self._lock = asyncio.Lock()

    async def get(self, model: str = keys.DEFAULT_MODEL) -> dict[str, int]:
        """Positions in ``model``'s queue."""
        stream = keys.work_queue(model)
        async with self._lock:
            if time.monotonic() - self._at.get(stream, -POSITIONS_TTL_S) >= POSITIONS_TTL_S:
                waiting = await waiting_entries(self.redis, 10000, model)
                self._positions[stream] = {sid: i + 1 for i, (_id, sid) in enumerate(waiting)}
                self._at[stream] = time.monotonic()
        return self._positions[stream]


class WorkQueue:
    """The queue commands of one consumer (worker), on the queue of the model it serves."""

    def __init__(self, redis: aioredis.Redis, blocking: aioredis.Redis, consumer: str,
                 lease_ms: int, takeover_scan: int, block_ms: int,
                 metrics: WorkerMetrics, model: str = keys.DEFAULT_MODEL) -> None:
        """``blocking``: a client for XREADGROUP BLOCK ``block_ms``; ``model``: the name of
        the model this worker serves (its queue: ``keys.work_queue``)."""
        self.model = model
        self.stream = keys.work_queue(model)
        self.redis = redis
        self.blocking = blocking
        self.consumer = consumer
        self.lease_ms = lease_ms
        self.takeover_scan = takeover_scan
        self.block_ms = block_ms
        self.metrics = metrics

    async def ensure_group(self) -> None:
        try:
            await self.redis.xgroup_create(self.stream, keys.GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def next_entry(self, ours: set[bytes]) -> tuple[bytes, str] | None:
        """(entry id, session id): one whose lease expired (its owner died) first, else a new
        one (waiting up to ``block_ms``); ``ours``: entries this worker holds."""
        taken = await self._expired_entry(ours)
        if taken is not None:
            return taken
        resp = await self.blocking.xreadgroup(
            keys.GROUP, self.consumer, {self.stream: ">"}, count=1, block=self.block_ms)
        for _stream, entries in resp or ():
            for entry_id, fields in entries:
                return entry_id, fields[b"sid"].decode()
        return None

    async def _expired_entry(self, ours: set[bytes]) -> tuple[bytes, str] | None:
        """Claim one work entry whose lease expired (its owner died or stalled).

        XPENDING with IDLE examines the whole pending list on the server, so an expired
        entry is found however many live sessions come before it (XAUTOCLAIM from 0-0 with
        COUNT 1 looked at the same ten oldest, live entries on every call); one call a tick
        returns at most ``takeover_scan`` of them. XCLAIM re-checks the idle time, so two
        workers cannot both claim one entry.
        """
        lease_ms = self.lease_ms
        pending = await self.redis.xpending_range(
            self.stream, keys.GROUP, min="-", max="+", count=self.takeover_scan,
            idle=lease_ms)
        self.metrics.oldest_expired_lease.set(max(
            (max(0, p["time_since_delivered"] - lease_ms) / 1000.0 for p in pending),
            default=0.0))
        for p in pending:
            entry_id = p["message_id"]
            if entry_id in ours:  # our own renewal is late; it is still ours
                continue
            claimed = await self.redis.xclaim(self.stream, keys.GROUP, self.consumer,
                                              min_idle_time=lease_ms, message_ids=[entry_id])
            for claimed_id, fields in claimed:
                if not fields:  # deleted meanwhile: nothing to run
                    await self.finish(claimed_id)
                    continue
                sid = fields[b"sid"].decode()
                log.info("session %s: taking over after lease expiry (%.1f s idle)", sid,
                         p["time_since_delivered"] / 1000.0)
                self.metrics.takeovers.inc()
                return claimed_id, sid
        return None

    async def renew(self, entry_ids: list[bytes]) -> None:
        """Re-claim our own entries, so their idle time stays under the lease."""
        if entry_ids:
            await self.redis.xclaim(self.stream, keys.GROUP, self.consumer,
                                    min_idle_time=0, message_ids=entry_ids, justid=True)

    async def finish(self, entry_id: bytes) -> None:
        """The entry's session ended (or the entry is a duplicate): acknowledge, delete."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.xack(self.stream, keys.GROUP, entry_id)
        pipe.xdel(self.stream, entry_id)
        await pipe.execute()

    async def hand_back(self, entry_id: bytes, sid: str) -> None:
        """Queue the session again in place of ``entry_id``, in one transaction.

        A retried hand-back may queue a second entry: the first worker to take one holds
        the lease, and the other entry is dropped as a duplicate."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.xack(self.stream, keys.GROUP, entry_id)
        pipe.xdel(self.stream, entry_id)
        pipe.xadd(self.stream, {"sid": sid})
        await pipe.execute()

    async def waiting(self) -> list[tuple[bytes, str]]:
        """The first ``takeover_scan`` entries no worker has taken yet."""
        return await waiting_entries(self.redis, self.takeover_scan, self.model)

    async def reroute(self, entry_id: bytes, sid: str, model: str) -> None:
        """Move a session that asked for another ``model`` to that model's queue (an entry
        queued here before queues were per model): queued there first, then dropped here, so
        a failure in between leaves a duplicate (dropped by LEASE_ACQUIRE), never nothing.
        Two commands on two keys: each queue may live on its own cluster slot."""
        await enqueue(self.redis, sid, model)
        await self.finish(entry_id)
