"""Speech start/end decisions from per-window VAD probabilities. No I/O, no model."""

from __future__ import annotations

import dataclasses
from typing import Literal

WINDOW = 512  # Silero's window at 16 kHz: 32 ms


@dataclasses.dataclass(frozen=True)
class EndpointConfig:
    threshold: float = 0.5
    neg_threshold: float = 0.35
    min_silence_samples: int = 8000  # 0.5 s
    min_speech_samples: int = 4000  # 0.25 s


@dataclasses.dataclass(frozen=True)
class SpeechEvent:
    kind: Literal["start", "end"]
    sample: int  # absolute sample where speech started, or where the closing silence began
    speech_start: int = 0  # on "end": where that stretch of speech started
    voiced: int = 0  # on "end": samples of the stretch at or above neg_threshold

class Endpointer:
    """Hysteresis over window probabilities, in the manner of Silero's VADIterator.

    Speech starts at the first window at or above ``threshold``; it ends once
    the probability has stayed below ``neg_threshold`` for ``min_silence``
    (a window at or above ``threshold`` resets the silence). The end is
    reported at the first silent window. Bursts shorter than ``min_speech``
    are reported too; the caller decides (it knows whether a partial went out).
    """

    def __init__(self, config: EndpointConfig, origin: int = 0) -> None:
        self.config = config
        self.in_speech = False
        self.speech_start = 0
        self.voiced_end = 0  # end of the last window at or above neg_threshold in this speech
        self._silence_start: int | None = None
        self._next = origin  # absolute sample of the next window

    @property
    def position(self) -> int:
        return self._next

    @property
    def silence_start(self) -> int | None:
        """Start of the silence run inside speech, if one is in progress."""
        return self._silence_start

    def feed(self, probs: list[float] | tuple[float, ...]) -> list[SpeechEvent]:
        events: list[SpeechEvent] = []
        cfg = self.config
        for p in probs:
            at = self._next
            self._next += WINDOW
            if not self.in_speech:
                if p >= cfg.threshold:
                    self.in_speech = True
                    self.speech_start = at
                    self.voiced_end = self._next
                    self._silence_start = None
                    events.append(SpeechEvent("start", at))
                continue
            if p >= cfg.neg_threshold:
                self.voiced_end = self._next
            if p >= cfg.threshold:
                self._silence_start = None
            elif p < cfg.neg_threshold:
                if self._silence_start is None:
                    self._silence_start = at
                if self._next - self._silence_start >= cfg.min_silence_samples:
                    events.append(SpeechEvent("end", self._silence_start, self.speech_start,
                                              self.voiced_end - self.speech_start))
                    self.in_speech = False
                    self._silence_start = None
        return events

    def force_end(self) -> None:
        """The caller closed the utterance (finalize, max length): wait for new speech."""
        self.in_speech = False
        self._silence_start = None

    def restart_at(self, sample: int) -> None:
        """The caller cut the utterance at ``sample`` and speech goes on from there."""
        self.speech_start = sample
        self.voiced_end = max(self.voiced_end, sample)
        self._silence_start = None

    @property
    def voiced(self) -> int:
        """Samples of the current stretch of speech so far (0 outside speech)."""
        return self.voiced_end - self.speech_start if self.in_speech else 0
