"""The gateway's Redis operations on sessions: create, attach, append audio, detach, backlog.

Audio appends are fenced by the session's attach generation: when a client
reconnects (possibly through another gateway) the generation moves on, and a
stale connection can no longer append, so one session has one writer.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time

import redis.asyncio as aioredis

from common import keys
from common.errors import SessionNotFound
from common.messages import (
    AudioEntry,
    AudioFrame,
    AudioMarker,
    Warning,
    pack_result,
    unpack_audio_entry,
)
from common.scripts import NOTICE
from common.session_meta import SessionMeta
from common.sessions import create_session, heartbeat
from common.streams import AudioAppender, queue_backlog, waiting_entries


@dataclasses.dataclass(frozen=True)
class Attached:
    """Where a (re)attached connection continues."""

    generation: int
    samples: int  # samples already in the audio stream
    entry_seq: int  # seq of the last audio entry
    ended: bool  # the stream already has its close marker
    meta: SessionMeta


@dataclasses.dataclass(frozen=True)
class SessionAccess:
    owner: str  # "key:NAME", "token:NONCE", or "" when created without authentication
    account: str
    deadline: float | None  # unix time the session must end by
    created: float
    state: str  # "active" or "closed"


#: How long one reading of the work queue serves every waiting session's position.
POSITIONS_TTL_S = 1.0


class SessionStore:
    def __init__(self, redis: aioredis.Redis, append_batch: int = 256) -> None:
        self.redis = redis
        self.appender = AudioAppender(redis, append_batch)
        self._notice = redis.register_script(NOTICE)
        self._positions: dict[str, int] = {}
        self._positions_at = -POSITIONS_TTL_S
        self._positions_lock = asyncio.Lock()

    async def create(self, sid: str, fields: dict[str, str | int]) -> int:
        """Write the session's metadata and announce it on the work queue (idempotent)."""
        await create_session(self.redis, sid, dict(fields))
        return 1

    async def access(self, sid: str) -> SessionAccess:
        """Who created the session and until when it may run, read before a resume."""
        names = ["state", "principal", "account", "deadline", "created"]
        values = await self.redis.hmget(keys.meta(sid), names)
        if values[0] is None:
            raise SessionNotFound()
        meta = SessionMeta.decode(dict(zip(names, values, strict=True)))
        return SessionAccess(meta.principal, meta.account, meta.deadline or None,
                             meta.created or time.time(), meta.state)

    async def attach(self, sid: str) -> Attached:
        """Take over the writing side of an existing session after a reconnect."""
        raw = await self.redis.hgetall(keys.meta(sid))
        if not raw:
            raise SessionNotFound()
        meta = SessionMeta.decode(raw)
        generation = int(await self.redis.hincrby(keys.meta(sid), "attach", 1))
        last = await self.redis.xrevrange(keys.audio(sid), count=1)
        samples, entry_seq, ended = 0, 0, meta.closed
        if last:
            entry = unpack_audio_entry(last[0][1])
            entry_seq = entry.seq
            if isinstance(entry, AudioFrame):
                samples = entry.offset + entry.samples
            else:
                samples = entry.offset
                ended = ended or entry.kind == "close"
        await self.heartbeat(sid)
        return Attached(generation, samples, entry_seq, ended, meta)

    async def append(self, sid: str, generation: int, entries: list[AudioEntry]) -> bool:
        """Append entries in order; False when another connection has taken the session."""
        return await self.appender.append(sid, generation, entries)

    async def heartbeat(self, sid: str) -> None:
        await heartbeat(self.redis, sid)

    async def notice(self, sid: str, warning: Warning) -> None:
        await self._notice(keys=[keys.meta(sid), keys.results(sid)], args=[pack_result(warning)])

    async def progress(self, sid: str) -> tuple[int, int]:
        """(owner epoch, samples the transcriber has processed)."""
        epoch, processed = await self.redis.hmget(keys.meta(sid), "epoch", "processed_sample")
        return int(epoch or 0), int(processed or 0)

    async def backlog(self) -> int:
        """Sessions queued that no transcriber has taken yet."""
        return await queue_backlog(self.redis)

    async def waiting_positions(self) -> dict[str, int]:
        """Each session no transcriber has taken yet: its 1-based position in the queue.

        Read at most once per ``POSITIONS_TTL_S`` for all of this gateway's waiting
        sessions: each reading its own copy every second cost O(waiting²) (half of the
        gateway's CPU with 200 sessions queued, measured with py-spy)."""
        async with self._positions_lock:
            if time.monotonic() - self._positions_at >= POSITIONS_TTL_S:
                self._positions = await self._read_positions()
                self._positions_at = time.monotonic()
        return self._positions

    async def _read_positions(self) -> dict[str, int]:
        waiting = await waiting_entries(self.redis, 10000)
        return {sid: i + 1 for i, (_id, sid) in enumerate(waiting)}

    @staticmethod
    def close_marker(seq: int, offset: int) -> AudioMarker:
        return AudioMarker("close", seq, offset)
