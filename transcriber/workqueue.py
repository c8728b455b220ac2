"""The work queue (``stt:sessions``, group ``transcribers``) and the leases a worker holds.

A session to transcribe is one entry; the entry pending with a consumer is that worker's
lease on it. A worker claims new entries (XREADGROUP), takes over expired ones (XPENDING
IDLE + XCLAIM), renews its own (XCLAIM, idle 0), and acknowledges and deletes an entry
when its session ends (``finish``) or queues it again for another worker (``hand_back``).
Which epoch owns the session's writes is fenced separately (``commit.py``).

Every command here raises ``REDIS_DOWN`` on an outage; how to wait is the caller's
(see ``Worker``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Iterator

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from common import keys
from common.metrics import WorkerMetrics
from common.streams import waiting_entries
from transcriber.commit import SessionWriter

log = logging.getLogger(__name__)


@dataclasses.dataclass(eq=False)
class Lease:
    """One session this worker runs: everything the worker keeps about it.

    Compared by identity: a finished task clears only its own record, never a newer one's.
    """

    sid: str
    entry_id: bytes  # the work-queue entry that holds the lease
    task: asyncio.Task[None] | None = None
    writer: SessionWriter | None = None  # fenced by the epoch acquired; None until then
    share: str = ""  # whose session (API key or principal) for the fair share of slots
    parked: bool = False  # gave its capacity slot back while its client is silent
    preempted: bool = False  # stopped to free a slot for another share: hand it back
    handover: bool = False  # stopped by the shutdown: hand it back


class Leases:
    """The sessions this worker runs, by session id: the one table of them."""

    def __init__(self) -> None:
        self._by_sid: dict[str, Lease] = {}

    def __iter__(self) -> Iterator[Lease]:
        return iter(list(self._by_sid.values()))

    def __len__(self) -> int:
        return len(self._by_sid)

    def get(self, sid: str) -> Lease | None:
        return self._by_sid.get(sid)

    def add(self, lease: Lease) -> None:
        self._by_sid[lease.sid] = lease

    def discard(self, lease: Lease) -> None:
        """Forget ``lease`` (not a newer lease on the same session)."""
        if self._by_sid.get(lease.sid) is lease:
            del self._by_sid[lease.sid]

    def entry_ids(self) -> set[bytes]:
        return {lease.entry_id for lease in self._by_sid.values()}

    def holdings(self) -> dict[str, list[Lease]]:
        """Per share, its sessions that hold a slot here (running, not parked), oldest first."""
        out: dict[str, list[Lease]] = {}
        for lease in self._by_sid.values():
            if not lease.parked and lease.writer is not None:
                out.setdefault(lease.share, []).append(lease)
        return out

    def held(self, share: str) -> int:
        return len(self.holdings().get(share, ()))


class WorkQueue:
    """The queue commands of one consumer (worker)."""

    def __init__(self, redis: aioredis.Redis, blocking: aioredis.Redis, consumer: str,
                 lease_ms: int, takeover_scan: int, block_ms: int,
                 metrics: WorkerMetrics) -> None:
        """``blocking``: a client for XREADGROUP BLOCK ``block_ms``."""
        self.redis = redis
        self.blocking = blocking
        self.consumer = consumer
        self.lease_ms = lease_ms
        self.takeover_scan = takeover_scan
        self.block_ms = block_ms
        self.metrics = metrics

    async def ensure_group(self) -> None:
        try:
            await self.redis.xgroup_create(keys.SESSIONS, keys.GROUP, id="0", mkstream=True)
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
            keys.GROUP, self.consumer, {keys.SESSIONS: ">"}, count=1, block=self.block_ms)
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
            keys.SESSIONS, keys.GROUP, min="-", max="+", count=self.takeover_scan,
            idle=lease_ms)
        self.metrics.oldest_expired_lease.set(max(
            (max(0, p["time_since_delivered"] - lease_ms) / 1000.0 for p in pending),
            default=0.0))
        for p in pending:
            entry_id = p["message_id"]
            if entry_id in ours:  # our own renewal is late; it is still ours
                continue
            claimed = await self.redis.xclaim(keys.SESSIONS, keys.GROUP, self.consumer,
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
            await self.redis.xclaim(keys.SESSIONS, keys.GROUP, self.consumer,
                                    min_idle_time=0, message_ids=entry_ids, justid=True)

    async def finish(self, entry_id: bytes) -> None:
        """The entry's session ended (or the entry is a duplicate): acknowledge, delete."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.xack(keys.SESSIONS, keys.GROUP, entry_id)
        pipe.xdel(keys.SESSIONS, entry_id)
        await pipe.execute()

    async def hand_back(self, entry_id: bytes, sid: str) -> None:
        """Queue the session again in place of ``entry_id``, in one transaction.

        A retried hand-back may queue a second entry: the first worker to take one holds
        the lease, and the other entry is dropped as a duplicate."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.xack(keys.SESSIONS, keys.GROUP, entry_id)
        pipe.xdel(keys.SESSIONS, entry_id)
        pipe.xadd(keys.SESSIONS, {"sid": sid})
        await pipe.execute()

    async def waiting(self) -> list[tuple[bytes, str]]:
        """The first ``takeover_scan`` entries no worker has taken yet."""
        return await waiting_entries(self.redis, self.takeover_scan)
