"""Fenced writes: every result goes out only while the writer's epoch is the session's epoch.

Each script touches only one session's hash-tagged keys, so it is legal on
Redis Cluster. ``seq`` is assigned here, atomically, so it is strictly
increasing per session whichever worker writes.
"""

from __future__ import annotations

import msgpack
import redis.asyncio as aioredis

from common import keys
from common.errors import StaleLease
from common.messages import Closed, Final, Result, pack_result

# KEYS: meta, results. ARGV: epoch, body, processed sample.
# Returns seq, or -1 when the epoch is stale.
_PUBLISH = """
if redis.call('HGET', KEYS[1], 'epoch') ~= ARGV[1] then return -1 end
local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
redis.call('XADD', KEYS[2], '*', 'seq', seq, 'm', ARGV[2], 'epoch', ARGV[1])
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
return seq
"""

# The closing message, then the retention TTL on every key of the session.
# KEYS: meta, results, audio. ARGV: epoch, body, retention seconds, duration.
_CLOSE = """
if redis.call('HGET', KEYS[1], 'epoch') ~= ARGV[1] then return -1 end
if redis.call('HGET', KEYS[1], 'state') == 'closed' then return 0 end
local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
redis.call('XADD', KEYS[2], '*', 'seq', seq, 'm', ARGV[2], 'epoch', ARGV[1])
redis.call('HSET', KEYS[1], 'state', 'closed', 'duration', ARGV[4])
for i = 1, 3 do redis.call('EXPIRE', KEYS[i], ARGV[3]) end
return seq
"""

# Take ownership: a new epoch fences out every earlier owner.
# KEYS: meta. ARGV: owner. Returns the new epoch, or -1 if the session is gone.
_ACQUIRE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local epoch = redis.call('HINCRBY', KEYS[1], 'epoch', 1)
redis.call('HSET', KEYS[1], 'owner', ARGV[1])
return epoch
"""


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

    @staticmethod
    async def acquire(redis: aioredis.Redis, sid: str, owner: str) -> int | None:
        epoch = int(await redis.register_script(_ACQUIRE)(keys=[keys.meta(sid)], args=[owner]))
        return None if epoch < 0 else epoch

    def _check(self, seq: int) -> int:
        if int(seq) < 0:
            raise StaleLease(f"session {self.sid}: epoch {self.epoch} is no longer the owner")
        return int(seq)

    async def publish(self, result: Result) -> int:
        seq = await self._publish(keys=[keys.meta(self.sid), keys.results(self.sid)],
                                  args=[self.epoch, pack_result(result)])
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

    async def close(self, closed: Closed, retention_s: int) -> int:
        seq = await self._close(
            keys=[keys.meta(self.sid), keys.results(self.sid), keys.audio(self.sid)],
            args=[self.epoch, pack_result(closed), retention_s, closed.duration],
        )
        return self._check(seq)
