"""Endpointing: speech start and end from per-window VAD probabilities."""

from __future__ import annotations

import numpy as np

from common.session_meta import ENDPOINTING_DEFAULT, ENDPOINTING_OFF, SessionMeta
from common.settings import TranscriberSettings, load
from tests.test_streaming_core import BurstDecoder, fake_vad, silence, utterance
from transcriber.config import stream_config
from transcriber.endpointing import WINDOW, EndpointConfig, Endpointer
from transcriber.session import session_core
from transcriber.streaming import RATE, Committed

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


# ---------------------------------------------------------------- a session's endpointing=


def _settings() -> TranscriberSettings:
    return load(TranscriberSettings, [], environ={})


def _finals(endpointing: int, pause_s: float) -> list[str]:
    """Two two-word utterances ``pause_s`` apart through a session's core, as the worker
    builds it from the session's record."""
    core = session_core("s", SessionMeta(endpointing=endpointing), BurstDecoder(),  # type: ignore[arg-type]
                        fake_vad, _settings())
    audio = np.concatenate([utterance([10, 11]), silence(pause_s), utterance([12, 13]),
                            silence(2.0)])
    events = [e for i in range(0, len(audio), 1600) for e in core.feed(audio[i:i + 1600])]
    return [e.final.text for e in events + core.finish() if isinstance(e, Committed)]


def test_a_session_s_endpointing_replaces_min_silence_and_the_sentence_end() -> None:
    s = _settings()
    default = stream_config(s, True, ENDPOINTING_DEFAULT)
    assert default.endpoint.min_silence_samples == int(s.min_silence_s * RATE)
    assert default.short_silence_samples == int(s.short_silence_s * RATE) > 0
    chosen = stream_config(s, True, 1200)
    assert chosen.endpoint.min_silence_samples == int(1.2 * RATE)
    assert chosen.short_silence_samples == 0  # the client's silence, not a sentence end
    off = stream_config(s, True, ENDPOINTING_OFF)
    assert off.endpoint.min_silence_samples >= off.max_utterance_samples
    assert off.short_silence_samples == 0


def test_the_session_s_silence_decides_where_its_utterances_end() -> None:
    # MIN_SILENCE_S is 0.5 s
    assert _finals(ENDPOINTING_DEFAULT, 0.4) == ["w10 w11 w12 w13"]
    assert _finals(ENDPOINTING_DEFAULT, 0.8) == ["w10 w11", "w12 w13"]
    assert _finals(300, 0.4) == ["w10 w11", "w12 w13"]
    assert _finals(1000, 0.8) == ["w10 w11 w12 w13"]
    assert _finals(ENDPOINTING_OFF, 1.5) == ["w10 w11 w12 w13"]
