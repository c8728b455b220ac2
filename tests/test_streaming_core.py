"""The I/O-free streaming core, fed with synthetic arrays and a fake model.

"Speech" here is a sequence of constant-amplitude bursts, one per word; the
fake decoder turns each burst in the audio it is given into a word whose
name encodes the amplitude, with its true start and end. So every decision of
the core (where utterances start and end, what is cut, what is kept, what is
promised as stable) is checked against exact expectations.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from collections.abc import Sequence

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.messages import Partial, Word
from transcriber.endpointing import WINDOW, EndpointConfig
from transcriber.streaming import (
    RATE,
    Committed,
    PartialJob,
    StreamConfig,
    StreamingTranscriber,
)

WORD_S = 0.3
GAP_S = 0.1


def burst(word_id: int) -> np.ndarray:
    return np.full(int(WORD_S * RATE), word_id / 100.0, dtype=np.float32)


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * RATE), dtype=np.float32)


def utterance(ids: list[int]) -> np.ndarray:
    parts: list[np.ndarray] = []
    for i in ids:
        parts += [burst(i), silence(GAP_S)]
    return np.concatenate(parts)


def fake_vad(windows: np.ndarray) -> np.ndarray:
    return (np.abs(windows).mean(axis=1) > 0.005).astype(np.float32)


class BurstDecoder:
    """Each run of non-zero samples is one word, named after its amplitude."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, bool]] = []
        self.contexts: list[tuple[str, str, int]] = []  # (prompt, prefix, context) per call

    def decode(self, audio: np.ndarray, prompt: str, final: bool,
               shown: Sequence[str] = (), speculative: bool = False,
               prefix: str = "", context: int = 0) -> list[Word]:
        """With ``context``: what was said in the context audio must be ``prefix`` (the
        core gave the words that go with the audio), and only the words after it come back,
        as from WhisperDecoder."""
        self.calls.append((len(audio), final))
        loud = np.concatenate([[0], (np.abs(audio) > 0.005).astype(np.int8), [0]])
        edges = np.flatnonzero(np.diff(loud))  # starts and ends of the loud runs
        words = []
        for i, j in zip(edges[::2], edges[1::2], strict=True):
            wid = round(float(np.abs(audio[i:j]).mean()) * 100)
            words.append(Word(f" w{wid}", i / RATE, j / RATE, 1.0))
        if context:
            assert final
            self.contexts.append((prompt, prefix, context))
            said = [w.word.strip() for w in words if w.end <= context / RATE]
            assert said == [w.strip(" .") for w in prefix.split()], (said, prefix)
            words = [w for w in words if w.end > context / RATE]
        return words


CFG = StreamConfig(
    endpoint=EndpointConfig(min_silence_samples=int(0.5 * RATE),
                            min_speech_samples=int(0.25 * RATE)),
    pad_samples=int(0.2 * RATE),
    partial_interval_samples=int(0.5 * RATE),
    max_utterance_samples=int(5 * RATE),
)


def run(audio: np.ndarray, frame_s: float = 0.1, config: StreamConfig = CFG,
        **kwargs: int) -> tuple[list[Partial], list[Committed], StreamingTranscriber]:
    core = StreamingTranscriber("s", BurstDecoder(), fake_vad, config, **kwargs)
    events = []
    step = int(frame_s * RATE)
    for i in range(0, len(audio), step):
        events += core.feed(audio[i:i + step])
    events += core.finish()
    partials = [e for e in events if isinstance(e, Partial)]
    finals = [e for e in events if isinstance(e, Committed)]
    return partials, finals, core


def texts(finals: list[Committed]) -> list[str]:
    return [f.final.text for f in finals]


def test_utterances_end_at_silence_with_exact_words_and_times() -> None:
    audio = np.concatenate([silence(0.5), utterance([11, 12, 13]), silence(1.0),
                            utterance([14, 15]), silence(1.0)])
    _, finals, _ = run(audio)
    assert texts(finals) == ["w11 w12 w13", "w14 w15"]
    assert [f.final.utterance for f in finals] == [0, 1]
    first = finals[0].final
    assert first.start == 0.5 and abs(first.end - (0.5 + 2 * 0.4 + 0.3)) < 1e-3
    assert [w.word.strip() for w in first.words] == ["w11", "w12", "w13"]
    # Commit points move forward and cover each utterance.
    assert finals[0].commit_sample < finals[1].commit_sample
    assert finals[0].commit_sample >= int(first.end * RATE)
    assert finals[1].next_utterance == 2


def test_partials_come_before_their_final_and_stable_text_is_kept() -> None:
    audio = np.concatenate([utterance(list(range(20, 28))), silence(1.0)])
    partials, finals, _ = run(audio)
    assert len(finals) == 1
    assert partials, "no partial before the final"
    final_text = finals[0].final.text
    for p in partials:
        assert p.utterance == 0
        assert final_text.startswith(p.stable_text)
        assert p.text.startswith(p.stable_text)
    assert any(p.stable_text for p in partials)


def test_silence_gives_no_results_and_spends_no_utterance_index() -> None:
    partials, finals, core = run(silence(20.0))
    assert partials == [] and finals == []
    assert core.utterance == 0


def test_a_burst_shorter_than_min_speech_is_dropped() -> None:
    blip = np.full(int(0.1 * RATE), 0.5, dtype=np.float32)
    _, finals, _ = run(np.concatenate([silence(1.0), blip, silence(2.0)]))
    assert finals == []


def test_max_length_cuts_at_word_boundaries_losing_and_repeating_nothing() -> None:
    ids = [10 + i % 80 for i in range(40)]  # 16 s of continuous speech, 5 s cap
    audio = np.concatenate([utterance(ids), silence(1.0)])
    _, finals, _ = run(audio)
    assert len(finals) >= 4
    words = [w.word.strip() for f in finals for w in f.final.words]
    assert words == [f"w{i}" for i in ids]
    for f in finals:
        assert f.final.end - f.final.start <= 5.0 + 1e-6
    # Each cut lands in a gap between words, never inside one.
    for f in finals[:-1]:
        cut_s = f.commit_sample / RATE
        assert all(not (w.start < cut_s < w.end) for g in finals for w in g.final.words)


def test_finalize_ends_the_utterance_now() -> None:
    core = StreamingTranscriber("s", BurstDecoder(), fake_vad, CFG)
    events = core.feed(utterance([30, 31]))
    events += core.finalize()
    finals = [e for e in events if isinstance(e, Committed)]
    assert texts(finals) == ["w30 w31"]
    events = core.feed(np.concatenate([utterance([32]), silence(1.0)]))
    finals = [e for e in events if isinstance(e, Committed)]
    assert texts(finals) == ["w32"]
    assert finals[0].final.utterance == 1


def test_each_final_says_what_ended_it() -> None:
    """``ended_by``: a pause, the length cap (the speech went on), the client's finalize,
    the stream's end; the Deepgram dialect's speech_final and from_finalize come from it."""
    ids = [10 + i % 80 for i in range(20)]  # 8 s of continuous speech, 5 s cap
    audio = np.concatenate([utterance([11, 12]), silence(1.0), utterance(ids), silence(1.0)])
    _, finals, _ = run(audio)
    ended = [f.final.ended_by for f in finals]
    assert ended[0] == "pause" and ended[-1] == "pause"
    assert "max_length" in ended[1:-1], ended

    core = StreamingTranscriber("s", BurstDecoder(), fake_vad, CFG)
    events = core.feed(utterance([30, 31])) + core.finalize()
    events += core.feed(utterance([32])) + core.finish()
    finals = [e for e in events if isinstance(e, Committed)]
    assert [(f.final.text, f.final.ended_by) for f in finals] == \
        [("w30 w31", "finalize"), ("w32", "end")]


def test_frame_size_does_not_change_the_finals() -> None:
    audio = np.concatenate([utterance([40, 41, 42]), silence(0.8), utterance([43] * 3),
                            silence(1.0)])
    _, small, _ = run(audio, frame_s=0.02)
    _, large, _ = run(audio, frame_s=3.0)
    assert texts(small) == texts(large) == ["w40 w41 w42", "w43 w43 w43"]


def test_resume_from_a_commit_point_repeats_nothing() -> None:
    audio = np.concatenate([utterance([50, 51]), silence(1.0), utterance([52, 53]),
                            silence(1.0)])
    _, finals, _ = run(audio)
    commit = finals[0].commit_sample
    _, resumed, _ = run(audio[commit:], start_sample=commit, next_utterance=1)
    assert texts(resumed) == ["w52 w53"]
    assert resumed[0].final.utterance == 1
    assert resumed[0].final.words == finals[1].final.words


def test_buffer_stays_bounded_during_long_silence() -> None:
    core = StreamingTranscriber("s", BurstDecoder(), fake_vad, CFG)
    for _ in range(600):
        core.feed(silence(0.1))
    assert len(core._audio) <= CFG.pad_samples + 512


class SentenceDecoder(BurstDecoder):
    """Like BurstDecoder, but the last word of what it hears ends a sentence."""

    def decode(self, audio: np.ndarray, prompt: str, final: bool,
               shown: Sequence[str] = (), speculative: bool = False,
               prefix: str = "", context: int = 0) -> list[Word]:
        words = super().decode(audio, prompt, final, shown, prefix=prefix, context=context)
        if words:
            words[-1] = Word(words[-1].word + ".", words[-1].start, words[-1].end, 1.0)
        return words


def feed_until_final(core: StreamingTranscriber, audio: np.ndarray) -> tuple[float, Committed]:
    """Feed 32 ms frames; the audio time at which the first final came out."""
    step = 512
    for i in range(0, len(audio), step):
        for ev in core.feed(audio[i:i + step]):
            if isinstance(ev, Committed):
                return (i + step) / RATE, ev
    raise AssertionError("no final")


@pytest.mark.parametrize("speculate_s", [0.2, 0.05])
def test_the_final_is_decoded_during_the_pause_not_after_the_endpoint(
        speculate_s: float) -> None:
    """Also when the pause is still shorter than the pad kept after the speech (0.05 s
    against 0.2 s): the pad's missing rest is decoded as silence, and the endpoint, which
    closes at the same pad, takes those words without decoding again."""
    decoder = BurstDecoder()
    core = StreamingTranscriber("s", decoder, fake_vad, dataclasses.replace(
        CFG, interim_results=False, short_silence_samples=0,
        speculative_samples=int(speculate_s * RATE)))
    speech = utterance([60, 61, 62])
    audio = np.concatenate([speech, silence(2.0)])
    speech_end = len(speech) / RATE - GAP_S
    decoded_at = emitted_at = None
    for i in range(0, len(audio), 512):
        events = core.feed(audio[i:i + 512])
        if decoded_at is None and any(final for _n, final in decoder.calls):
            decoded_at = (i + 512) / RATE
        if any(isinstance(e, Committed) for e in events):
            emitted_at = (i + 512) / RATE
            assert [e.final.text for e in events if isinstance(e, Committed)] == ["w60 w61 w62"]
            break
    assert decoded_at is not None and emitted_at is not None
    assert decoded_at - speech_end < speculate_s + 0.15  # at the first short pause
    assert emitted_at - speech_end >= 0.5  # the endpoint still waits for min_silence
    silence_start = -(-round(speech_end * RATE) // WINDOW) * WINDOW  # the first silent window
    # (a 0.05 s speculation also decodes at the 0.1 s gaps between words, and drops those)
    assert [n for n, final in decoder.calls if final and n > silence_start] == [
        silence_start + CFG.pad_samples], "decoded again at the endpoint, or not up to the pad"


@pytest.mark.parametrize("speculate_s", [0.2, 0.1])
def test_a_speculative_final_hears_the_same_audio_however_it_arrived(
        speculate_s: float) -> None:
    """The pad past the pause heard at speculation time is zeros even when more audio has
    already arrived: the same session streamed in 32 ms frames or in 1 s chunks (a worker
    catching up) decodes the same final audio, so it gets the same words."""

    class Recording(BurstDecoder):
        def __init__(self) -> None:
            super().__init__()
            self.finals: list[np.ndarray] = []

        def decode(self, audio: np.ndarray, prompt: str, final: bool,
                   shown: Sequence[str] = (), speculative: bool = False) -> list[Word]:
            if final:
                self.finals.append(audio.copy())
            return super().decode(audio, prompt, final, shown)

    # a low hum after the speech: silence to the VAD, but not zeros
    hum = np.full(int(2.0 * RATE), 0.002, np.float32)
    audio = np.concatenate([utterance([60, 61, 62]), hum])
    heard = []
    for step in (512, RATE):
        decoder = Recording()
        core = StreamingTranscriber("s", decoder, fake_vad, dataclasses.replace(
            CFG, interim_results=False, short_silence_samples=0,
            speculative_samples=int(speculate_s * RATE)))
        finals = [e for i in range(0, len(audio), step) for e in core.feed(audio[i:i + step])
                  if isinstance(e, Committed)]
        assert [f.final.text for f in finals] == ["w60 w61 w62"]
        heard.append(decoder.finals)
    assert len(heard[0]) == len(heard[1]) == 1  # the speculation, reused at the endpoint
    assert np.array_equal(heard[0][0], heard[1][0])
    zeros = CFG.pad_samples - int(speculate_s * RATE)  # the pad past the pause heard
    final_audio = heard[0][0]
    assert final_audio[-zeros - 64:len(final_audio) - zeros].all()  # the hum, heard
    assert not final_audio[len(final_audio) - zeros:].any()  # then zeros


def test_a_finished_sentence_ends_at_the_short_pause() -> None:
    speech = utterance([70, 71])  # ends with a 0.1 s gap
    audio = np.concatenate([speech, silence(2.0)])
    plain = StreamingTranscriber("s", BurstDecoder(), fake_vad, CFG)
    sentence = StreamingTranscriber("s", SentenceDecoder(), fake_vad, CFG)
    at_plain, _ = feed_until_final(plain, audio)
    at_sentence, committed = feed_until_final(sentence, audio)
    speech_end = len(speech) / RATE - GAP_S
    assert committed.final.text == "w70 w71."
    assert at_sentence - speech_end < CFG.short_silence_samples / RATE + 0.1  # + one VAD group
    assert at_plain - speech_end >= 0.5  # min_silence
    assert at_sentence < at_plain


@pytest.mark.parametrize("pad_s", [0.2, 0.3, 0.5])
def test_a_short_pause_close_commits_no_audio_the_vad_has_not_heard(pad_s: float) -> None:
    """The final of a sentence closed at the short pause covers the pad after the speech, but
    its commit point stops where the VAD has listened: with SPEECH_PAD_S above
    SHORT_SILENCE_S the next utterance started past the audio the VAD had read, and the core
    dropped that audio and crashed (ValueError in feed) when it began 0.25 s later."""
    cfg = dataclasses.replace(CFG, pad_samples=int(pad_s * RATE))
    speech = utterance([70, 71])
    pause = 0.25 - GAP_S  # 0.25 s from the end of w71 to the start of w72
    audio = np.concatenate([silence(0.5), speech, silence(pause), utterance([72]),
                            silence(1.0)])
    core = StreamingTranscriber("s", SentenceDecoder(), fake_vad, cfg)
    step = RATE // 10  # 100 ms frames: audio arrives ahead of what the VAD has read
    events = [ev for i in range(0, len(audio), step) for ev in core.feed(audio[i:i + step])]
    finals = [ev for ev in events + core.finish() if isinstance(ev, Committed)]
    assert texts(finals) == ["w70 w71.", "w72."]
    w72 = finals[1].final.words[0]
    assert abs(w72.start - (0.5 + len(speech) / RATE + pause)) < 1e-3  # heard from its start
    assert abs(w72.end - w72.start - WORD_S) < 1e-3
    assert finals[0].commit_sample <= int(w72.start * RATE)


def test_a_cap_that_finds_only_recent_words_cuts_before_them_or_waits() -> None:
    """Found by the property test below: at the length cap every word ended within the cut
    guard, so none was kept, and the cut went to the cap minus the pad, past the only word
    (a 0.75 s pad, 1 s endpoint, 2 s cap): the word was in no final."""
    cfg = dataclasses.replace(
        CFG, pad_samples=int(0.75 * RATE), max_utterance_samples=2 * RATE,
        endpoint=dataclasses.replace(CFG.endpoint, min_silence_samples=RATE))
    audio = np.concatenate([silence(1.0), burst(10), silence(3.0)])
    _, finals, _ = run(audio, frame_s=0.01, config=cfg)
    assert texts(finals) == ["w10"]


def test_a_cap_waits_for_a_recent_word_once_then_keeps_it() -> None:
    """A decoder whose only word always runs to the end of the audio (as Whisper may do on
    a long stretch of singing): the cap waits half a guard once, then keeps the word, so a
    cut costs at most two decodes of the whole utterance, not one every 32 ms window."""
    class WholeDecoder(BurstDecoder):
        def decode(self, audio: np.ndarray, prompt: str, final: bool,
                   shown: Sequence[str] = (), speculative: bool = False) -> list[Word]:
            self.calls.append((len(audio), final))
            return [Word(" la", 0.0, len(audio) / RATE, 0.9)]

    cfg = dataclasses.replace(CFG, max_utterance_samples=2 * RATE, interim_results=False)
    decoder = WholeDecoder()
    core = StreamingTranscriber("s", decoder, fake_vad, cfg)
    audio = np.full(9 * RATE, 0.3, np.float32)
    finals = [ev for i in range(0, len(audio), RATE // 10)
              for ev in core.feed(audio[i:i + RATE // 10]) if isinstance(ev, Committed)]
    assert len(finals) == 3 and all(f.final.text == "la" for f in finals)
    final_decodes = sum(1 for _, final in decoder.calls if final)
    assert final_decodes <= 2 * len(finals) + 1, decoder.calls


def test_speculation_is_dropped_when_speech_resumes() -> None:
    audio = np.concatenate([utterance([80, 81]), silence(0.3), utterance([82]), silence(1.0)])
    _, finals, _ = run(audio, frame_s=0.032,
                       config=dataclasses.replace(CFG, short_silence_samples=0))
    assert texts(finals) == ["w80 w81 w82"]


def test_under_load_partials_are_shed_but_finals_are_not() -> None:
    decoder = BurstDecoder()
    core = StreamingTranscriber("s", decoder, fake_vad, CFG)
    audio = np.concatenate([utterance(list(range(20, 28))), silence(1.0)])
    events = []
    for i in range(0, len(audio), 1600):
        events += core.feed(audio[i:i + 1600], partials=False, speculate=False)
    assert not [e for e in events if isinstance(e, Partial)]
    assert texts([e for e in events if isinstance(e, Committed)]) == [
        " ".join(f"w{i}" for i in range(20, 28))]
    assert [final for _n, final in decoder.calls] == [True]  # one decode, the final


def test_a_detached_partial_gives_the_partial_an_inline_decode_gives() -> None:
    """``feed(detach=True)`` hands the partial's decode out as a job; run at once and given
    back, it makes the same partials (text, stable text, times) and finals as inline."""
    audio = np.concatenate([silence(0.3), utterance(list(range(30, 42))), silence(1.0),
                            utterance([50, 51, 52]), silence(1.0)])
    inline, inline_finals, _ = run(audio)
    core = StreamingTranscriber("s", BurstDecoder(), fake_vad, CFG)
    events: list[object] = []
    for i in range(0, len(audio), 1600):
        for ev in core.feed(audio[i:i + 1600], detach=True):
            if isinstance(ev, PartialJob):
                assert ev.audio.base is None  # its own copy: the core may trim its buffer
                ev = core.partial_done(ev, ev.run())
            if ev is not None:
                events.append(ev)
    events += core.finish()
    assert [e for e in events if isinstance(e, Partial)] == inline
    assert [(e.final, e.commit_sample) for e in events if isinstance(e, Committed)] == \
        [(e.final, e.commit_sample) for e in inline_finals]
    assert len(inline) >= 5


def test_a_detached_partial_that_comes_back_after_its_utterance_ended_is_dropped() -> None:
    """While a partial decodes elsewhere the core goes on hearing audio; if the utterance
    ended (or a new one began) before the words come back, they show nothing."""
    core = StreamingTranscriber("s", BurstDecoder(), fake_vad, CFG)
    first = np.concatenate([silence(0.3), utterance([60, 61, 62])])
    jobs = [ev for i in range(0, len(first), 1600)
            for ev in core.feed(first[i:i + 1600], detach=True) if isinstance(ev, PartialJob)]
    assert jobs
    job = jobs[-1]
    words = job.run()
    finals = [ev for ev in core.feed(silence(1.0), detach=True) if isinstance(ev, Committed)]
    assert texts(finals) == ["w60 w61 w62"]
    assert core.partial_done(job, words) is None
    core.feed(utterance([70, 71]), detach=True)  # the next utterance is open
    assert core.partial_done(job, words) is None


def _words(spec: str) -> list[Word]:
    """'Ask@0-.7 what@.7-.9' -> words with those times."""
    out = []
    for item in spec.split():
        text, times = item.split("@")
        start, end = times.split("-")
        out.append(Word(" " + text, float(start), float(end), 0.9))
    return out


def test_a_final_that_differs_inside_the_stable_prefix_keeps_every_later_word() -> None:
    """Seen on JFK: stable 'Ask what you can', final 'as what you can do for ...' with
    'can' ending earlier than in the partial; splicing by time dropped 'do'."""
    from transcriber.streaming import merge_stable

    stable = _words("Ask@0-.68 what@.68-.96 you@.96-1.28 can@1.28-1.56")
    final = _words("as@0-.68 what@.68-.94 you@.94-1.28 can@1.28-1.46 do@1.46-1.7 "
                   "for@1.7-1.92 your@1.92-2.2 country.@2.2-2.42")
    merged = [w.word.strip() for w in merge_stable(stable, final)]
    assert merged == ["Ask", "what", "you", "can", "do", "for", "your", "country."]
    # a stable word the final lost, and one it says differently
    merged = [w.word.strip() for w in merge_stable(
        _words("a@0-.2 b@.2-.4 c@.4-.6 d@.6-.8"), _words("a@0-.2 b@.2-.4 d@.4-.8 e@.8-1"))]
    assert merged == ["a", "b", "c", "d", "e"]
    merged = [w.word.strip() for w in merge_stable(
        _words("a@0-.2 b@.2-.4 c@.4-.6"), _words("a@0-.2 x@.2-.5 c@.5-.7 e@.7-1"))]
    assert merged == ["a", "b", "c", "e"]
    # words the final puts in front of the promised prefix do not repeat it
    merged = [w.word.strip() for w in merge_stable(
        _words("Mr.@.3-.6 John@.6-1"), _words("And@0-.3 Mr.@.3-.6 John@.6-1 Dashwood@1-1.5"))]
    assert merged == ["Mr.", "John", "Dashwood"]
    # a stable word matched to the same word far on would drop what lies between (seen on
    # a spontaneous monologue: the final lost "so this probably sounds a lot different
    # than the acoustic")
    merged = [w.word.strip() for w in merge_stable(
        _words("I@0-.5 have@.5-.8 the@.8-1 cold@1-1.4"),
        _words("I@0-.5 have@.5-.8 a@.8-1 cold@1-1.4 so@1.4-1.6 this@1.6-1.8 sounds@1.8-2 "
               "different@2-2.4 than@2.4-2.6 the@2.6-2.7 acoustic@2.7-3 corpus@3-3.4"))]
    assert merged == ["I", "have", "the", "cold", "so", "this", "sounds", "different", "than",
                      "the", "acoustic", "corpus"]
    # a word the final puts inside the promised prefix is left out, not repeated
    merged = [w.word.strip() for w in merge_stable(
        _words("a@0-.2 b@.2-.4"), _words("a@0-.2 x@.2-.3 b@.3-.4 c@.4-.6"))]
    assert merged == ["a", "b", "c"]
    # nothing in common: the final's words after the stable ones, by time
    merged = [w.word.strip() for w in merge_stable(
        _words("a@0-.5 b@.5-1"), _words("x@0-.5 y@.5-1 z@1-1.4"))]
    assert merged == ["a", "b", "z"]


class LeadMissingDecoder(BurstDecoder):
    """Hears the utterance's first word only in audio longer than ``hears_after`` seconds;
    shorter, the second word is stretched over it with a low probability (seen on a
    LibriVox clip: 'Mr.' at 0.0-0.64 s, p 0.2-0.3, where longer audio gave 'And' then 'Mr.'
    at p 0.9)."""

    def __init__(self, hears_after: float) -> None:
        super().__init__()
        self.hears_after = hears_after

    def decode(self, audio: np.ndarray, prompt: str, final: bool,
               shown: Sequence[str] = (), speculative: bool = False) -> list[Word]:
        words = super().decode(audio, prompt, final, shown, speculative)
        if len(audio) / RATE > self.hears_after or len(words) < 2:
            return words
        first, second = words[0], words[1]
        return [Word(second.word, first.start, second.end, 0.25), *words[2:]]


@pytest.mark.parametrize("least", [0.5, 0.0])
def test_a_low_probability_word_is_not_promised_so_a_word_heard_before_it_later_is_kept(
        least: float) -> None:
    cfg = dataclasses.replace(CFG, stable_min_probability=least)
    core = StreamingTranscriber("s", LeadMissingDecoder(hears_after=2.5), fake_vad, cfg)
    events = []
    audio = np.concatenate([silence(0.5), utterance(list(range(30, 38))), silence(1.0)])
    for i in range(0, len(audio), RATE // 10):
        events += core.feed(audio[i:i + RATE // 10])
    partials = [e for e in events if isinstance(e, Partial)]
    [final] = [e.final.text for e in events if isinstance(e, Committed)]
    if least:
        assert final == " ".join(f"w{i}" for i in range(30, 38))
        for p in partials:
            assert final.startswith(p.stable_text)
        # once the first word is heard with its own probability, the prefix is promised
        assert any(p.stable_text.startswith("w30 w31") for p in partials)
    else:  # the old rule promised "w31" first, and the final kept that promise
        assert final.startswith("w31 w32")
        assert any(p.stable_text.startswith("w31") for p in partials)


class UnsureDecoder(BurstDecoder):
    def decode(self, audio: np.ndarray, prompt: str, final: bool,
               shown: Sequence[str] = (), speculative: bool = False) -> list[Word]:
        return [dataclasses.replace(w, probability=0.3)
                for w in super().decode(audio, prompt, final, shown, speculative)]


def test_low_probability_words_are_promised_after_the_longer_guard() -> None:
    core = StreamingTranscriber("s", UnsureDecoder(), fake_vad, CFG)
    audio = np.concatenate([utterance(list(range(40, 55))), silence(1.0)])  # 6 s
    promised = {}  # stable word -> audio received when first promised
    for i in range(0, len(audio), RATE // 10):
        for e in core.feed(audio[i:i + RATE // 10]):
            if isinstance(e, Partial):
                for k, w in enumerate(e.stable_text.split()):
                    promised.setdefault((k, w), e.end)
    assert promised, "unsure words were never promised"
    for (k, _), at in promised.items():
        word_end = k * (WORD_S + GAP_S) + WORD_S
        assert 3.0 <= at - word_end < 3.0 + 2 * CFG.partial_interval_samples / RATE


def test_a_final_decode_is_told_the_words_the_last_partial_showed() -> None:
    """The decoder gets the last partial's words with each final (a short-context final
    that skips a run of them is decoded again); nothing from an earlier utterance."""

    class Recording(BurstDecoder):
        def __init__(self) -> None:
            super().__init__()
            self.shown: list[list[str]] = []

        def decode(self, audio: np.ndarray, prompt: str, final: bool,
                   shown: Sequence[str] = (), speculative: bool = False) -> list[Word]:
            if final:
                self.shown.append([w.strip() for w in shown])
            return super().decode(audio, prompt, final, shown)

    decoder = Recording()
    core = StreamingTranscriber("s", decoder, fake_vad, CFG)
    events = []
    first = np.concatenate([utterance(list(range(20, 26))), silence(1.0)])
    for i in range(0, len(first), 1600):
        events += core.feed(first[i:i + 1600])
    partials = [e for e in events if isinstance(e, Partial)]
    shown = partials[-1].text.split()
    assert len(shown) >= 4
    # the decode that made the final saw the last partial; a speculation at an earlier gap
    # between words saw what was shown by then
    assert decoder.shown and decoder.shown[-1] == shown
    assert all(s == shown[:len(s)] for s in decoder.shown)
    decoder.shown = []
    second = np.concatenate([utterance([30, 31]), silence(1.0)])
    for i in range(0, len(second), 1600):  # shed partials: this utterance shows none
        events += core.feed(second[i:i + 1600], partials=False)
    assert len([e for e in events if isinstance(e, Committed)]) == 2
    assert decoder.shown and all(s == [] for s in decoder.shown)


def test_a_short_pause_after_a_sentence_ends_it_however_the_audio_was_chunked() -> None:
    """Decisions are taken after every 32 ms VAD window: whether a pause around
    SHORT_SILENCE_S (0.3 s here) after a finished sentence ends the utterance is the same
    whether the audio came in 20 ms frames, 100 ms frames or 1 s chunks (decided per 128 ms
    group, a 0.36 s pause ended it in 20 ms frames only)."""
    for pause_s in (0.30, 0.34, 0.36, 0.38, 0.42):
        audio = np.concatenate([silence(0.3), utterance([70, 71]), silence(pause_s - GAP_S),
                                utterance([72, 73]), silence(1.0)])
        got = []
        for step in (320, 1600, 16000):
            core = StreamingTranscriber("s", SentenceDecoder(), fake_vad, dataclasses.replace(
                CFG, short_silence_samples=int(0.3 * RATE)))
            got.append([e.final.text for i in range(0, len(audio), step)
                        for e in core.feed(audio[i:i + step]) if isinstance(e, Committed)])
        assert got[0] == got[1] == got[2], (pause_s, got)
        if pause_s == 0.30:
            assert got[0] == ["w70 w71 w72 w73."]
        if pause_s == 0.42:
            assert got[0] == ["w70 w71.", "w72 w73."]


Session = tuple[StreamConfig, float, list[tuple[int, float]], int, bool]


@st.composite
def sessions(draw: st.DrawFn) -> Session:
    """A config with any pads, pauses and caps in their ranges, words with any pauses after
    them, audio in any chunk size, with or without partials."""
    def seconds(lo: float, hi: float) -> int:
        return int(round(draw(st.floats(lo, hi)), 2) * RATE)

    cfg = dataclasses.replace(
        CFG, pad_samples=seconds(0.0, 0.8),
        endpoint=dataclasses.replace(CFG.endpoint, min_silence_samples=seconds(0.1, 1.0)),
        speculative_samples=draw(st.sampled_from([0, seconds(0.03, 0.4)])),
        short_silence_samples=draw(st.sampled_from([0, seconds(0.03, 0.8)])),
        max_utterance_samples=seconds(2.0, 8.0),
        partial_interval_samples=seconds(0.2, 1.0),
        final_context_samples=draw(st.sampled_from([0, seconds(0.3, 6.0)])))
    lead = round(draw(st.floats(0.0, 1.0)), 2)
    words = draw(st.lists(st.tuples(st.integers(10, 90), st.floats(0.05, 1.5).map(
        lambda x: round(x, 2))), min_size=1, max_size=12))
    chunk = draw(st.sampled_from([160, 512, 1600, 4000, 16000]))
    return cfg, lead, words, chunk, draw(st.booleans())


@given(sessions())
@settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "300")), deadline=None,
          database=None, suppress_health_check=[HealthCheck.too_slow])
def test_any_config_and_pacing_gives_every_word_once_in_order(session: Session) -> None:
    """Whatever the pads, pauses, caps and chunking, the core never fails, its commit
    points only move forward, and the finals hold every word of the audio once, in order
    (pads reaching into the next word, a pause shorter than the pad after a sentence and a
    cut near a pause must neither lose nor repeat one)."""
    cfg, lead, spoken, chunk, partials = session
    audio = np.concatenate([silence(lead)] + [part for wid, gap in spoken
                                              for part in (burst(wid), silence(gap))] +
                           [silence(2.0)])
    core = StreamingTranscriber("s", SentenceDecoder(), fake_vad, cfg)
    events = []
    for i in range(0, len(audio), chunk):
        events += core.feed(audio[i:i + chunk], partials=partials)
    events += core.finish()
    finals = [e for e in events if isinstance(e, Committed)]
    words = [w.word.strip(" .") for f in finals for w in f.final.words]
    assert words == [f"w{wid}" for wid, _ in spoken]
    commits = [f.commit_sample for f in finals]
    assert commits == sorted(commits)


class FlakyVad:
    """fake_vad with some windows flipped (speech heard as silence and the reverse), as a
    real VAD does inside long words and on clicks."""

    def __init__(self, flips: set[int]) -> None:
        self.flips = flips
        self.seen = 0

    def __call__(self, windows: np.ndarray) -> np.ndarray:
        probs = fake_vad(windows)
        for i in range(len(probs)):
            if self.seen + i in self.flips:
                probs[i] = 1.0 - probs[i]
        self.seen += len(probs)
        return probs


@given(sessions(), st.sets(st.integers(0, 600), max_size=60))
@settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "300")), deadline=None,
          database=None, suppress_health_check=[HealthCheck.too_slow])
def test_a_flaky_vad_splits_or_joins_words_but_never_loses_or_reorders_them(
        session: Session, flips: set[int]) -> None:
    """With single windows misheard anywhere, a word may be split across two finals (both
    halves decode to it), but none is lost, none goes back in time, and the core never
    fails."""
    cfg, lead, spoken, chunk, partials = session
    audio = np.concatenate([silence(lead)] + [part for wid, gap in spoken
                                              for part in (burst(wid), silence(gap))] +
                           [silence(2.0)])
    core = StreamingTranscriber("s", SentenceDecoder(), FlakyVad(flips), cfg)
    events = []
    for i in range(0, len(audio), chunk):
        events += core.feed(audio[i:i + chunk], partials=partials)
    events += core.finish()
    finals = [e for e in events if isinstance(e, Committed)]
    words = [w for f in finals for w in f.final.words]
    heard = [w.word.strip(" .") for w in words]
    collapsed = [w for i, w in enumerate(heard) if i == 0 or w != heard[i - 1]]
    said = [f"w{wid}" for wid, _ in spoken]
    assert collapsed == [w for i, w in enumerate(said) if i == 0 or w != said[i - 1]]
    assert all(a.start <= b.start for a, b in itertools.pairwise(words))
    commits = [f.commit_sample for f in finals]
    assert commits == sorted(commits)


@given(sessions(), st.lists(st.integers(0, 6), min_size=1, max_size=20))
@settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "300")), deadline=None,
          database=None, suppress_health_check=[HealthCheck.too_slow])
def test_detached_partials_that_come_back_late_never_lose_a_word_or_outlive_their_utterance(
        session: Session, delays: list[int]) -> None:
    """The worker decodes partials beside the session's core calls (``detach=True``): the
    words of one come back after any number of further chunks. The finals still hold every
    word once, in order, and no partial is shown for an utterance whose final is out."""
    cfg, lead, spoken, chunk, _ = session
    audio = np.concatenate([silence(lead)] + [part for wid, gap in spoken
                                              for part in (burst(wid), silence(gap))] +
                           [silence(2.0)])
    core = StreamingTranscriber("s", SentenceDecoder(), fake_vad, cfg)
    events: list[object] = []
    pending: tuple[PartialJob, list[Word], int] | None = None  # job, its words, chunks left
    jobs = 0
    for i in range(0, len(audio), chunk):
        if pending is not None and pending[2] <= 0:
            partial = core.partial_done(pending[0], pending[1])
            if partial is not None:
                assert partial.utterance == core.utterance  # its final is not out yet
                events.append(partial)
            pending = None
        elif pending is not None:
            pending = (pending[0], pending[1], pending[2] - 1)
        for ev in core.feed(audio[i:i + chunk], partials=pending is None, detach=True):
            if isinstance(ev, PartialJob):
                pending = (ev, ev.run(), delays[jobs % len(delays)])
                jobs += 1
            else:
                events.append(ev)
    events += core.finish()
    finals = [e for e in events if isinstance(e, Committed)]
    words = [w.word.strip(" .") for f in finals for w in f.final.words]
    assert words == [f"w{wid}" for wid, _ in spoken]
    for k, ev in enumerate(events):
        if isinstance(ev, Partial):
            assert not any(isinstance(e, Committed) and e.final.utterance == ev.utterance
                           for e in events[:k])


class MishearsFirstWord(BurstDecoder):
    """Hears the first word of the audio it is given as ``w99``."""

    def decode(self, audio: np.ndarray, prompt: str, final: bool,
               shown: Sequence[str] = (), speculative: bool = False) -> list[Word]:
        words = super().decode(audio, prompt, final, shown, speculative)
        return [dataclasses.replace(w, word=" w99") if i == 0 else w
                for i, w in enumerate(words)]


def test_a_final_is_decoded_with_the_audio_and_words_before_it() -> None:
    """With ``final_context_samples`` a final's decode gets the audio before its utterance,
    back to the first word of the previous finals that starts within that reach, and those
    words as the prefix (the prompt is what came before them); the finals, their words and
    times are what they are without it."""
    audio = np.concatenate([silence(0.5), utterance([11, 12, 13]), silence(0.8),
                            utterance([14, 15]), silence(0.8), utterance([16]), silence(3.0),
                            utterance([17]), silence(1.0)])
    cfg = dataclasses.replace(CFG, final_context_samples=int(1.6 * RATE), speculative_samples=0)
    decoder = BurstDecoder()
    core = StreamingTranscriber("s", decoder, fake_vad, cfg)
    events: list[object] = []
    for i in range(0, len(audio), 1600):
        events += core.feed(audio[i:i + 1600], partials=False)
    events += core.finish()
    with_context = [e.final for e in events if isinstance(e, Committed)]
    _, plain, _ = run(audio, config=dataclasses.replace(cfg, final_context_samples=0))
    assert [f.text for f in with_context] == ["w11 w12 w13", "w14 w15", "w16", "w17"]
    assert [f.words for f in with_context] == [c.final.words for c in plain]
    # utterance 2 opens about 2.3 s in (0.2 s pad before w14): w12 (0.9 s) is the first
    # word that starts within 1.6 s, and the context starts just before it; utterance 3
    # (about 3.9 s) reaches back to w14; utterance 4 follows 3 s of silence: no word within
    # reach, no context.
    assert [(prompt, prefix) for prompt, prefix, _ in decoder.contexts] == [
        ("w11", "w12 w13"), ("w11 w12 w13", "w14 w15")]
    assert [n / RATE for _, _, n in decoder.contexts] == \
        [pytest.approx(2.3 - 0.9, abs=0.04), pytest.approx(3.9 - 2.5, abs=0.04)]


def test_a_takeover_keeps_the_words_the_previous_owner_promised() -> None:
    """A worker that takes a session over mid-utterance starts from the commit point with
    the previous owner's stable words, so the utterance's final still starts with every
    ``stable_text`` the client was shown, even where the new owner hears them otherwise."""
    audio = np.concatenate([utterance(list(range(20, 28))), silence(1.0)])
    first = StreamingTranscriber("s", BurstDecoder(), fake_vad, CFG)
    shown: list[str] = []
    for i in range(0, int(2.6 * RATE), 1600):
        shown += [e.stable_text for e in first.feed(audio[i:i + 1600])
                  if isinstance(e, Partial)]
    promised = first.stable_words
    assert shown[-1] and shown[-1] == " ".join(w.word.strip() for w in promised)

    def final_after_takeover(stable: Sequence[Word]) -> str:
        core = StreamingTranscriber("s", MishearsFirstWord(), fake_vad, CFG, start_sample=0,
                                    next_utterance=0, stable=stable)
        events = core.feed(audio) + core.finish()
        (committed,) = [e for e in events if isinstance(e, Committed)]
        assert committed.final.utterance == 0
        return committed.final.text

    assert final_after_takeover(promised).startswith(shown[-1])
    assert not final_after_takeover(()).startswith(shown[-1])  # what it was before
