"""Per-session limits on a /v1/listen socket: audio speed, session length, idle time.

Plain classes fed with times, so they are tested without sockets.
"""

from __future__ import annotations

from common.errors import IdleTimeout, SessionTooLong, SttError, TooFast


class AudioRate:
    """A token bucket in audio seconds: up to ``burst_s`` ahead of real time, refilled at
    ``speed`` times real time. Audio beyond it is refused with ``too_fast``."""

    def __init__(self, speed: float, burst_s: float, now: float) -> None:
        self.speed = speed
        self.burst_s = burst_s
        self.tokens = burst_s
        self.at = now

    def take(self, seconds: float, now: float) -> None:
        if self.speed <= 0:
            return
        self.tokens = min(self.burst_s, self.tokens + (now - self.at) * self.speed)
        self.at = now
        if seconds > self.tokens:
            raise TooFast(f"audio is arriving faster than {self.speed:g}x real time; "
                          "send it as it is recorded")
        self.tokens -= seconds


class SessionClock:
    """When the receive loop must give up waiting: the session's deadline, or the idle
    timeout after the client's last message, whichever comes first."""

    def __init__(self, deadline: float, idle_s: float, now: float) -> None:
        self.deadline = deadline
        self.idle_s = idle_s
        self.last = now

    def touch(self, now: float) -> None:
        self.last = now

    def wake_at(self) -> float:
        return min(self.deadline, self.last + self.idle_s)

    def expired(self, now: float) -> SttError:
        if now >= self.deadline:
            return SessionTooLong("the session reached its maximum duration")
        return IdleTimeout(f"nothing received for {self.idle_s:g} s")
