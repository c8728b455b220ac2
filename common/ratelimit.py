"""Token buckets for request and message rates: plain classes fed with times, no I/O.

``BucketMap`` keeps one bucket per client address or API key in a bounded map, so a flood
of distinct addresses costs bounded memory; ``MessageLimits`` checks each message a client
sends on a WebSocket (size, then rate). docs/security.md lists the settings.
"""

from __future__ import annotations

import collections

from common.errors import MessageTooBig, TooManyMessages


class TokenBucket:
    """``burst`` tokens, refilled at ``rate`` per second; ``rate <= 0`` means no limit."""

    __slots__ = ("at", "burst", "rate", "tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = max(1.0, burst)
        self.tokens = self.burst
        self.at = now

    def _refill(self, now: float) -> None:
        if now > self.at:
            self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = max(self.at, now)

    def wait(self, now: float, cost: float = 1.0) -> float:
        """Seconds until ``cost`` tokens are there (0.0: now); takes nothing."""
        if self.rate <= 0:
            return 0.0
        self._refill(now)
        return 0.0 if self.tokens >= cost else (cost - self.tokens) / self.rate

    def take(self, now: float, cost: float = 1.0) -> float:
        """Take ``cost`` tokens and return 0.0, or take nothing and return the seconds
        until they will be there."""
        wait = self.wait(now, cost)
        if wait == 0.0 and self.rate > 0:
            self.tokens -= cost
        return wait


class BucketMap:
    """One ``TokenBucket`` per key, at most ``max_keys`` of them.

    When the map is full, the bucket used least recently is forgotten. That one has most
    likely refilled (a full bucket is the same as no bucket), so under normal load nothing
    is lost; only more than ``max_keys`` distinct clients within one refill time
    (``burst / rate``) can have a bucket forgotten early, which errs on the side of letting
    a request through. Memory stays at about 250 bytes per key (its name included).
    """

    def __init__(self, rate: float, burst: float, max_keys: int) -> None:
        self.rate = rate
        self.burst = burst
        self.max_keys = max(1, max_keys)
        self._buckets: collections.OrderedDict[str, TokenBucket] = collections.OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def __len__(self) -> int:
        return len(self._buckets)

    def _bucket(self, key: str, now: float) -> TokenBucket:
        bucket = self._buckets.get(key)
        if bucket is None:
            while len(self._buckets) >= self.max_keys:
                self._buckets.popitem(last=False)
            bucket = self._buckets[key] = TokenBucket(self.rate, self.burst, now)
        else:
            self._buckets.move_to_end(key)
        return bucket

    def take(self, key: str, now: float) -> float:
        """0.0 when the request may go ahead (one token taken), else seconds to wait."""
        if not self.enabled:
            return 0.0
        return self._bucket(key, now).take(now)

    def wait(self, key: str, now: float) -> float:
        """Seconds until ``key`` has a token, without taking one (0.0 for unknown keys)."""
        if not self.enabled:
            return 0.0
        bucket = self._buckets.get(key)
        return 0.0 if bucket is None else bucket.wait(now)


def text_size(message: str | bytes) -> int:
    """A message's size on the wire: bytes, or the UTF-8 length of text (encoded only when
    the character count leaves it in doubt)."""
    if isinstance(message, bytes):
        return len(message)
    return len(message) if message.isascii() else len(message.encode("utf-8"))


class MessageLimits:
    """What one WebSocket client may send: messages up to ``max_bytes`` (the WebSocket layer
    enforces a larger hard bound), at most ``per_s`` messages per second after a burst of
    ``burst``."""

    def __init__(self, max_bytes: int, per_s: float, burst: float, now: float) -> None:
        self.max_bytes = max_bytes
        self.rate = TokenBucket(per_s, burst, now)

    def check(self, message: str | bytes, now: float) -> None:
        """MessageTooBig or TooManyMessages for a message that must end the connection."""
        if self.max_bytes > 0 and text_size(message) > self.max_bytes:
            raise MessageTooBig(f"messages may be at most {self.max_bytes} bytes")
        if self.rate.take(now):
            raise TooManyMessages(f"more than {self.rate.rate:g} messages per second; send "
                                  "audio in larger messages (e.g. 100 ms each)")
