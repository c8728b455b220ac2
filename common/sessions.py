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
from common.scripts import CREATE_SESSION, HEARTBEAT


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
    await redis.xadd(keys.SESSIONS, {"sid": sid})
    return created


async def heartbeat(redis: aioredis.Redis, sid: str) -> None:
    await redis.register_script(HEARTBEAT)(keys=[keys.meta(sid)])
