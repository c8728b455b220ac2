"""Settings → the worker's configuration, with every "auto" resolved once, here.

``TranscriberSettings`` keeps the documented env values (``ENCODER_TAIL_FRAMES=-2`` for
auto, ``-1`` for the full window, ``BATCH_SIZE=0`` / ``INFERENCE_THREADS=0`` for auto).
They are read in this module only: ``setting_tail`` and ``setting_count`` turn them into
``AUTO``, ``FULL_WINDOW`` or a number, and ``WorkerConfig.resolve`` turns ``AUTO`` into
what this machine gets. Nothing past this module sees a sentinel.
"""

from __future__ import annotations

import dataclasses
import enum

from common.session_meta import ENDPOINTING_DEFAULT, ENDPOINTING_OFF
from common.settings import TranscriberSettings
from transcriber.endpointing import EndpointConfig
from transcriber.model import FULL_WINDOW, resolve_device
from transcriber.policy import LoadPolicy
from transcriber.streaming import RATE, StreamConfig
from transcriber.vad import VadLevel


class Auto(enum.Enum):
    """A setting left to the worker: resolved from the device in ``WorkerConfig.resolve``."""

    AUTO = "auto"


AUTO = Auto.AUTO

#: ENCODER_TAIL_FRAMES=auto on CPU: 6 s of padding after the audio (docs/benchmarks.md)
AUTO_TAIL_FRAMES_CPU = 600
#: FINAL_ENCODER_TAIL_FRAMES=auto with short-context partials: 10 s of padding; half the
#: final decode time of the full window, +0.3 WER points on 474 words (docs/benchmarks.md)
AUTO_FINAL_TAIL_FRAMES = 1000
#: INFERENCE_THREADS=auto on CPU: two decodes at once do 1.3-1.6x the work of one on this
#: 2-core machine, and a lone decode is as fast as on one lane (docs/benchmarks.md)
AUTO_LANES_CPU = 2
#: BATCH_SIZE=auto on CUDA, where the full window is cheap and batching pays (measured)
AUTO_BATCH_CUDA = 8

# The documented setting values (docs/configuration.md), read only here.
_SETTING_FULL_WINDOW = -1  # ENCODER_TAIL_FRAMES, FINAL_ENCODER_TAIL_FRAMES; below it: auto
_SETTING_AUTO_COUNT = 0  # BATCH_SIZE, INFERENCE_THREADS


def setting_tail(value: int) -> int | Auto:
    """An ENCODER_TAIL_FRAMES-style setting: frames, ``FULL_WINDOW`` (-1) or ``AUTO`` (-2)."""
    if value < _SETTING_FULL_WINDOW:
        return AUTO
    return FULL_WINDOW if value == _SETTING_FULL_WINDOW else value


def setting_count(value: int) -> int | Auto:
    """A BATCH_SIZE-style setting: a count, or ``AUTO`` (0)."""
    return AUTO if value == _SETTING_AUTO_COUNT else value


@dataclasses.dataclass(frozen=True)
class WorkerConfig:
    """What the worker's settings come to on this machine."""

    cuda: bool
    #: sessions' decodes run as one batched model call (1: no batching)
    batch_size: int
    #: decodes that run at once: batch rows, or unbatched CPU lanes (CTranslate2 workers)
    lanes: int
    #: encoder padding for partials, and the model's default (``FULL_WINDOW``: no trimming)
    tail_frames: int
    #: encoder padding for finals while the worker is idle
    final_tail_frames: int

    @classmethod
    def from_settings(cls, s: TranscriberSettings) -> WorkerConfig:
        return cls.resolve(s, resolve_device(s.device, s.compute_type)[0] == "cuda")

    @classmethod
    def resolve(cls, s: TranscriberSettings, cuda: bool) -> WorkerConfig:
        batch = setting_count(s.batch_size)
        if batch is AUTO:  # on a GPU batching pays; on a CPU it measured no faster
            batch = AUTO_BATCH_CUDA if cuda else 1
        threads = setting_count(s.inference_threads)
        if threads is AUTO:
            threads = 1 if cuda else AUTO_LANES_CPU
        tail, final = resolve_tails(s, cuda)
        return cls(cuda=cuda, batch_size=batch, lanes=batch if batch > 1 else threads,
                   tail_frames=tail, final_tail_frames=final)

    def load_policy(self, s: TranscriberSettings) -> LoadPolicy:
        return LoadPolicy(lanes=self.lanes, partial_max_queue=s.partial_max_queue,
                          partial_max_age_s=s.partial_max_age_s,
                          speculate_max_queue=s.speculate_max_queue,
                          short_finals_queue=s.short_finals_queue)


def resolve_tails(s: TranscriberSettings, cuda: bool) -> tuple[int, int]:
    """(encoder tail frames for partials, for finals), with the automatic values resolved."""
    tail = setting_tail(s.encoder_tail_frames)
    if tail is AUTO:
        tail = FULL_WINDOW if cuda else AUTO_TAIL_FRAMES_CPU
    final = setting_tail(s.final_encoder_tail_frames)
    if final is AUTO:  # short context when the partials have it, a little longer
        final = FULL_WINDOW if tail == FULL_WINDOW else max(tail, AUTO_FINAL_TAIL_FRAMES)
    return tail, final


def vad_level(s: TranscriberSettings) -> VadLevel:
    """How a session's VAD input is levelled (``VAD_LEVEL_*``; off at a 0 dB gain)."""
    return VadLevel(s.vad_level_target_db, s.vad_level_max_gain_db, s.vad_level_hold_s)


def stream_config(s: TranscriberSettings, interim: bool,
                  endpointing_ms: int = ENDPOINTING_DEFAULT) -> StreamConfig:
    """The streaming core's configuration for a session (``interim``: it wants partials;
    ``endpointing_ms``: the session's ``endpointing=``, milliseconds of silence that end an
    utterance instead of ``MIN_SILENCE_S`` and the sentence-end ``SHORT_SILENCE_S``, or
    ``ENDPOINTING_OFF``: only ``MAX_UTTERANCE_S``, ``finalize`` and the end end one)."""
    min_silence = int(s.min_silence_s * RATE)
    short_silence = int(s.short_silence_s * RATE)
    if endpointing_ms != ENDPOINTING_DEFAULT:
        short_silence = 0
        min_silence = int(s.max_utterance_s * RATE) if endpointing_ms == ENDPOINTING_OFF \
            else endpointing_ms * RATE // 1000
    return StreamConfig(
        endpoint=EndpointConfig(
            threshold=s.vad_threshold,
            neg_threshold=s.vad_neg_threshold,
            min_silence_samples=min_silence,
            min_speech_samples=int(s.min_speech_s * RATE),
        ),
        pad_samples=int(s.speech_pad_s * RATE),
        partial_interval_samples=int(s.partial_interval_s * RATE),
        max_utterance_samples=int(s.max_utterance_s * RATE),
        prompt_chars=s.prompt_chars,
        interim_results=interim and s.interim_results,
        stable_min_probability=s.stable_min_probability,
        unsure_guard_samples=int(s.stable_unsure_after_s * RATE),
        speculative_samples=int(s.speculative_silence_s * RATE),
        short_silence_samples=short_silence,
        final_context_samples=int(s.final_context_s * RATE),
    )
