"""Creating a session and keeping its client heartbeat: the writes every service shares.

Both run as Lua scripts on the session's own hash slot and take their times from the Redis
server's clock (``TIME``), never from the machine that calls them, so a worker that reads
``heartbeat`` on another machine compares it with the same clock.

Creation is idempotent: redis-py sends a command again when its reply was lost, and the
old creation transaction then reset the epoch of a session a worker had already taken (two
workers transcribed it). Now a second creation changes nothing; the work-queue entry it
may add again is a duplicate that the transcribers drop (``transcriber/commit.py``,
``lease_entry``).
"""

from __future__ import annotations

import redis.asyncio as aioredis

from common import keys

# Redis time in seconds with milliseconds, as text (the format of 'created' and 'heartbeat').
_NOW_S = """
local t = redis.call('TIME')
local now = string.format('%.3f', tonumber(t[1]) + tonumber(t[2]) / 1000000)
"""

# KEYS: meta. ARGV: field, value, field, value, ... (the caller's fields).
# Writes the session record unless it exists; returns its 'created' time either way.
_CREATE = _NOW_S + """
if redis.call('EXISTS', KEYS[1]) == 1 then return redis.call('HGET', KEYS[1], 'created') end
if #ARGV > 0 then redis.call('HSET', KEYS[1], unpack(ARGV)) end
redis.call('HSET', KEYS[1], 'state', 'active', 'created', now, 'heartbeat', now, 'epoch', 0,
           'seq', 0, 'commit_sample', 0, 'next_utterance', 0, 'attach', 1)
return now
"""

# KEYS: meta. Refreshes the client heartbeat (Redis time); 0 when the session is gone.
HEARTBEAT = _NOW_S + """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'heartbeat', now)
return 1
"""


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
    created = float(await redis.register_script(_CREATE)(keys=[keys.meta(sid)], args=args))
    await redis.zadd(keys.INDEX, {sid: created}, nx=True)  # for GET /v1/sessions
    await redis.xadd(keys.SESSIONS, {"sid": sid})
    return created


async def heartbeat(redis: aioredis.Redis, sid: str) -> None:
    await redis.register_script(HEARTBEAT)(keys=[keys.meta(sid)])
