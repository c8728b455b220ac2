"""Token buckets, the bounded bucket map and per-socket message limits (common/ratelimit.py).

tests/test_security.py drives the same limits through a real gateway; the request rate
checks AccessGuard makes with them: tests/test_access.py.
"""

from __future__ import annotations

import tracemalloc

import pytest

from common.errors import MessageTooBig, TooManyMessages
from common.ratelimit import BucketMap, MessageLimits, TokenBucket, text_size


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


