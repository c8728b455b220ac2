"""The sessions one worker runs: one ``Lease`` record each, in one table (``Leases``).

The lease itself is the work-queue entry pending with this worker (``common/work_queue.py``);
its epoch fences the session's writes (``commit.py``).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterator

from transcriber.commit import SessionWriter


@dataclasses.dataclass(eq=False)
class Lease:
    """One session this worker runs: everything the worker keeps about it.

    Compared by identity: a finished task clears only its own record, never a newer one's.
    """

    sid: str
    entry_id: bytes  # the work-queue entry that holds the lease
    task: asyncio.Task[None] | None = None
    writer: SessionWriter | None = None  # fenced by the epoch acquired; None until then
    share: str = ""  # whose session (API key or principal) for the fair share of slots
    parked: bool = False  # gave its capacity slot back while its client is silent
    preempted: bool = False  # stopped to free a slot for another share: hand it back
    handover: bool = False  # stopped by the shutdown: hand it back


class Leases:
    """The sessions this worker runs, by session id: the one table of them."""

    def __init__(self) -> None:
        self._by_sid: dict[str, Lease] = {}

    def __iter__(self) -> Iterator[Lease]:
        return iter(list(self._by_sid.values()))

    def __len__(self) -> int:
        return len(self._by_sid)

    def get(self, sid: str) -> Lease | None:
        return self._by_sid.get(sid)

    def add(self, lease: Lease) -> None:
        self._by_sid[lease.sid] = lease

    def discard(self, lease: Lease) -> None:
        """Forget ``lease`` (not a newer lease on the same session)."""
        if self._by_sid.get(lease.sid) is lease:
            del self._by_sid[lease.sid]

    def entry_ids(self) -> set[bytes]:
        return {lease.entry_id for lease in self._by_sid.values()}

    def holdings(self) -> dict[str, list[Lease]]:
        """Per share, its sessions that hold a slot here (running, not parked), oldest first."""
        out: dict[str, list[Lease]] = {}
        for lease in self._by_sid.values():
            if not lease.parked and lease.writer is not None:
                out.setdefault(lease.share, []).append(lease)
        return out

    def held(self, share: str) -> int:
        return len(self.holdings().get(share, ()))
