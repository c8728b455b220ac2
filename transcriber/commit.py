"""Fenced writes: every result goes out only while the writer's epoch is the session's epoch.

Each script touches only one session's hash-tagged keys, so it is legal on
Redis Cluster. ``seq`` is assigned here, atomically, so it is strictly
increasing per session whichever worker writes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import msgpack
import redis.asyncio as aioredis

from common import keys
from common.errors import StaleLease
from common.messages import Closed, Final, Partial, Result, Word, pack_result

# KEYS: meta, results. ARGV: epoch, body, and for a partial its promised (stable) words,
# packed (kept in 'stable' so that a worker taking over the open utterance keeps them).
# Returns seq, or -1 when the epoch is stale.
_PUBLISH = """
if redis.call('HGET', KEYS[1], 'epoch') ~= ARGV[1] then return -1 end
local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
redis.call('XADD', KEYS[2], '*', 'seq', seq, 'm', ARGV[2], 'epoch', ARGV[1])
if ARGV[3] then redis.call('HSET', KEYS[1], 'stable', ARGV[3]) end
return seq
"""

# How far the owner has transcribed (for lag reporting). ARGV: epoch, processed sample.
_PROGRESS = """
if redis.call('HGET', KEYS[1], 'epoch') ~= ARGV[1] then return -1 end
redis.call('HSET', KEYS[1], 'processed_sample', ARGV[2])
return 0
"""

# A final and its commit point in one step. Idempotent: a final whose utterance
# is already committed (a retried write whose reply was lost) returns 0.
# ARGV: epoch, body, commit_sample, next_utterance, prompt, resume_id, utterance, timing
_COMMIT = """
if redis.call('HGET', KEYS[1], 'epoch') ~= ARGV[1] then return -1 end
if tonumber(redis.call('HGET', KEYS[1], 'next_utterance') or '0') > tonumber(ARGV[7]) then
  return 0
end
local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
redis.call('XADD', KEYS[2], '*', 'seq', seq, 'm', ARGV[2], 'epoch', ARGV[1], 't', ARGV[8])
redis.call('HSET', KEYS[1], 'commit_sample', ARGV[3], 'next_utterance', ARGV[4],
           'prompt', ARGV[5], 'resume_id', ARGV[6])
redis.call('HDEL', KEYS[1], 'stable')
return seq
"""

# The time on the Redis server, in milliseconds: every lease and age is measured on this one
# clock, never on the wall clocks of the machines that read or write it.
_NOW_MS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# The closing message, then the retention TTL on every key of the session.
# KEYS: meta, results, audio. ARGV: epoch, body, retention seconds, duration, and for an idle
# close: idle ms (0 = not an idle close) and the id of the last audio entry read. An idle
# close is refused (-3) when the client's heartbeat (Redis time) is fresher than the idle
# time or audio came after the entry read: the decision is re-checked where it takes effect.
_CLOSE = _NOW_MS + """
if redis.call('HGET', KEYS[1], 'epoch') ~= ARGV[1] then return -1 end
if redis.call('HGET', KEYS[1], 'state') == 'closed' then return 0 end
local idle = tonumber(ARGV[5] or '0')
if idle > 0 then
  local beat = tonumber(redis.call('HGET', KEYS[1], 'heartbeat') or '0')
  if now - beat * 1000 < idle then return -3 end
  local last = redis.call('XREVRANGE', KEYS[3], '+', '-', 'COUNT', 1)[1]
  if last and last[1] ~= ARGV[6] then return -3 end
end
local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
redis.call('XADD', KEYS[2], '*', 'seq', seq, 'm', ARGV[2], 'epoch', ARGV[1])
redis.call('HSET', KEYS[1], 'state', 'closed', 'duration', ARGV[4])
for i = 1, 3 do redis.call('EXPIRE', KEYS[i], ARGV[3]) end
return seq
"""

# Milliseconds since the client's heartbeat, on Redis time (-1: none). KEYS: meta.
_SILENCE = _NOW_MS + """
local beat = redis.call('HGET', KEYS[1], 'heartbeat')
if not beat then return -1 end
return now - math.floor(tonumber(beat) * 1000)
"""

#: SessionWriter.close's answer when an idle close finds the client back.
CLIENT_BACK = -3


# Take ownership with work-queue entry ARGV[2]: a new epoch fences out every earlier owner.
# The meta hash records which entry holds the lease (lease_entry) and when its owner last
# renewed it (lease_at, Redis time); an entry that is not the recorded one while that
# lease is fresh is a duplicate (a retried creation or hand-back) and takes nothing.
# KEYS: meta. ARGV: owner, entry id, lease ms.
# Returns the new epoch, -1 if the session is gone, -2 for a duplicate entry.
_ACQUIRE = _NOW_MS + """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local entry = redis.call('HGET', KEYS[1], 'lease_entry')
local at = tonumber(redis.call('HGET', KEYS[1], 'lease_at') or '0')
if entry and entry ~= ARGV[2] and now - at < tonumber(ARGV[3]) then return -2 end
local epoch = redis.call('HINCRBY', KEYS[1], 'epoch', 1)
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'lease_entry', ARGV[2], 'lease_at', now)
return epoch
"""

# The owner keeps its lease fresh. KEYS: meta. ARGV: epoch. 1, or 0 when no longer the owner.
_RENEW = _NOW_MS + """
if redis.call('HGET', KEYS[1], 'epoch') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'lease_at', now)
return 1
"""

# The owner gives the session up (shutdown hand-back): the next entry queued for it may
# take it at once. KEYS: meta. ARGV: epoch. 1, or 0 when no longer the owner.
_RELEASE = """
if redis.call('HGET', KEYS[1], 'epoch') ~= ARGV[1] then return 0 end
redis.call('HDEL', KEYS[1], 'lease_entry', 'lease_at')
return 1
"""

#: SessionWriter.acquire's answer for an entry that duplicates a live lease.
DUPLICATE = -2


def pack_stable(utterance: int, words: Sequence[Word]) -> bytes:
    return msgpack.packb({"u": utterance, "w": [dataclasses.astuple(w) for w in words]})


def unpack_stable(raw: bytes | None, utterance: int) -> list[Word]:
    """The promised words kept for ``utterance`` (none when they belong to another one)."""
    if not raw:
        return []
    obj = msgpack.unpackb(raw)
    if obj.get("u") != utterance:
        return []
    return [Word(str(w), float(s), float(e), float(p)) for w, s, e, p in obj["w"]]


class SessionWriter:
    """All writes one worker makes to one session, fenced by the epoch it acquired."""

    def __init__(self, redis: aioredis.Redis, sid: str, epoch: int) -> None:
        self.redis = redis
        self.sid = sid
        self.epoch = epoch
        self._publish = redis.register_script(_PUBLISH)
        self._commit = redis.register_script(_COMMIT)
        self._close = redis.register_script(_CLOSE)
        self._progress = redis.register_script(_PROGRESS)
        self._renew = redis.register_script(_RENEW)
        self._release = redis.register_script(_RELEASE)
        self._silence = redis.register_script(_SILENCE)

    @staticmethod
    async def acquire(redis: aioredis.Redis, sid: str, owner: str, entry_id: bytes,
                      lease_ms: int) -> int | None:
        """The new epoch; None if the session is gone; ``DUPLICATE`` when another entry
        holds a live lease on it."""
        epoch = int(await redis.register_script(_ACQUIRE)(
            keys=[keys.meta(sid)], args=[owner, entry_id, lease_ms]))
        return None if epoch == -1 else epoch

    def _check(self, seq: int) -> int:
        if int(seq) < 0:
            raise StaleLease(f"session {self.sid}: epoch {self.epoch} is no longer the owner")
        return int(seq)

    async def publish(self, result: Result, stable: Sequence[Word] | None = None) -> int:
        """A result; for a partial, ``stable`` (its promised words) is kept for a takeover."""
        args: list[Any] = [self.epoch, pack_result(result)]
        if stable is not None and isinstance(result, Partial):
            args.append(pack_stable(result.utterance, stable))
        seq = await self._publish(keys=[keys.meta(self.sid), keys.results(self.sid)],
                                  args=args)
        return self._check(seq)

    async def commit(self, final: Final, commit_sample: int, next_utterance: int,
                     prompt: str, resume_id: str, timing: dict[str, float] | None = None) -> int:
        """A final with its commit point; ``timing`` (wall clock) is kept for benchmarks."""
        seq = await self._commit(
            keys=[keys.meta(self.sid), keys.results(self.sid)],
            args=[self.epoch, pack_result(final), commit_sample, next_utterance, prompt,
                  resume_id, final.utterance, msgpack.packb(timing or {})],
        )
        return self._check(seq)

    async def progress(self, processed_sample: int) -> None:
        self._check(await self._progress(keys=[keys.meta(self.sid)],
                                         args=[self.epoch, processed_sample]))

    async def still_owner(self) -> bool:
        return await self.redis.hget(keys.meta(self.sid), "epoch") == str(self.epoch).encode()

    async def renew(self) -> bool:
        """Refresh the lease (Redis time); False once another worker took the session."""
        return bool(int(await self._renew(keys=[keys.meta(self.sid)], args=[self.epoch])))

    async def release(self) -> bool:
        """Give the lease up for a hand-back; False once another worker took the session."""
        return bool(int(await self._release(keys=[keys.meta(self.sid)], args=[self.epoch])))

    async def close(self, closed: Closed, retention_s: int, idle_ms: int = 0,
                    last_read: str = "") -> int:
        """The closing message; with ``idle_ms`` an idle close, ``CLIENT_BACK`` when the
        client's heartbeat or new audio shows it is not idle after all."""
        seq = int(await self._close(
            keys=[keys.meta(self.sid), keys.results(self.sid), keys.audio(self.sid)],
            args=[self.epoch, pack_result(closed), retention_s, closed.duration, idle_ms,
                  last_read],
        ))
        return seq if seq == CLIENT_BACK else self._check(seq)

    async def client_silence_ms(self) -> int | None:
        """Milliseconds since the client's last heartbeat, on Redis time (None: none)."""
        ms = int(await self._silence(keys=[keys.meta(self.sid)]))
        return None if ms < 0 else ms
