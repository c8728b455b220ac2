"""Endpointing: speech start and end from per-window VAD probabilities."""

from __future__ import annotations

from transcriber.endpointing import WINDOW, EndpointConfig, Endpointer

CFG = EndpointConfig(threshold=0.5, neg_threshold=0.35, min_silence_samples=10 * WINDOW)


def test_speech_starts_at_first_confident_window_and_ends_after_min_silence() -> None:
    ep = Endpointer(CFG)
    probs = [0.1] * 5 + [0.9] * 20 + [0.1] * 9
    events = ep.feed(probs)
    assert [(e.kind, e.sample) for e in events] == [("start", 5 * WINDOW)]
    events = ep.feed([0.1])  # the tenth silent window confirms the end
    assert [(e.kind, e.sample) for e in events] == [("end", 25 * WINDOW)]
    assert not ep.in_speech


def test_middling_probabilities_do_not_reset_silence() -> None:
    ep = Endpointer(CFG)
    ep.feed([0.9] * 5)
    # 0.4 is between the thresholds: it does not reset the silence that began before it.
    events = ep.feed([0.1] * 5 + [0.4] * 3 + [0.1] * 1)
    assert events == []
    events = ep.feed([0.1])
    assert [(e.kind, e.sample) for e in events] == [("end", 5 * WINDOW)]


def test_confident_speech_resets_the_silence_run() -> None:
    ep = Endpointer(CFG)
    events = ep.feed([0.9] * 5 + [0.1] * 9 + [0.9] + [0.1] * 9)
    assert [e.kind for e in events] == ["start"]


def test_two_utterances_in_one_batch() -> None:
    ep = Endpointer(CFG, origin=1000)
    events = ep.feed([0.9] * 3 + [0.1] * 10 + [0.8] * 3 + [0.1] * 10)
    assert [(e.kind, e.sample) for e in events] == [
        ("start", 1000), ("end", 1000 + 3 * WINDOW),
        ("start", 1000 + 13 * WINDOW), ("end", 1000 + 16 * WINDOW)]
