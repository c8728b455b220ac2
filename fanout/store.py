"""Redis reads of recorded sessions: metadata, listing, audio and results; replay sessions.

Everything here reads the keys the gateway and the transcribers write
(see ``common/keys.py``); the only writes are the listing index and the new
sessions a replay creates.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import redis.asyncio as aioredis

from common import keys
from common.audio import TARGET_RATE
from common.errors import SessionNotFound
from common.messages import (
    AudioEntry,
    AudioFrame,
    Final,
    Result,
    unpack_audio_entry,
    unpack_result,
)
from common.session_meta import CLOSED, SessionMeta
from common.sessions import create_session, heartbeat
from common.streams import AudioAppender, queue_backlog

SESSION_ID = re.compile(r"[0-9a-f]{32}")

#: Entries read per XRANGE page.
PAGE = 500

# Same fencing as the gateway's appends: only the holder of attach generation
# ARGV[1] may append. KEYS: meta, audio. ARGV: generation, packed entries.
_INFO_FIELDS = ("state", "created", "model", "language", "interim", "duration",
                "next_utterance", "seq", "replay_of", "processed_sample")


def check_session_id(sid: str) -> str:
    """Session ids are 32 hex digits; anything else cannot exist (and never reaches a key)."""
    if not SESSION_ID.fullmatch(sid):
        raise SessionNotFound()
    return sid


@dataclasses.dataclass(frozen=True)
class SessionInfo:
    """What a listing shows about one session."""

    session_id: str
    state: str  # active | closed
    created: float  # unix seconds
    duration: float  # seconds of audio: final when closed, received so far when active
    model: str
    language: str
    interim_results: bool
    finals: int  # utterances committed
    results: int  # every result published: partials, finals, warnings, closed
    replay_of: str | None
    expires_in: int | None  # seconds until the retention TTL removes it; None while active

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["created_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.created))
        return out


def _info(sid: str, values: list[bytes | None], ttl: int, audio_end: int | None) -> SessionInfo:
    m = SessionMeta.decode(dict(zip(_INFO_FIELDS, values, strict=True)))
    duration = m.duration if m.closed else (audio_end or 0) / TARGET_RATE
    return SessionInfo(
        session_id=sid,
        state=m.state,
        created=m.created,
        duration=round(duration, 3),
        model=m.model,
        language=m.language,
        interim_results=m.interim,
        finals=m.next_utterance,
        results=m.seq,
        replay_of=m.replay_of or None,
        expires_in=ttl if ttl >= 0 else None,
    )


def audio_end(entry: AudioEntry) -> int:
    """Samples in the audio stream up to and including ``entry``."""
    return entry.offset + entry.samples if isinstance(entry, AudioFrame) else entry.offset


class SessionRecords:
    """Reads (and replay writes) over the recorded sessions in one Redis."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self.redis = redis
        self._appender = AudioAppender(redis)

    # ------------------------------------------------------------------ one session

    async def info(self, sid: str) -> SessionInfo:
        check_session_id(sid)
        infos = await self._infos([sid])
        if not infos[0]:
            raise SessionNotFound()
        info = infos[0]
        assert info is not None
        return info

    async def _infos(self, sids: list[str]) -> list[SessionInfo | None]:
        """Info for each id, None where the session has expired (two round trips)."""
        pipe = self.redis.pipeline(transaction=False)
        for sid in sids:
            pipe.hmget(keys.meta(sid), list(_INFO_FIELDS))
            pipe.ttl(keys.meta(sid))
        replies = await pipe.execute()
        metas = [(replies[2 * i], int(replies[2 * i + 1])) for i in range(len(sids))]
        active = [sid for sid, (values, ttl) in zip(sids, metas, strict=True)
                  if ttl != -2 and values[0] != CLOSED.encode()]
        ends: dict[str, int] = {}
        if active:
            pipe = self.redis.pipeline(transaction=False)
            for sid in active:
                pipe.xrevrange(keys.audio(sid), count=1)
            for sid, last in zip(active, await pipe.execute(), strict=True):
                ends[sid] = audio_end(unpack_audio_entry(last[0][1])) if last else 0
        out: list[SessionInfo | None] = []
        for sid, (values, ttl) in zip(sids, metas, strict=True):
            # TTL -2: the meta key does not exist (never did, or expired).
            out.append(None if ttl == -2 or values[0] is None
                       else _info(sid, values, ttl, ends.get(sid)))
        return out

    async def meta(self, sid: str) -> SessionMeta:
        check_session_id(sid)
        raw = await self.redis.hgetall(keys.meta(sid))
        if not raw:
            raise SessionNotFound()
        return SessionMeta.decode(raw)

    async def owner(self, sid: str) -> tuple[str, str]:
        """(owner, account) the session was created by ('' when auth was off)."""
        check_session_id(sid)
        values = await self.redis.hmget(keys.meta(sid), ["state", "principal", "account"])
        if values[0] is None:
            raise SessionNotFound()
        meta = SessionMeta.decode(dict(zip(("state", "principal", "account"), values,
                                           strict=True)))
        return meta.principal, meta.account

    async def exists(self, sid: str) -> bool:
        return bool(await self.redis.exists(keys.meta(sid)))

    async def last_result_id(self, sid: str) -> str:
        last = await self.redis.xrevrange(keys.results(sid), count=1)
        return last[0][0].decode() if last else "0-0"

    async def audio_samples(self, sid: str) -> int:
        """Samples in the session's audio stream."""
        last = await self.redis.xrevrange(keys.audio(sid), count=1)
        return audio_end(unpack_audio_entry(last[0][1])) if last else 0

    async def results(self, sid: str, after_id: str = "0-0",
                      ) -> AsyncIterator[tuple[str, Result]]:
        """Stored results in order, page by page (entry id, result)."""
        start = f"({after_id}" if after_id != "0-0" else "-"
        while True:
            page = await self.redis.xrange(keys.results(sid), min=start, count=PAGE)
            for entry_id, fields in page:
                yield entry_id.decode(), unpack_result(fields)
            if len(page) < PAGE:
                return
            start = f"({page[-1][0].decode()}"

    async def audio(self, sid: str) -> AsyncIterator[AudioEntry]:
        """Stored audio entries in order, page by page."""
        start = "-"
        while True:
            page = await self.redis.xrange(keys.audio(sid), min=start, count=PAGE)
            for _entry_id, fields in page:
                yield unpack_audio_entry(fields)
            if len(page) < PAGE:
                return
            start = f"({page[-1][0].decode()}"

    async def finals(self, sid: str) -> list[Final]:
        return [r async for _id, r in self.results(sid) if isinstance(r, Final)]

    async def result_counts(self, sid: str) -> dict[str, int]:
        counts = {"partial": 0, "final": 0, "warning": 0, "closed": 0}
        async for _id, r in self.results(sid):
            counts[r.TYPE] += 1
        return counts

    # ------------------------------------------------------------------ listing

    async def index(self, sid: str, created: float) -> None:
        await self.redis.zadd(keys.INDEX, {sid: created}, nx=True)

    async def list_sessions(self, limit: int, before: float | None = None,
                            state: str | None = None, max_scan: int = 1000,
                            ) -> tuple[list[SessionInfo], float | None]:
        """Newest first, from the index; expired members are dropped from the index on the way.

        Examines at most ``max_scan`` index entries per call (a ``state`` filter that
        matches few sessions would otherwise read the whole index in one request), so a
        page may hold fewer than ``limit`` sessions. Returns the page and the ``before``
        value of the next page (None at the end of the index).
        """
        out: list[SessionInfo] = []
        high: float | str = f"({before}" if before is not None else "+inf"
        scanned = 0
        while len(out) < limit:
            want = min(max(2 * (limit - len(out)), 100), max_scan - scanned)
            if want <= 0:
                return out, float(high[1:]) if isinstance(high, str) and high[0] == "(" \
                    else None
            members = await self.redis.zrevrangebyscore(
                keys.INDEX, high, "-inf", start=0, num=want, withscores=True)
            if not members:
                return out, None
            scanned += len(members)
            sids = [m.decode() for m, _ in members]
            infos = await self._infos(sids)
            gone = [sid for sid, info in zip(sids, infos, strict=True) if info is None]
            if gone:
                await self.redis.zrem(keys.INDEX, *gone)
            for (_m, score), info in zip(members, infos, strict=True):
                if info is not None and (state is None or info.state == state):
                    out.append(info)
                    if len(out) == limit:
                        return out, score
            high = f"({members[-1][1]}"
            if len(members) < want:
                return out, None
        return out, None

    # ------------------------------------------------------------------ replays

    async def create_replay(self, sid: str, original: str, fields: dict[str, str | int]) -> None:
        """Write a new session's metadata, index it and announce it to the transcribers."""
        await create_session(self.redis, sid, {**fields, "replay_of": original})

    async def append(self, sid: str, entries: list[AudioEntry], generation: int = 1) -> bool:
        """Append audio entries to a replay session; False if a client attached to it."""
        return await self._appender.append(sid, generation, entries)

    async def heartbeat(self, sid: str) -> None:
        await heartbeat(self.redis, sid)

    async def backlog(self) -> int:
        """Sessions queued that no transcriber has taken yet."""
        return await queue_backlog(self.redis)

