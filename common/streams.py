"""Appending to a session's audio stream: fenced by the attach generation, idempotent by seq.

Used by the gateway (client audio) and by replays. A write whose reply was lost (Redis
restarting after it ran the script) is retried by the caller; the ``audio_seq`` high-water
mark in meta makes the retry a no-op instead of a duplicated frame.
"""

from __future__ import annotations

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from common import keys
from common.messages import AudioEntry, pack_audio_entry

# KEYS: meta, audio. ARGV: attach generation, then (seq, packed entry) pairs.
# Returns the number of entries added, or -1 when another connection has the session.
_APPEND = """
if redis.call('HGET', KEYS[1], 'attach') ~= ARGV[1] then return -1 end
local last = tonumber(redis.call('HGET', KEYS[1], 'audio_seq') or '0')
local added = 0
for i = 2, #ARGV, 2 do
  local seq = tonumber(ARGV[i])
  if seq > last then
    redis.call('XADD', KEYS[2], '*', 'm', ARGV[i + 1])
    last = seq
    added = added + 1
  end
end
redis.call('HSET', KEYS[1], 'audio_seq', last)
return added
"""


class AudioAppender:
    def __init__(self, redis: aioredis.Redis) -> None:
        self._script = redis.register_script(_APPEND)

    async def append(self, sid: str, generation: int, entries: list[AudioEntry]) -> bool:
        """Append entries (strictly increasing ``seq``) in order; entries at or below the
        stream's last seq are skipped. False when another connection took the session."""
        args: list[int | bytes] = [generation]
        for entry in entries:
            args += [entry.seq, pack_audio_entry(entry)["m"]]
        n = await self._script(keys=[keys.meta(sid), keys.audio(sid)], args=args)
        return int(n) >= 0


async def queue_backlog(redis: aioredis.Redis) -> int:
    """Sessions on the work queue that no transcriber has taken yet."""
    try:
        groups = await redis.xinfo_groups(keys.SESSIONS)
    except ResponseError:  # no queue yet
        return 0
    for g in groups:
        name = g["name"].decode() if isinstance(g["name"], bytes) else g["name"]
        if name == keys.GROUP:
            lag = g.get("lag")
            return int(lag) if lag is not None else 0
    return int(await redis.xlen(keys.SESSIONS))  # no worker has created the group yet
