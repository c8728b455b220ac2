"""The decode gate: at most ``lanes`` Whisper decodes at once across a worker's sessions,
handed out by urgency and, within one urgency, by fair share.

A free lane goes to the finals somebody waits for, then to speculative finals, then to
partials. Among decodes of one kind it goes to the one whose *share* (the session's API
key or principal; the session itself when it has none) has used the least decode time
lately (decayed with a half-life of ``half_life_s``), so a client that asks for many
finals (``finalize`` spam, several sessions at once) waits behind its own decodes rather
than in front of everyone else's. First come first served among equals.

Only decodes wait here: a session's VAD and decisions run on its own thread, so the audio
that ends an utterance is heard while other sessions decode.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections.abc import Iterator

#: Shares whose decayed use fell below this are forgotten (bounds the table).
FORGET_BELOW_S = 1e-3
MAX_SHARES = 4096


class DecodeGate:
    FINAL, SPECULATIVE, PARTIAL = 0, 1, 2

    def __init__(self, lanes: int, half_life_s: float = 10.0) -> None:
        self._lock = threading.Lock()
        self._free = lanes
        self.half_life_s = half_life_s
        # per rank: (arrival number, share, event) of each waiting decode
        self._waiting: tuple[list[tuple[int, str, threading.Event]], ...] = ([], [], [])
        self._arrivals = itertools.count()
        self._used: dict[str, tuple[float, float]] = {}  # share → (decode seconds, as of)
        self.active = 0  # decodes waiting or running

    @contextlib.contextmanager
    def lane(self, rank: int = FINAL, share: str = "") -> Iterator[None]:
        with self._lock:
            self.active += 1
            if self._free and not any(self._waiting):
                self._free -= 1
                turn = None
            else:
                turn = threading.Event()
                self._waiting[rank].append((next(self._arrivals), share, turn))
        began = time.monotonic()
        try:
            if turn is not None:
                turn.wait()
                began = time.monotonic()
            yield
        finally:
            with self._lock:
                self.active -= 1
                now = time.monotonic()
                self._charge(share, now - began, now)
                nxt = self._next(now)
                if nxt is not None:  # hand the lane straight to the next decode
                    nxt.set()
                else:
                    self._free += 1

    def used(self, share: str, now: float | None = None) -> float:
        """Decode seconds ``share`` used lately (decayed)."""
        seconds, at = self._used.get(share, (0.0, 0.0))
        now = time.monotonic() if now is None else now
        return seconds * 0.5 ** ((now - at) / self.half_life_s)

    def _charge(self, share: str, seconds: float, now: float) -> None:
        self._used[share] = (self.used(share, now) + seconds, now)
        if len(self._used) > MAX_SHARES:
            for key in [k for k in self._used if self.used(k, now) < FORGET_BELOW_S]:
                del self._used[key]

    def _next(self, now: float) -> threading.Event | None:
        queue = next((q for q in self._waiting if q), None)
        if queue is None:
            return None
        best = min(range(len(queue)), key=lambda i: (self.used(queue[i][1], now), queue[i][0]))
        return queue.pop(best)[2]
