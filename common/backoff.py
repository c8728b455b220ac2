"""Waiting out a Redis outage: the one retry policy for every loop that retries.

A failed Redis command is retried in exactly one place:

* a client from ``make_redis(settings)`` retries each command itself (redis-py's ``Retry``
  with this module's policy, ``REDIS_RETRIES`` times): for one-off commands (opening a
  session, an HTTP request), which then fail with ``StorageUnavailable``;
* a loop that must outlast an outage (following a stream, appending audio, the worker's
  fenced writes) uses a client from ``make_redis(settings, retries=False)``, which only
  reconnects a stale pooled connection once, and waits between its own attempts with
  ``Backoff``.

The delays are redis-py's ``ExponentialWithJitterBackoff``: doubling from ``base`` up to
``cap``, each drawn uniformly below that bound so that many clients that lost Redis at
the same moment do not come back in step.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from redis.backoff import AbstractBackoff, ExponentialWithJitterBackoff
from redis.exceptions import (
    ClusterDownError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisError,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Errors that mean "Redis is unreachable right now" rather than a bad command: what a
#: retry waits out.
#: Redis refusing writes for lack of memory (``maxmemory`` reached with ``noeviction``) is
#: waited out the same way, and answered to clients as ``storage_full``.
REDIS_FULL = (OutOfMemoryError,)


class NotReplicated(RedisError):
    """A write that fewer replicas than ``REDIS_REPLICA_ACKS`` acknowledged in time (Redis
    ``WAIT``): not yet safe from a failover, so it is sent again (common/replication.py)."""


#: A cluster (or a primary/replica pair) in the middle of a failover answers these until a
#: replica has taken over, and a write its replicas have not acknowledged waits for them:
#: waited out too.
REDIS_FAILING_OVER = (ClusterDownError, TryAgainError, SlotNotCoveredError, ReadOnlyError,
                      NotReplicated)
REDIS_DOWN = (RedisConnectionError, RedisTimeoutError, ConnectionError, OSError, *REDIS_FULL,
              *REDIS_FAILING_OVER)

#: First delay bound and largest delay bound, seconds, of a loop waiting out an outage.
BASE_S = 0.1
CAP_S = 2.0


def policy(base: float = BASE_S, cap: float = CAP_S) -> AbstractBackoff:
    """The delay policy, for redis-py's ``Retry`` and for ``Backoff``."""
    return ExponentialWithJitterBackoff(cap=cap, base=base)


def reraise_cancel() -> None:
    """Re-raise a cancellation that the Redis client turned into a connection error.

    A task cancelled while redis-py waits on a socket may see a timeout or
    connection error instead of ``CancelledError`` (redis-py #2028, #2551); a
    retry loop would then keep running through a shutdown.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


class Backoff:
    """Delays between a loop's attempts: ``await wait()`` after a failure, ``reset()``
    after a success."""

    def __init__(self, base: float = BASE_S, cap: float = CAP_S) -> None:
        self._policy = policy(base, cap)
        self.failures = 0

    def next_delay(self) -> float:
        self.failures += 1
        return float(self._policy.compute(self.failures))

    async def wait(self) -> None:
        await asyncio.sleep(self.next_delay())

    def reset(self) -> None:
        self.failures = 0


async def until_up(call: Callable[[], Awaitable[T]], what: str, *,
                   deadline_s: float | None = None,
                   on_error: Callable[[BaseException], None] | None = None,
                   backoff: Backoff | None = None) -> T:
    """``await call()`` until Redis answers it; with ``deadline_s``, re-raise the outage
    once that long has passed. ``on_error`` sees each failure (metrics); each is logged
    as a warning naming ``what``."""
    loop = asyncio.get_running_loop()
    give_up = None if deadline_s is None else loop.time() + deadline_s
    backoff = backoff or Backoff()
    while True:
        try:
            return await call()
        except REDIS_DOWN as exc:
            reraise_cancel()
            if on_error is not None:
                on_error(exc)
            if give_up is not None and loop.time() >= give_up:
                raise
            log.warning("%s failed (%s); retrying", what, exc)
            await backoff.wait()
