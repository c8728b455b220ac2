"""LocalAgreement-2: the prefix two consecutive hypotheses agree on becomes stable."""

from __future__ import annotations

import difflib
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


#: A final that leaves out this many consecutive words a partial of the same utterance had
#: shown, with words of the partial after them, skipped a phrase (see ``drops_words``).
DROPPED_RUN = 2


def drops_words(shown: Sequence[str], final: Sequence[str], run: int = DROPPED_RUN) -> bool:
    """Whether ``final`` leaves out ``run`` or more consecutive words of ``shown`` (a partial
    of the start of the same audio) that are followed by more of the partial's words.

    The final reads more audio than the partial, so it should hold the partial's words,
    revised here and there. A short-context final once read "ask what do for your country"
    where the partial had shown "ask what you can do for your": Whisper skipped a phrase.
    Words at the partial's end were heard cut off and may vanish; substitutions and single
    words are ordinary revisions.
    """
    a = [norm_word(w) for w in shown]
    b = [norm_word(w) for w in final]
    ops = difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes()
    for tag, i1, i2, j1, j2 in ops:
        lost = (i2 - i1) - (j2 - j1) if tag in ("delete", "replace") else 0
        if lost >= run and i2 < len(a):
            return True
    return False
