"""LocalAgreement-2: the prefix two consecutive hypotheses agree on becomes stable."""

from __future__ import annotations

import re
from collections.abc import Sequence

_STRIP = re.compile(r"[^\w']+")


def norm_word(word: str) -> str:
    """Comparison key: case and punctuation do not make two words differ."""
    return _STRIP.sub("", word.lower())


def common_prefix(a: Sequence[str], b: Sequence[str]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if norm_word(x) != norm_word(y):
            break
        n += 1
    return n


class LocalAgreement:
    """Tracks how many leading words of the utterance are stable.

    The stable count only grows: once two consecutive hypotheses agree on a
    prefix, it is promised to the client and kept in the final.
    """

    def __init__(self) -> None:
        self.stable = 0
        self._previous: list[str] = []

    def update(self, hypothesis: Sequence[str], limit: int | None = None) -> int:
        """Feed the next hypothesis; at most ``limit`` leading words may become stable."""
        agreed = common_prefix(self._previous, hypothesis)
        if limit is not None:
            agreed = min(agreed, limit)
        if agreed > self.stable:
            self.stable = agreed
        self._previous = list(hypothesis)
        return self.stable

    def reset(self) -> None:
        self.stable = 0
        self._previous = []
