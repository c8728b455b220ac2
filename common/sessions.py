"""The one owner of Redis access to sessions: create, attach, access checks, info, listing,
reads of their streams, heartbeat, notices, audio appends.

Field names of the session record (``stt:{sid}:meta``) are those of ``SessionMeta``
(``common/session_meta.py``); the Lua scripts that write it are in ``common/scripts.py``.
The gateway (live sessions), ``python -m fanout`` and the gateway's sessions API (viewers,
listing, exports, replays) all go through ``Sessions``; the transcribers' lease and commit
scripts are in ``transcriber/``.

Creation and heartbeats run as Lua scripts on the session's own hash slot and take their
times from the Redis server's clock (``TIME``), never from the machine that calls them,
so a worker that reads ``heartbeat`` on another machine compares it with the same clock.

Creation is idempotent: redis-py sends a command again when its reply was lost, and the
old creation transaction then reset the epoch of a session a worker had already taken (two
workers transcribed it). Now a second creation changes nothing; the work-queue entry it
may add again is a duplicate that the transcribers drop (``transcriber/commit.py``,
``lease_entry``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import msgpack
import numpy as np
import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

from common import compaction, keys
from common.audio import TARGET_RATE
from common.auth import DEFAULT_TENANT
from common.errors import SessionNotFound
from common.messages import (
    AudioEntry,
    AudioFrame,
    AudioMarker,
    Final,
    Result,
    Warning,
    pack_result,
    unpack_audio_entry,
    unpack_result,
)
from common.scripts import COMPACT_AUDIO, CREATE_SESSION, DELETE_SESSION, HEARTBEAT, NOTICE
from common.session_meta import CLOSED, SessionMeta
from common.streams import AudioAppender
from common.work_queue import QueuePositions, enqueue, queue_backlog

#: ``progress_many``'s epoch for a session that has no record any more.
GONE = -1

#: Sessions per pipeline in ``progress_many``: one pipeline of 1000 stalled the loop 40 ms.
CHUNK = 100

SESSION_ID = re.compile(r"[0-9a-f]{32}")

#: Entries read per XRANGE page.
PAGE = 500

#: Samples per frame of compacted audio as it is read back (100 ms, as a live client sends).
COMPACTED_FRAME = 1600

#: Redis' own bytes per stream entry beyond its fields (id, listpack headers), estimated for
#: the raw size a compaction reports.
STREAM_ENTRY_BYTES = 24

#: The fields a listing shows.
_INFO_FIELDS = ("state", "created", "model", "language", "interim", "duration",
                "next_utterance", "seq", "replay_of", "processed_sample", "tenant")


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
    tenant: str = DEFAULT_TENANT  # whose session it is

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
        tenant=m.tenant or DEFAULT_TENANT,
    )


def audio_end(entry: AudioEntry) -> int:
    """Samples in the audio stream up to and including ``entry``."""
    return entry.offset + entry.samples if isinstance(entry, AudioFrame) else entry.offset


@dataclasses.dataclass(frozen=True)
class Attached:
    """Where a (re)attached connection continues."""

    generation: int
    samples: int  # samples already in the audio stream
    entry_seq: int  # seq of the last audio entry
    ended: bool  # the stream already has its close marker
    meta: SessionMeta


@dataclasses.dataclass(frozen=True)
class Compacted:
    """What a compaction did: bytes of the raw stream's entries (fields plus Redis' own
    per-entry cost, estimated), bytes of the compressed form, samples."""

    raw_bytes: int
    compact_bytes: int
    samples: int


@dataclasses.dataclass(frozen=True)
class SessionAccess:
    owner: str  # "key:NAME", "token:NONCE", or "" when created without authentication
    account: str
    deadline: float | None  # unix time the session must end by
    created: float
    state: str  # "active" or "closed"
    tenant: str = DEFAULT_TENANT




class Sessions:
    """Every session operation of the gateway and the sessions API, over one Redis."""

    def __init__(self, redis: aioredis.Redis, append_batch: int = 256,
                 replica_acks: int = 0, ack_timeout_ms: int = 1000) -> None:
        self.redis = redis
        self.appender = AudioAppender(redis, append_batch, replica_acks=replica_acks,
                                      ack_timeout_ms=ack_timeout_ms)
        self._notice = redis.register_script(NOTICE)
        self._heartbeat = redis.register_script(HEARTBEAT)
        self._delete = redis.register_script(DELETE_SESSION)
        self._compact = redis.register_script(COMPACT_AUDIO)
        self._positions = QueuePositions(redis)

    # ------------------------------------------------------------------ creating, writing

    async def create(self, sid: str, fields: dict[str, str | int]) -> int:
        """A live session: its record, index entry and work-queue entry (idempotent).
        Returns its first attach generation."""
        await create_session(self.redis, sid, dict(fields))
        return 1

    async def create_replay(self, sid: str, original: str, fields: dict[str, str | int]) -> None:
        """A replay of ``original``: created like a live session, marked ``replay_of``."""
        await create_session(self.redis, sid, {**fields, "replay_of": original})

    async def append(self, sid: str, generation: int, entries: Sequence[AudioEntry]) -> bool:
        """Append entries in order; False when another connection has taken the session
        (or it has ended)."""
        return await self.appender.append(sid, generation, entries)

    async def heartbeat(self, sid: str) -> None:
        await heartbeat(self.redis, sid)

    async def delete(self, sid: str) -> None:
        """Remove the session: every key of it (one script on its hash slot), then its
        listing entry (another slot on a cluster). SessionNotFound when it had no record.
        A live session ends: its gateway's next append, its monitor (within a second) and
        its transcriber's next lease renewal find no record; its viewers are told within
        their hub's existence check. Its work-queue entry, if still waiting, is dropped by
        the transcriber that takes it (no record)."""
        check_session_id(sid)
        tenant = await self.redis.hget(keys.meta(sid), "tenant")
        existed = int(await self._delete(keys=[keys.meta(sid), keys.audio(sid),
                                               keys.results(sid), keys.audio_z(sid)]))
        await self.redis.zrem(keys.INDEX, sid)
        if tenant and tenant.decode() != DEFAULT_TENANT:
            await self.redis.zrem(keys.tenant_index(tenant.decode()), sid)
        if not existed:
            raise SessionNotFound()

    async def progress_many(self, sids: Sequence[str], beat: bool) -> list[tuple[int, int]]:
        """(owner epoch, samples processed) of each session, in pipelines of ``CHUNK``;
        refreshes their heartbeats too when ``beat`` (on Redis time: the worker's idle
        check compares it with that). The epoch is ``GONE`` (-1) for a session without a
        record (deleted, or expired): a created session always has one (0 until taken)."""
        out: list[tuple[int, int]] = []
        for start in range(0, len(sids), CHUNK):
            chunk = sids[start:start + CHUNK]

            def pipeline(chunk: Sequence[str] = chunk) -> Any:
                pipe = self.redis.pipeline(transaction=False)
                for sid in chunk:
                    pipe.hmget(keys.meta(sid), "epoch", "processed_sample")
                    if beat:  # execute_command: a cluster pipeline refuses .evalsha()
                        pipe.execute_command("EVALSHA", self._heartbeat.sha, 1, keys.meta(sid))
                return pipe

            try:
                replies = await pipeline().execute()
            except NoScriptError:  # a restarted Redis lost its script cache
                await self.redis.script_load(HEARTBEAT)
                replies = await pipeline().execute()
            step = 2 if beat else 1
            for epoch, processed in replies[::step]:
                out.append((GONE if epoch is None else int(epoch), int(processed or 0)))
        return out

    async def access(self, sid: str) -> SessionAccess:
        """Who created the session and until when it may run, read before a resume."""
        names = ["state", "principal", "account", "deadline", "created", "tenant"]
        values = await self.redis.hmget(keys.meta(sid), names)
        if values[0] is None:
            raise SessionNotFound()
        meta = SessionMeta.decode(dict(zip(names, values, strict=True)))
        return SessionAccess(meta.principal, meta.account, meta.deadline or None,
                             meta.created or time.time(), meta.state,
                             meta.tenant or DEFAULT_TENANT)

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

    async def notice(self, sid: str, warning: Warning) -> None:
        await self._notice(keys=[keys.meta(sid), keys.results(sid)], args=[pack_result(warning)])

    async def progress(self, sid: str) -> tuple[int, int]:
        """(owner epoch, samples the transcriber has processed)."""
        epoch, processed = await self.redis.hmget(keys.meta(sid), "epoch", "processed_sample")
        return int(epoch or 0), int(processed or 0)

    async def backlog(self, model: str = keys.DEFAULT_MODEL) -> int:
        """Sessions queued that no transcriber has taken yet."""
        return await queue_backlog(self.redis, model)

    async def waiting_positions(self, model: str = keys.DEFAULT_MODEL) -> dict[str, int]:
        """Each waiting session's 1-based position in the work queue (read at most once a
        second for all of them: ``QueuePositions``)."""
        return await self._positions.get(model)

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

    async def owner(self, sid: str) -> tuple[str, str, str]:
        """(owner, account, tenant) the session was created by (owner and account are ''
        when auth was off; the tenant is the default one for a session older than
        tenants)."""
        check_session_id(sid)
        names = ("state", "principal", "account", "tenant")
        values = await self.redis.hmget(keys.meta(sid), list(names))
        if values[0] is None:
            raise SessionNotFound()
        meta = SessionMeta.decode(dict(zip(names, values, strict=True)))
        return meta.principal, meta.account, meta.tenant or DEFAULT_TENANT

    async def closed(self, sid: str) -> bool:
        """Whether the session exists and has ended."""
        return await self.redis.hget(keys.meta(sid), "state") == CLOSED.encode()

    async def exists(self, sid: str) -> bool:
        return bool(await self.redis.exists(keys.meta(sid)))

    async def last_result_id(self, sid: str) -> str:
        last = await self.redis.xrevrange(keys.results(sid), count=1)
        return last[0][0].decode() if last else "0-0"

    async def audio_samples(self, sid: str) -> int:
        """Samples in the session's audio (its stream, or its compacted form)."""
        last = await self.redis.xrevrange(keys.audio(sid), count=1)
        if last:
            return audio_end(unpack_audio_entry(last[0][1]))
        samples = await self.redis.hget(keys.audio_z(sid), "samples")
        return int(samples or 0)

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
        """Stored audio entries in order, page by page; from the compacted form once the
        session was compacted (frames of ``COMPACTED_FRAME`` samples, markers where they
        were), also when that happens in the middle of the read."""
        start = "-"
        at = 0  # samples yielded so far
        ended = False
        while True:
            page = await self.redis.xrange(keys.audio(sid), min=start, count=PAGE)
            for _entry_id, fields in page:
                entry = unpack_audio_entry(fields)
                at = max(at, audio_end(entry))
                ended = ended or (isinstance(entry, AudioMarker) and entry.kind == "close")
                yield entry
            if len(page) < PAGE:
                break
            start = f"({page[-1][0].decode()}"
        if not ended:  # compacted before or while it was read: the rest is in the blob
            async for entry in self.compacted_audio(sid, after=at):
                yield entry

    async def compacted_audio(self, sid: str, after: int = 0) -> AsyncIterator[AudioEntry]:
        """The compacted audio as entries from sample ``after`` on (nothing when the
        session is not compacted). Decoding runs in a thread, a second at a time."""
        codec, samples, packed, data = await self.redis.hmget(
            keys.audio_z(sid), ["codec", "samples", "markers", "data"])
        if codec is None or data is None:
            return
        markers = [AudioMarker(kind, 0, offset) for kind, offset
                   in msgpack.unpackb(packed or b"\x90")]
        chunks = compaction.decode(data, codec.decode(), int(samples or 0))
        seq = 0
        offset = 0
        buffer = np.zeros(0, dtype=np.int16)
        while True:
            chunk = await asyncio.to_thread(next, chunks, None)
            if chunk is not None:
                buffer = np.concatenate([buffer, chunk])
            while len(buffer) >= COMPACTED_FRAME or (chunk is None and len(buffer)):
                # a frame ends at the next marker inside it
                end = offset + min(len(buffer), COMPACTED_FRAME)
                cut = next((m.offset for m in markers if offset < m.offset < end), end)
                n = cut - offset
                frame, buffer = buffer[:n], buffer[n:]
                while markers and markers[0].offset <= offset:
                    marker = markers.pop(0)
                    seq += 1
                    if marker.offset >= after:
                        yield dataclasses.replace(marker, seq=seq)
                seq += 1
                if offset + n > after:
                    lo = max(0, after - offset)
                    yield AudioFrame(seq, offset + lo, frame[lo:].tobytes())
                offset += n
            if chunk is None:
                break
        for marker in markers:
            seq += 1
            if marker.offset >= after:
                yield dataclasses.replace(marker, seq=seq)

    async def compact(self, sid: str, codec: str, opus_bitrate: int) -> Compacted | None:
        """Replace a closed session's audio stream with its compressed form (one script:
        nothing is lost if the session changes meanwhile: then nothing happens). None when
        there is nothing to do (not closed, already compacted, deleted, changed)."""
        encoder = compaction.Encoder(codec, opus_bitrate)
        markers: list[tuple[str, int]] = []
        raw = 0
        last_id = ""
        start = "-"
        while True:
            page = await self.redis.xrange(keys.audio(sid), min=start, count=PAGE)
            pcm: list[np.ndarray] = []
            for entry_id, fields in page:
                raw += sum(len(k) + len(v) for k, v in fields.items()) + STREAM_ENTRY_BYTES
                entry = unpack_audio_entry(fields)
                if isinstance(entry, AudioFrame):
                    if entry.channels != 1:  # multichannel audio stays raw (mono codecs)
                        return None
                    pcm.append(np.frombuffer(entry.pcm, dtype="<i2"))
                else:
                    markers.append((entry.kind, entry.offset))
                last_id = entry_id.decode()
            if pcm:
                await asyncio.to_thread(encoder.feed, np.concatenate(pcm))
            if len(page) < PAGE:
                break
            start = f"({page[-1][0].decode()}"
        if not last_id:
            return None
        data = await asyncio.to_thread(encoder.finish)
        done = int(await self._compact(
            keys=[keys.meta(sid), keys.audio(sid), keys.audio_z(sid)],
            args=[last_id, codec, encoder.samples, msgpack.packb(markers), data, raw]))
        if done != 1:
            return None
        return Compacted(raw, len(data), encoder.samples)

    async def finals(self, sid: str) -> list[Final]:
        return [r async for _id, r in self.results(sid) if isinstance(r, Final)]

    async def result_counts(self, sid: str) -> dict[str, int]:
        counts = {"partial": 0, "final": 0, "warning": 0, "closed": 0}
        async for _id, r in self.results(sid):
            counts[r.TYPE] += 1
        return counts

    # ------------------------------------------------------------------ listing

    async def list_sessions(self, limit: int, before: float | None = None,
                            state: str | None = None, max_scan: int = 1000,
                            tenant: str | None = None,
                            ) -> tuple[list[SessionInfo], float | None]:
        """Newest first, from the index; expired members are dropped from the index on the way.
        With ``tenant``, only that tenant's sessions: a named tenant's from its own index,
        the default tenant's from ``INDEX`` (the others skipped like those of another
        ``state``).

        Examines at most ``max_scan`` index entries per call (a ``state`` filter that
        matches few sessions would otherwise read the whole index in one request), so a
        page may hold fewer than ``limit`` sessions. Returns the page and the ``before``
        value of the next page (None at the end of the index).
        """
        index = keys.tenant_index(tenant) if tenant and tenant != DEFAULT_TENANT \
            else keys.INDEX
        out: list[SessionInfo] = []
        high: float | str = f"({before}" if before is not None else "+inf"
        scanned = 0
        while len(out) < limit:
            want = min(max(2 * (limit - len(out)), 100), max_scan - scanned)
            if want <= 0:
                return out, float(high[1:]) if isinstance(high, str) and high[0] == "(" \
                    else None
            members = await self.redis.zrevrangebyscore(
                index, high, "-inf", start=0, num=want, withscores=True)
            if not members:
                return out, None
            scanned += len(members)
            sids = [m.decode() for m, _ in members]
            infos = await self._infos(sids)
            gone = [sid for sid, info in zip(sids, infos, strict=True) if info is None]
            if gone:
                await self.redis.zrem(index, *gone)
            for (_m, score), info in zip(members, infos, strict=True):
                if info is not None and (state is None or info.state == state) and (
                        tenant is None or info.tenant == tenant):
                    out.append(info)
                    if len(out) == limit:
                        return out, score
            high = f"({members[-1][1]}"
            if len(members) < want:
                return out, None
        return out, None


async def create_session(redis: aioredis.Redis, sid: str,
                         fields: dict[str, str | int | float]) -> float:
    """Write the session's record, index it for listing and queue it for the transcribers.

    Safe to call again (a lost reply retried): the record and the index are written once,
    and a second work entry is dropped as a duplicate by whichever worker takes it.
    Returns the creation time (Redis clock, unix seconds).
    """
    args: list[str | int | float] = []
    for name, value in fields.items():
        args += [name, value]
    created = float(await redis.register_script(CREATE_SESSION)(keys=[keys.meta(sid)], args=args))
    await redis.zadd(keys.INDEX, {sid: created}, nx=True)  # for GET /v1/sessions
    tenant = str(fields.get("tenant") or "")
    if tenant:  # for an admin's GET /v1/usage
        await redis.sadd(keys.TENANTS, tenant)
    if tenant and tenant != DEFAULT_TENANT:  # its own listing
        await redis.zadd(keys.tenant_index(tenant), {sid: created}, nx=True)
    await enqueue(redis, sid, str(fields.get("model", "")))  # the model's own queue
    return created


async def heartbeat(redis: aioredis.Redis, sid: str) -> None:
    await redis.register_script(HEARTBEAT)(keys=[keys.meta(sid)])
