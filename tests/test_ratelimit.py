"""Token buckets, the bounded bucket map, per-socket message limits, and the request rate
checks AccessGuard makes before authenticating (no sockets, no Redis traffic).

tests/test_security.py drives the same limits through a real gateway.
"""

from __future__ import annotations

import json
import tracemalloc

import pytest
import redis.asyncio as aioredis
from websockets.datastructures import Headers
from websockets.http11 import Request

from common.access import AccessGuard
from common.auth import hash_key, new_key
from common.errors import MessageTooBig, RateLimited, TooManyMessages, Unauthorized
from common.ratelimit import BucketMap, MessageLimits, TokenBucket, text_size
from common.settings import AccessSettings, FanoutSettings, GatewaySettings
from common.web import error_response


def test_bucket_allows_the_burst_then_the_rate() -> None:
    b = TokenBucket(rate=2.0, burst=3, now=0.0)
    assert [b.take(0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert b.take(0.0) == pytest.approx(0.5)  # one token comes back every 0.5 s
    assert b.take(0.25) == pytest.approx(0.25)  # a refused request takes nothing
    assert b.take(0.5) == 0.0
    assert b.take(0.5) == pytest.approx(0.5)
    assert b.take(100.0) == 0.0
    assert b.tokens == pytest.approx(2.0)  # refilled to the burst, not beyond


def test_bucket_without_a_rate_never_refuses_and_tolerates_clock_steps() -> None:
    free = TokenBucket(rate=0.0, burst=1, now=0.0)
    assert all(free.take(0.0) == 0.0 for _ in range(10_000))
    b = TokenBucket(rate=1.0, burst=1, now=10.0)
    assert b.take(10.0) == 0.0
    assert b.take(5.0) == pytest.approx(1.0)  # an earlier time refills nothing
    assert b.take(11.0) == 0.0


def test_bucket_wait_does_not_take() -> None:
    b = TokenBucket(rate=1.0, burst=1, now=0.0)
    assert b.wait(0.0) == 0.0 and b.wait(0.0) == 0.0
    assert b.take(0.0) == 0.0
    assert b.wait(0.0) == pytest.approx(1.0)


def test_bucket_map_keeps_one_bucket_per_key() -> None:
    m = BucketMap(rate=1.0, burst=2, max_keys=100)
    assert [m.take("a", 0.0) for _ in range(3)][-1] == pytest.approx(1.0)
    assert m.take("b", 0.0) == 0.0  # another key is not affected
    assert m.wait("a", 0.0) == pytest.approx(1.0)
    assert m.wait("unknown", 0.0) == 0.0 and len(m) == 2  # wait() creates nothing


def test_bucket_map_is_bounded_and_forgets_the_least_recently_used() -> None:
    m = BucketMap(rate=1.0, burst=1, max_keys=3)
    for key in "abc":
        m.take(key, 0.0)
    m.take("a", 0.1)  # refused, but "a" is now the most recently used
    m.take("d", 0.2)  # evicts "b", the one idle longest
    assert len(m) == 3
    assert m.wait("b", 0.2) == 0.0  # forgotten: a fresh bucket next time
    assert m.wait("a", 0.2) > 0 and m.wait("c", 0.2) > 0
    for i in range(10_000):
        m.take(f"k{i}", 1.0)
    assert len(m) == 3


def test_bucket_map_memory_per_key_is_what_the_settings_say() -> None:
    n = 20_000
    m = BucketMap(rate=5.0, burst=30, max_keys=n)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(n):  # IPv6 /64s: the longest names the address buckets have
            m.take(f"2001:db8:{i:x}::/64", i * 1e-3)
        per_key = (tracemalloc.get_traced_memory()[0] - before) / n
    finally:
        tracemalloc.stop()
    assert per_key < 300, per_key  # docs and settings say "about 250 bytes"


def test_bucket_map_without_a_rate_tracks_nothing() -> None:
    m = BucketMap(rate=0.0, burst=10, max_keys=10)
    assert all(m.take(f"k{i}", 0.0) == 0.0 for i in range(100))
    assert len(m) == 0


def test_text_size_counts_utf8_bytes() -> None:
    assert text_size(b"\0" * 7) == 7
    assert text_size("abc") == 3
    assert text_size("é" * 10) == 20
    assert text_size("🎤") == 4


def test_message_limits_refuse_large_messages_then_floods() -> None:
    limits = MessageLimits(max_bytes=10, per_s=10.0, burst=5, now=0.0)
    limits.check(b"x" * 10, 0.0)
    with pytest.raises(MessageTooBig):
        limits.check(b"x" * 11, 0.0)
    with pytest.raises(MessageTooBig):
        limits.check("é" * 6, 0.0)  # 6 characters, 12 bytes
    for _ in range(4):  # the burst (5) minus the first accepted message
        limits.check(b"x", 0.0)
    with pytest.raises(TooManyMessages) as exc:
        limits.check(b"x", 0.0)
    assert exc.value.code == "too_many_messages" and exc.value.close_code == 1008
    limits.check(b"x", 0.1)  # 10 per second: one more after 0.1 s


def test_transport_bound_is_a_multiple_of_the_message_limit_and_never_below_it() -> None:
    assert GatewaySettings().ws_max_size == 2 * GatewaySettings().max_message_bytes
    assert FanoutSettings().ws_max_size == 2 * 65536
    assert GatewaySettings(transport_max_bytes=5 << 20).ws_max_size == 5 << 20
    assert GatewaySettings(max_message_bytes=1000, transport_max_bytes=10).ws_max_size == 1000


# --------------------------------------------------------------------------- AccessGuard

KEY, OTHER = new_key(), new_key()


class Conn:
    def __init__(self, ip: str) -> None:
        self.remote_address = (ip, 40000)


def guard(**limits: float) -> AccessGuard:
    settings = AccessSettings(auth="required",
                              api_keys=f"app={hash_key(KEY)},other={hash_key(OTHER)}",
                              **limits)  # type: ignore[arg-type]
    return AccessGuard(settings, aioredis.Redis())  # never connects: no caps, no tokens


async def admit(g: AccessGuard, ip: str, key: str | None = KEY) -> str:
    headers = Headers([("Authorization", f"Bearer {key}")] if key else [])
    try:
        await g.admit(Conn(ip), Request("/v1/sessions", headers), opens_session=False)
    except (RateLimited, Unauthorized) as exc:
        return exc.code
    return "ok"


async def test_requests_from_one_address_are_limited_and_others_are_not() -> None:
    g = guard(rate_limit_ip_per_s=1.0, rate_limit_ip_burst=3, rate_limit_key_per_s=0)
    assert [await admit(g, "10.0.0.1") for _ in range(4)] == ["ok"] * 3 + ["rate_limited"]
    assert await admit(g, "10.0.0.2") == "ok"


async def test_ipv6_clients_share_a_bucket_per_64() -> None:
    g = guard(rate_limit_ip_per_s=1.0, rate_limit_ip_burst=2, rate_limit_key_per_s=0)
    assert await admit(g, "2001:db8::1") == "ok"
    assert await admit(g, "2001:db8::ffff:2") == "ok"
    assert await admit(g, "2001:db8::3") == "rate_limited"
    assert await admit(g, "2001:db8:0:1::1") == "ok"


async def test_requests_for_one_api_key_are_limited_across_addresses() -> None:
    g = guard(rate_limit_key_per_s=1.0, rate_limit_key_burst=3)
    got = [await admit(g, f"10.0.1.{i}") for i in range(4)]
    assert got == ["ok"] * 3 + ["rate_limited"]
    assert await admit(g, "10.0.1.9", OTHER) == "ok"


async def test_failed_authentications_lock_the_address_out() -> None:
    g = guard(auth_failures_per_min=6.0, auth_failure_burst=3)
    wrong = new_key()
    got = [await admit(g, "10.0.2.1", wrong) for _ in range(4)]
    assert got == ["unauthorized"] * 3 + ["rate_limited"]
    assert await admit(g, "10.0.2.1") == "rate_limited"  # even with the right key now
    assert await admit(g, "10.0.2.2") == "ok"


async def test_rate_limited_response_has_retry_after_and_the_json_error() -> None:
    g = guard(rate_limit_ip_per_s=0.1, rate_limit_ip_burst=1)
    await admit(g, "10.0.3.1")
    with pytest.raises(RateLimited) as exc:
        await g.admit(Conn("10.0.3.1"), Request("/v1/listen", Headers()), opens_session=True)
    response = error_response(exc.value)
    assert response.status_code == 429
    assert 9 <= int(response.headers["Retry-After"]) <= 10
    body = json.loads(response.body)
    assert body["type"] == "error" and body["code"] == "rate_limited" and body["message"]
