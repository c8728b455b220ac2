"""The one retry policy: delays bounded and growing, a loop waits out an outage, gives up
at its deadline, and a client made for such a loop does not retry by itself."""

from __future__ import annotations

import asyncio

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from common.backoff import Backoff, until_up
from common.redis_client import make_redis
from common.settings import RedisSettings
from tests.procs import until


def test_delays_stay_under_a_doubling_bound_and_the_cap() -> None:
    backoff = Backoff(base=0.1, cap=1.0)
    for failures in range(1, 12):
        delay = backoff.next_delay()
        assert 0.0 <= delay <= min(1.0, 0.1 * 2 ** failures)
    backoff.reset()
    assert backoff.failures == 0
    assert backoff.next_delay() <= 0.2


async def test_until_up_retries_until_redis_answers() -> None:
    calls, seen = 0, []

    async def flaky() -> str:
        nonlocal calls
        calls += 1
        if calls < 4:
            raise RedisConnectionError("down")
        return "ok"

    result = await until_up(flaky, "test call", on_error=seen.append,
                            backoff=Backoff(base=0.001, cap=0.002))
    assert result == "ok" and calls == 4 and len(seen) == 3


async def test_until_up_gives_up_at_its_deadline() -> None:
    async def down() -> None:
        raise RedisConnectionError("down")

    with pytest.raises(RedisConnectionError):
        await until_up(down, "test call", deadline_s=0.05,
                       backoff=Backoff(base=0.001, cap=0.005))


async def test_a_loop_client_reconnects_once_and_a_command_client_retries() -> None:
    settings = RedisSettings(redis_url="redis://127.0.0.1:1/0", redis_retries=5)
    loop_client = make_redis(settings, retries=False)
    command_client = make_redis(settings)
    try:
        assert loop_client.get_retry()._retries == 1  # type: ignore[union-attr]
        assert command_client.get_retry()._retries == 5  # type: ignore[union-attr]
    finally:
        await loop_client.aclose()
        await command_client.aclose()


def test_a_cancellation_the_redis_client_turns_into_a_timeout_still_stops_the_retry_loop(
        ) -> None:
    """redis-py can answer a cancel with a timeout error (its #2028, #2551); a retry
    loop that took that for an outage kept a session running through SIGTERM."""
    calls = 0

    async def blocking_read() -> None:
        nonlocal calls
        calls += 1
        if calls > 1:
            raise RuntimeError("retried after the cancel")
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            raise RedisTimeoutError("Timeout reading from socket") from None

    async def scenario() -> bool:
        task = asyncio.create_task(until_up(blocking_read, "read"))
        await until("the read started", lambda: calls == 1)
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=2.0)
        return task in done and task.cancelled()

    assert asyncio.run(scenario())
    assert calls == 1
