"""The benchmark's inputs: conversations of real clips, and each stream's in a capacity run."""

from __future__ import annotations

import collections

import numpy as np
import pytest

from bench.sessions import CLIPS, conversation, mix
from tests.audio_refs import normalize


def test_a_conversation_places_each_clip_after_the_pauses_it_names() -> None:
    conv = conversation(CLIPS[:3], pause_s=1.5, lead_s=0.5, tail_s=2.0)
    (_, s0, e0), (_, s1, e1), (_, s2, e2) = conv.clip_spans
    assert s0 == pytest.approx(0.5) and s1 == pytest.approx(e0 + 1.5)
    assert s2 == pytest.approx(e1 + 1.5)
    assert len(conv.pcm) / 16000 == pytest.approx(e2 + 1.5 + 2.0, abs=1e-3)
    assert not np.any(conv.pcm[:8000])  # the lead is silence


def test_rotated_streams_say_the_same_words_but_start_at_different_clips() -> None:
    conv = conversation(CLIPS[:8])
    convs = mix(conv, 8, "rotated")
    assert [c.clip_spans[0][0] for c in convs] == CLIPS[:8]  # every clip opens one stream
    words = collections.Counter(normalize(conv.reference).split())
    for c in convs:
        assert len(c.pcm) == len(conv.pcm)
        assert collections.Counter(normalize(c.reference).split()) == words
    # fewer streams than clips: starts spread over the conversation
    assert [c.clip_spans[0][0] for c in mix(conv, 4, "rotated")] == CLIPS[0:8:2]


def test_same_mix_gives_every_stream_the_one_conversation() -> None:
    conv = conversation(CLIPS[:2])
    assert all(c is conv for c in mix(conv, 5, "same"))
    with pytest.raises(ValueError, match="unknown mix"):
        mix(conv, 2, "shuffled")


def test_a_words_stable_delay_runs_from_its_end_to_the_first_partial_that_promised_it() -> None:
    from bench.finals import _stable_delays
    from common.messages import Final, Word

    words = (Word(" a", 0.0, 0.5, 0.9), Word(" b", 0.5, 1.0, 0.9), Word(" c", 1.0, 1.5, 0.9))
    final = Final("s", 0, "a b c", 0.0, 1.5, words)
    # partials at 1.0 s (nothing stable), 2.0 s ("a"), 3.0 s ("a b"); the final at 4.0 s
    delays = _stable_delays(final, [(1.0, 0), (2.0, 1), (3.0, 2)], at=4.0)
    assert delays == pytest.approx([1.5, 2.0, 2.5])


@pytest.mark.parametrize(("said", "written"), [
    ("go forward ten meters", "Go forward 10 meters."),
    ("when forty winters", "When 40 winters"),
    ("one two three", "1, 2, 3."),
    ("in nineteen ninety nine fifty percent of one thousand people",
     "In 1999, 50% of 1,000 people"),
    ("the twenty first century", "the 21st century"),
    ("three point five", "3.5"),
    ("its ill disposed", "It's ill-disposed!"),
])
def test_the_wer_normaliser_scores_numbers_written_as_digits_as_the_words_said(
        said: str, written: str) -> None:
    assert normalize(written) == normalize(said) == said
