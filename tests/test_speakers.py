"""Speaker labels (``diarize``): the online clustering and the labelling with arrays and a fake
embedder, the streaming core's finals with speakers, and the real encoder on real voices.

"Speech" is bursts of constant amplitude, one per word (as in test_streaming_core); the
amplitude's tens digit says who speaks (1x: the first voice, 3x: the second, 5x: the third),
and the fake embedder returns each voice's own direction, mixed by how much of the window
each voice fills, with a little noise.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import pytest

from common.messages import Word
from tests.audio_refs import load_pcm16
from tests.test_streaming_core import CFG, BurstDecoder, fake_vad, silence
from transcriber.speakers import (
    SpeakerConfig,
    SpeakerLabeler,
    SpeakerTracker,
    change_points,
    window_spans,
)
from transcriber.streaming import RATE, Committed, StreamingTranscriber

DIM = 16
VOICES = np.linalg.qr(np.random.default_rng(7).normal(size=(DIM, DIM)))[0][:3]


def voice_of(amplitude: float) -> int:
    return {1: 0, 3: 1, 5: 2}[round(amplitude * 100) // 10]


class FakeEmbedder:
    def __init__(self, noise: float = 0.05, seed: int = 1) -> None:
        self.noise = noise
        self.rng = np.random.default_rng(seed)
        self.calls = 0
        self.spans = 0  # windows embedded

    def embed(self, audio: np.ndarray, spans: Sequence[tuple[int, int]]) -> np.ndarray:
        self.calls += 1
        self.spans += len(spans)
        rows = []
        for start, end in spans:
            part = np.abs(audio[start:end])
            loud = part[part > 0.005]
            mix = np.zeros(DIM)
            for amp in np.unique(np.round(loud, 2)):
                mix += (np.round(loud, 2) == amp).sum() * VOICES[voice_of(float(amp))]
            mix = mix / max(np.linalg.norm(mix), 1e-9) + self.rng.normal(0, self.noise, DIM)
            rows.append(mix / np.linalg.norm(mix))
        return np.array(rows, dtype=np.float32)


def noisy(voice: int, rng: np.random.Generator, noise: float = 0.15) -> np.ndarray:
    v = VOICES[voice] + rng.normal(0, noise, DIM)
    return (v / np.linalg.norm(v)).astype(np.float32)


def speech(word_ids: Sequence[int], word_s: float = 0.4, gap_s: float = 0.1
           ) -> tuple[np.ndarray, list[Word]]:
    """Bursts for ``word_ids`` and the words a decoder would find in them."""
    parts, words, t = [], [], 0.0
    for wid in word_ids:
        parts += [np.full(int(word_s * RATE), wid / 100.0, np.float32),
                  np.zeros(int(gap_s * RATE), np.float32)]
        words.append(Word(f" w{wid}", round(t, 3), round(t + word_s, 3), 1.0))
        t += word_s + gap_s
    return np.concatenate(parts), words


# ---------------------------------------------------------------------------- the tracker


def test_the_tracker_keeps_each_voice_on_one_label_in_order_of_appearance() -> None:
    rng = np.random.default_rng(3)
    tracker = SpeakerTracker(threshold=0.7)
    order = [1, 1, 0, 1, 0, 0, 1, 0, 1, 1, 0]
    labels = [tracker.assign(noisy(v, rng), 2.0) for v in order]
    assert labels == [0 if v == 1 else 1 for v in order]  # the first voice heard is 0
    assert tracker.count == 2


def test_the_tracker_stops_at_max_speakers_and_gives_the_most_similar() -> None:
    rng = np.random.default_rng(4)
    tracker = SpeakerTracker(threshold=0.7, max_speakers=2)
    labels = [tracker.assign(noisy(v, rng), 2.0) for v in (0, 1, 2, 0, 1)]
    assert labels[:2] == [0, 1] and set(labels) == {0, 1}
    assert tracker.count == 2


def test_short_speech_joins_the_nearest_speaker_instead_of_opening_one() -> None:
    rng = np.random.default_rng(5)
    tracker = SpeakerTracker(threshold=0.7, min_new_s=1.0)
    assert tracker.assign(noisy(0, rng), 0.5) == 0  # the first speaker, however short
    assert tracker.assign(noisy(1, rng), 0.6) == 0  # too short to be someone new
    assert tracker.assign(noisy(1, rng), 1.5) == 1


def test_the_packed_state_labels_what_follows_as_the_live_one_does() -> None:
    rng = np.random.default_rng(6)
    config = SpeakerConfig(threshold=0.7)
    live = SpeakerTracker.from_config(config)
    for v in (0, 1, 2, 1, 0):
        live.assign(noisy(v, rng), 2.0)
    restored = SpeakerTracker.from_config(config, live.pack())
    assert restored.count == 3
    np.testing.assert_allclose(restored.centroids(), live.centroids(), atol=1e-6)
    later = [noisy(v, rng) for v in (2, 0, 1, 1)]
    assert [restored.assign(e, 2.0) for e in later] == [live.assign(e, 2.0) for e in later] \
        == [2, 0, 1, 1]
    assert SpeakerTracker.from_config(config, SpeakerTracker.from_config(config).pack()).count \
        == 0


def test_window_spans_cover_the_speech_and_end_at_its_end() -> None:
    assert window_spans(1000, 1600, 400) == [(0, 1000)]
    spans = window_spans(3000, 1600, 400)
    assert spans[0] == (0, 1600) and spans[-1] == (1400, 3000)
    assert all(b - a == 1600 for a, b in spans)
    assert all(b[0] - a[0] <= 400 for a, b in itertools.pairwise(spans))


def test_change_points_find_one_change_and_none_in_one_voice() -> None:
    rng = np.random.default_rng(8)
    one = np.array([noisy(0, rng, 0.1) for _ in range(10)])
    assert change_points(one, 2, 0.65) == []
    two = np.array([noisy(0, rng, 0.1) for _ in range(6)] + [noisy(1, rng, 0.1)
                                                              for _ in range(5)])
    assert change_points(two, 2, 0.65) == [6]


# ---------------------------------------------------------------------------- the labeller


def labeler(**kw: float) -> SpeakerLabeler:
    return SpeakerLabeler(FakeEmbedder(), SpeakerConfig(**kw))  # type: ignore[arg-type]


def say(lab: SpeakerLabeler, ids: list[int]) -> int | None:
    audio, words = speech(ids)
    return lab.label(audio, 0.0, words)[1]


def test_utterances_of_two_voices_get_their_speakers_across_the_session() -> None:
    lab = labeler()
    got = []
    for ids in ([11, 12, 13, 14, 15], [31, 32, 33, 34], [16, 17, 18], [35, 36, 37, 38, 39]):
        audio, words = speech(ids)
        labelled, speaker = lab.label(audio, 0.0, words)
        assert {w.speaker for w in labelled} == {speaker}
        got.append(speaker)
    assert got == [0, 1, 0, 1]


def test_a_change_inside_an_utterance_labels_the_words_on_each_side() -> None:
    lab = labeler()
    say(lab, [11, 12, 13, 14, 15])
    audio, words = speech([31, 32, 33, 34, 35, 36, 11, 12, 13, 14])
    labelled, speaker = lab.label(audio, 0.0, words)
    assert [w.speaker for w in labelled] == [1] * 6 + [0] * 4
    assert speaker == 1  # who spoke longest


def test_times_are_read_against_the_audio_origin() -> None:
    """A final's words carry session times; its audio starts at ``origin_s``."""
    lab = labeler()
    audio, words = speech([31, 32, 33, 11, 12, 13, 14, 15])
    shifted = [Word(w.word, w.start + 100.0, w.end + 100.0, 1.0) for w in words]
    labelled, _ = lab.label(audio, 100.0, shifted)
    assert [w.speaker for w in labelled] == [0, 0, 0, 1, 1, 1, 1, 1]


def test_the_provisional_speaker_changes_nothing() -> None:
    lab = labeler()
    say(lab, [11, 12, 13, 14])
    say(lab, [31, 32, 33, 34])
    before = lab.pack()
    assert lab.provisional(speech([35, 36, 37])[0], lab.tracker) == 1
    assert lab.provisional(speech([15, 16])[0], lab.tracker) == 0
    assert lab.provisional(np.zeros(100, np.float32), lab.tracker) is None  # too short
    assert lab.pack() == before


def test_windows_embedded_at_a_pause_are_not_embedded_again() -> None:
    """At each pause the utterance so far is embedded ahead (``prepare``); the final embeds
    only the windows no pause reached, and labels as without them."""
    plain, ahead = labeler(), labeler()
    audio, words = speech([11, 12, 13, 14, 31, 32, 33, 34, 35])
    fake = ahead.embedder
    assert isinstance(fake, FakeEmbedder)
    ahead.prepare(audio, 0.0, words)
    embedded = fake.spans
    assert ahead.label(audio, 0.0, words) == plain.label(audio, 0.0, words)
    assert fake.spans == embedded  # every window was there
    ahead.prepare(audio[:int(2.5 * RATE)], 0.0, words[:5])  # a pause after five words
    embedded = fake.spans
    ahead.label(audio, 0.0, words)
    every = len(window_spans(int(4.5 * RATE), ahead.window, ahead.hop))
    assert 0 < fake.spans - embedded < every


def test_nothing_said_has_no_speaker() -> None:
    lab = labeler()
    audio = np.zeros(RATE, np.float32)
    assert lab.label(audio, 0.0, []) == ([], None)
    assert lab.tracker.count == 0


# ---------------------------------------------------------------------------- the core


def conversation() -> np.ndarray:
    parts = []
    for ids in ([11, 12, 13, 14], [31, 32, 33, 34, 35], [15, 16, 17], [36, 37, 38]):
        parts += [speech(ids, 0.3, 0.1)[0], silence(1.0)]
    return np.concatenate(parts)


def run_core(core: StreamingTranscriber, audio: np.ndarray) -> list[Committed]:
    events = []
    for i in range(0, len(audio), 1600):
        events += core.feed(audio[i:i + 1600])
    events += core.finish()
    return [e for e in events if isinstance(e, Committed)]


def test_the_core_labels_finals_and_words_and_commits_its_speakers() -> None:
    core = StreamingTranscriber("s", BurstDecoder(), fake_vad, CFG,
                                speakers=labeler())
    committed = run_core(core, conversation())
    assert [c.final.speaker for c in committed] == [0, 1, 0, 1]
    for c in committed:
        assert c.final.words and all(w.speaker == c.final.speaker for w in c.final.words)
        assert c.speakers
    assert SpeakerTracker.from_config(SpeakerConfig(), committed[-1].speakers).count == 2


def test_a_new_owner_with_the_committed_speakers_keeps_the_labels() -> None:
    """A takeover after the second final: the new core starts from the commit point with
    the speakers committed there, and labels the rest as the first owner did."""
    audio = conversation()
    whole = run_core(StreamingTranscriber("s", BurstDecoder(), fake_vad, CFG,
                                          speakers=labeler()), audio)
    second = whole[1]
    config = SpeakerConfig()
    resumed = StreamingTranscriber(
        "s", BurstDecoder(), fake_vad, CFG, start_sample=second.commit_sample,
        next_utterance=second.next_utterance,
        speakers=SpeakerLabeler(FakeEmbedder(seed=9), config,
                                SpeakerTracker.from_config(config, second.speakers)))
    rest = run_core(resumed, audio[second.commit_sample:])
    assert [c.final.speaker for c in rest] == [c.final.speaker for c in whole[2:]] == [0, 1]


def test_without_speakers_nothing_carries_one() -> None:
    core = StreamingTranscriber("s", BurstDecoder(), fake_vad, CFG)
    committed = run_core(core, conversation())
    assert committed and all(c.final.speaker is None and c.speakers is None for c in committed)
    assert all(w.speaker is None for c in committed for w in c.final.words)


def test_partials_carry_a_provisional_speaker() -> None:
    lab = labeler()
    core = StreamingTranscriber("s", BurstDecoder(), fake_vad, CFG, speakers=lab)
    audio = conversation()
    partials = []
    for i in range(0, len(audio), 1600):
        partials += [e for e in core.feed(audio[i:i + 1600]) if type(e).__name__ == "Partial"]
    assert partials and all(p.speaker in (0, 1) for p in partials)


# ---------------------------------------------------------------------------- real voices


@pytest.fixture(scope="module")
def encoder():  # type: ignore[no-untyped-def]
    from transcriber.speakers import load_embedder

    return load_embedder("cpu")


def embedding(encoder, clip: str, start_s: float = 0.0, end_s: float = 4.0) -> np.ndarray:  # type: ignore[no-untyped-def]
    pcm = load_pcm16(clip)[int(start_s * RATE):int(end_s * RATE)].astype(np.float32) / 32768
    return encoder.embed(pcm, [(0, len(pcm))])[0]


def test_the_real_encoder_tells_real_voices_apart(encoder) -> None:  # type: ignore[no-untyped-def]
    """resemblyzer's weights from its wheel: two recordings of one man (the Montreal Forced
    Aligner's test clips) are more alike than either is to JFK or a LibriVox reader."""
    a, b = embedding(encoder, "mfa_words"), embedding(encoder, "mfa_her")
    jfk, reader = embedding(encoder, "fw_jfk"), embedding(encoder, "ps_librivox_0870")
    assert abs(float(np.linalg.norm(a)) - 1) < 1e-4
    same = float(a @ b)
    assert same > 0.75, same
    assert same > max(float(a @ jfk), float(b @ jfk), float(a @ reader), float(b @ reader))
