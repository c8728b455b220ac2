"""Follow one session's results stream from a position until its ``closed`` message."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import redis.asyncio as aioredis

from common import keys
from common.messages import Closed, Result, unpack_result
from common.redis_client import REDIS_DOWN

log = logging.getLogger(__name__)


async def follow_results(
    redis: aioredis.Redis, sid: str, after: str = "0-0", block_ms: int = 1000,
    batch: int = 100,
) -> AsyncIterator[tuple[str, Result]]:
    """Yield (entry id, result) in order, then stop after ``closed``.

    ``redis`` must be a client whose socket timeout exceeds ``block_ms``.
    Redis outages are waited out with backoff; nothing is skipped.
    """
    key = keys.results(sid)
    cursor = after
    backoff = 0.1
    while True:
        try:
            resp = await redis.xread({key: cursor}, count=batch, block=block_ms)
            backoff = 0.1
        except REDIS_DOWN as exc:
            log.warning("session %s: results read failed: %s", sid, exc)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)
            continue
        for _stream, entries in resp or ():
            for entry_id, fields in entries:
                cursor = entry_id.decode()
                result = unpack_result(fields)
                yield cursor, result
                if isinstance(result, Closed):
                    return
