"""Inference for one worker: its one model (loaded once), the VAD, the threads they run on,
and the decode gate every Whisper decode passes.

A worker serves one model under one name (``served_name``) and takes only the sessions that
ask for that name (the model's own work queue): it never loads another model for a session.

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
from transcriber.model import WhisperDecoder, load_whisper, served_name
from transcriber.speakers import Embedder, load_embedder
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
               shown: Sequence[str] = (), speculative: bool = False,
               prefix: str = "", context: int = 0) -> list[Word]:
        if self.gate is None:
            return self._timed(audio, prompt, final, shown, prefix, context)
        asked = time.perf_counter()
        with self.gate.lane(DecodeGate.PARTIAL if not final else
                            DecodeGate.SPECULATIVE if speculative else DecodeGate.FINAL,
                            self.share):
            self.metrics.decode_wait_seconds.labels(
                "partial" if not final else "speculative" if speculative else "final").observe(
                time.perf_counter() - asked)
            return self._timed(audio, prompt, final, shown, prefix, context)

    def _timed(self, audio: np.ndarray, prompt: str, final: bool,
               shown: Sequence[str], prefix: str = "", context: int = 0) -> list[Word]:
        began = time.perf_counter()
        redos = dict(self.decoder.redos)
        try:
            return self.decoder.decode(audio, prompt, final, shown, prefix=prefix,
                                       context=context)
        finally:
            self.metrics.decode_seconds.labels("final" if final else "partial").observe(
                time.perf_counter() - began)
            for reason, n in self.decoder.redos.items():
                if n > redos.get(reason, 0):
                    self.metrics.full_window_redos.labels(reason).inc(n - redos.get(reason, 0))


class Inference:
    """The worker's model, VAD, inference threads and decode gate."""

    def __init__(self, settings: TranscriberSettings, config: WorkerConfig,
                 metrics: WorkerMetrics, model: Any = None, vad: SileroVad | None = None) -> None:
        self.settings = settings
        self.config = config
        self.metrics = metrics
        self.model = model  # the worker's one model (STT_MODEL_PATH)
        #: the name it is served under (STT_MODEL): the sessions this worker takes ask for it
        self.model_name = served_name(settings.model, settings.served_model)
        self.device = "cuda" if config.cuda else "cpu"
        self.vad = vad
        self.gate = DecodeGate(config.lanes)
        # a thread for each session's core call and one for its detached partial (and for
        # loading the model): only decodes queue, at the gate
        self.executor = ThreadPoolExecutor(max_workers=2 * settings.capacity + config.lanes,
                                           thread_name_prefix="inference")

    def embedder(self) -> Embedder:
        """The speaker encoder (``diarize``), loaded on first use: a worker whose sessions
        never ask for speakers never imports torch for it."""
        return load_embedder(self.device)

    def load(self) -> None:
        if self.model is None:
            self.model = self._load_whisper(self.settings.model, self.config.tail_frames)
        if self.vad is None:
            self.vad = SileroVad()
        if self.settings.diarize_preload:
            self.embedder()

    @property
    def loaded(self) -> bool:
        return self.model is not None and self.vad is not None

    def _load_whisper(self, name: str, tail_frames: int) -> Any:
        s, batch = self.settings, self.config.batch_size
        return load_whisper(name, s.device, s.compute_type, s.cpu_threads, tail_frames,
                            max_batch=batch, batch_wait_s=s.batch_wait_ms / 1000.0,
                            on_batch=lambda op, rows: self.metrics.batch_rows.labels(op)
                            .observe(rows),
                            num_workers=1 if batch > 1 else self.config.lanes,
                            device_index=s.device_index)

    def decoder(self, model: Any, language: str, share: str,
                keyterms: Sequence[str] = (), context: str = "") -> TimedDecoder:
        """A session's decoder for ``model``; ``share``: whose decodes (the gate's fairness);
        ``keyterms``/``context``: the session's keyterm= and prompt= (``set_bias``)."""
        s = self.settings
        whisper = WhisperDecoder.from_settings(model, language, s, self.config.final_tail_frames)
        if keyterms or context:
            whisper.set_bias(keyterms, context, s.keyterm_tokens)
        return TimedDecoder(whisper, self.metrics, self.gate, share)

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
