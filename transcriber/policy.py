"""The worker's decisions around the streaming core, as plain values in and out. No I/O.

* ``LoadPolicy``: under load, partials and speculative finals are shed and finals go
  short-context, so finals stay on time (partials degrade before finals do).
* ``FinalizePacer``: a client's ``finalize`` is applied at most once per interval.
* ``ParkTimer``: when a silent session gives its capacity slot back, and when it wants one.
* ``SharePolicy``: how many slots one API key (principal) may hold while others wait.

The worker and the session pump (``worker.py``, ``session.py``) only carry these out.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping, Sequence
from typing import TypeVar

from common.session_meta import SessionMeta

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class FeedPlan:
    """How to feed one batch of audio to the core."""

    queued: int  # other sessions' decodes waiting for a lane
    shed: bool  # partials skipped for load (counted in stt_worker_partials_skipped)
    partials: bool  # a partial may be decoded
    speculate: bool  # a final may be decoded ahead at a short pause
    short_finals: bool  # finals use the partials' short context too


@dataclasses.dataclass(frozen=True)
class LoadPolicy:
    """Load shedding, from how many decodes wait at the gate (``busy``: waiting or running)."""

    lanes: int  # decodes that run at once (batch rows or CPU lanes)
    partial_max_queue: int  # PARTIAL_MAX_QUEUE
    partial_max_age_s: float  # PARTIAL_MAX_AGE_S
    speculate_max_queue: int  # SPECULATE_MAX_QUEUE
    short_finals_queue: int  # SHORT_FINALS_QUEUE (0: never)

    def queued(self, busy: int) -> int:
        """Other sessions' decodes that wait: only the calls beyond the lanes do."""
        return max(0, busy - (self.lanes - 1))

    def short_finals(self, busy: int) -> bool:
        """Whether finals go short-context (while others wait, a loaded worker keeps up)."""
        n = self.short_finals_queue
        return n > 0 and self.queued(busy) >= n

    def feed(self, busy: int, age_s: float, partial_running: bool) -> FeedPlan:
        """``age_s``: how long ago the newest audio reached Redis; ``partial_running``: a
        detached partial decode is still out (one at a time)."""
        queued = self.queued(busy)
        shed = queued >= self.partial_max_queue or age_s >= self.partial_max_age_s
        return FeedPlan(queued=queued, shed=shed, partials=not shed and not partial_running,
                        speculate=queued < self.speculate_max_queue,
                        short_finals=self.short_finals(busy))


class FinalizePacer:
    """A client's ``finalize`` (end the open utterance now) at most once per ``interval_s``:
    one asked for sooner is applied when that has passed, so a client sending it every few
    hundred milliseconds cannot turn its session into a stream of final decodes."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._due = False
        self._applied_at = -float("inf")

    def ask(self) -> None:
        self._due = True

    def take(self, now: float) -> bool:
        """Whether to apply a finalize now (then it counts as applied)."""
        if not self._due or now - self._applied_at < self.interval_s:
            return False
        self._due = False
        self._applied_at = now
        return True


class Slot(enum.Enum):
    PARK = "park"  # give the capacity slot back: the session only listens (VAD)
    UNPARK = "unpark"  # take a slot again: it speaks


class ParkTimer:
    """A session with no utterance open for ``after_s`` (no speech, or no audio at all: a
    socket sending only keepalives) parks; one that opens an utterance unparks. 0: never."""

    def __init__(self, after_s: float) -> None:
        self.after_s = after_s
        self._quiet_since: float | None = None

    def step(self, now: float, speaking: bool, parked: bool) -> Slot | None:
        if self.after_s <= 0:
            return None
        if speaking:
            self._quiet_since = None
            return Slot.UNPARK if parked else None
        if self._quiet_since is None:
            self._quiet_since = now
        elif now - self._quiet_since >= self.after_s and not parked:
            return Slot.PARK
        return None


def share_of(meta: SessionMeta) -> str:
    """Whose session it is, for the fair share of slots: its API key (a token's too), else
    its principal, else the client's address (AUTH=off)."""
    if meta.account or meta.principal:
        return meta.account or meta.principal
    return f"ip:{meta.address}" if meta.address else ""


@dataclasses.dataclass(frozen=True)
class SharePolicy:
    """PRINCIPAL_SHARE: while sessions of other shares wait, one share holds at most its
    quota of a worker's CAPACITY slots."""

    capacity: int
    principal_share: float  # 0 (or >= 1): no limit

    @property
    def quota(self) -> int:
        """Slots one share may hold while sessions of a share under its quota wait."""
        share = self.principal_share
        if share <= 0 or share >= 1:
            return self.capacity
        return max(1, int(share * self.capacity))

    @property
    def limited(self) -> bool:
        return self.quota < self.capacity

    def over(self, held: int, margin: int = 0) -> bool:
        """A share holding ``held`` slots is over its quota (``margin`` slots more)."""
        return held > self.quota + margin

    def may_take(self, held: int) -> bool:
        """A waiting session of a share holding ``held`` slots is one to make room for."""
        return not self.over(held, margin=-1)

    def most_over(self, holdings: Mapping[str, Sequence[T]]) -> Sequence[T]:
        """The slots (oldest first) of the share most over its quota; empty when none is."""
        over = [held for held in holdings.values() if self.over(len(held))]
        return max(over, key=len, default=())
