"""Inference for one worker: the models (loaded once, a few others on demand), the VAD, the
threads they run on, and the decode gate every Whisper decode passes.

Model inference (VAD and Whisper) runs on a thread pool, never on the event loop: a
session's core call (VAD, decisions, the decodes they need) runs on a thread of its own,
and its Whisper decodes pass a gate of ``lanes`` (CPU lanes, or with batching
(BATCH_SIZE > 1) batch rows, so decodes of different sessions meet in
transcriber.batching). A session's VAD never waits behind other sessions' decodes.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np

from common.messages import Word
from common.metrics import WorkerMetrics
from common.settings import TranscriberSettings
from transcriber.config import WorkerConfig
from transcriber.gate import DecodeGate
from transcriber.model import BUNDLED, FULL_WINDOW, WhisperDecoder, load_whisper
from transcriber.vad import SileroVad

T = TypeVar("T")


class TimedDecoder:
    """Passes the worker's decode gate and observes every decode's duration, by kind."""

    def __init__(self, decoder: WhisperDecoder, metrics: WorkerMetrics,
                 gate: DecodeGate | None = None, share: str = "") -> None:
        """``share``: whose decode this is for the gate's fair share (a principal, or the
        session when it has none)."""
        self.decoder = decoder
        self.metrics = metrics
        self.gate = gate
        self.share = share

    def decode(self, audio: np.ndarray, prompt: str, final: bool,
               shown: Sequence[str] = (), speculative: bool = False) -> list[Word]:
        if self.gate is None:
            return self._timed(audio, prompt, final, shown)
        asked = time.perf_counter()
        with self.gate.lane(DecodeGate.PARTIAL if not final else
                            DecodeGate.SPECULATIVE if speculative else DecodeGate.FINAL,
                            self.share):
            self.metrics.decode_wait_seconds.labels(
                "partial" if not final else "speculative" if speculative else "final").observe(
                time.perf_counter() - asked)
            return self._timed(audio, prompt, final, shown)

    def _timed(self, audio: np.ndarray, prompt: str, final: bool,
               shown: Sequence[str]) -> list[Word]:
        began = time.perf_counter()
        redos = dict(self.decoder.redos)
        try:
            return self.decoder.decode(audio, prompt, final, shown)
        finally:
            self.metrics.decode_seconds.labels("final" if final else "partial").observe(
                time.perf_counter() - began)
            for reason, n in self.decoder.redos.items():
                if n > redos.get(reason, 0):
                    self.metrics.full_window_redos.labels(reason).inc(n - redos.get(reason, 0))


class Inference:
    """The worker's models, VAD, inference threads and decode gate."""

    def __init__(self, settings: TranscriberSettings, config: WorkerConfig,
                 metrics: WorkerMetrics, model: Any = None, vad: SileroVad | None = None) -> None:
        self.settings = settings
        self.config = config
        self.metrics = metrics
        self.model = model  # the worker's own model (STT_MODEL_PATH)
        self.vad = vad
        self._extra: dict[str, Any] = {}  # other models sessions asked for, oldest first
        self.gate = DecodeGate(config.lanes)
        # a thread for each session's core call and one for its detached partial (and for
        # loading models): only decodes queue, at the gate
        self.executor = ThreadPoolExecutor(max_workers=2 * settings.capacity + config.lanes,
                                           thread_name_prefix="inference")

    def load(self) -> None:
        if self.model is None:
            self.model = self._load_whisper(self.settings.model, self.config.tail_frames)
        if self.vad is None:
            self.vad = SileroVad()

    @property
    def loaded(self) -> bool:
        return self.model is not None and self.vad is not None

    def _load_whisper(self, name: str, tail_frames: int) -> Any:
        s, batch = self.settings, self.config.batch_size
        return load_whisper(name, s.device, s.compute_type, s.cpu_threads, tail_frames,
                            max_batch=batch, batch_wait_s=s.batch_wait_ms / 1000.0,
                            on_batch=lambda op, rows: self.metrics.batch_rows.labels(op)
                            .observe(rows),
                            num_workers=1 if batch > 1 else self.config.lanes)

    async def model_for(self, name: str) -> Any:
        """The worker's own model, or another one a session (e.g. a replay) asked for: loaded
        with the full window, at most MAX_EXTRA_MODELS kept (the oldest loaded goes)."""
        own = {"", self.settings.model} | ({BUNDLED} if self.settings.model in ("", BUNDLED)
                                           else set())
        if name in own:
            return self.model
        if name in self._extra:
            return self._extra[name]
        model = await self.run(self._load_whisper, name, FULL_WINDOW)
        while self._extra and len(self._extra) >= self.settings.max_extra_models:
            self._extra.pop(next(iter(self._extra)))
        if self.settings.max_extra_models > 0:  # 0: loaded for this session, never kept
            self._extra[name] = model
        return model

    def decoder(self, model: Any, language: str, share: str) -> TimedDecoder:
        """A session's decoder for ``model``; ``share``: whose decodes (the gate's fairness)."""
        s = self.settings
        return TimedDecoder(
            WhisperDecoder(model, language, s.beam_size, s.partial_beam_size, s.prompt_tokens,
                           s.encoder_min_frames,
                           self.config.final_tail_frames if model is self.model else None,
                           s.final_retry_probability),
            self.metrics, self.gate, share)

    @property
    def busy(self) -> int:
        """Decodes waiting at the gate or running (all sessions share the lanes)."""
        return self.gate.active

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn`` on an inference thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, functools.partial(fn, *args, **kwargs))

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
