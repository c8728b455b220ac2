"""Cross-session batching: concurrent decodes share CTranslate2 calls.

Each session's decode runs faster-whisper's own ``transcribe`` on a thread of
the worker's inference pool. ``BatchingWhisper`` replaces the CTranslate2
model under it (``WhisperModel.model``): ``encode``, ``generate`` and
``align`` calls from the decode threads wait in a queue, and one dispatcher
thread runs every compatible waiting call as a single batched call, then hands
each thread its rows. faster-whisper's decoding logic (prompts, temperature
fallback, timestamp splitting, word alignment) runs unchanged per session;
only the model calls are shared.

When to run a batch: as soon as every decode in progress is waiting on a model
call (nothing more can join), or ``wait_s`` after the oldest call arrived,
whichever is first. A lone decode therefore never waits. Only calls whose rows
have the same shape (and, for ``generate``, the same prompt layout and options)
share a batch, so every session gets exactly the result it would get alone
(tested). Encoder outputs stay
as numpy rows on the host between calls, so rows from different batches can be
regrouped (on CUDA the encoder's output comes back with ``to_cpu``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EncoderRows:
    """Encoder output of one caller: ``rows`` x frames x width, kept on the host."""

    array: np.ndarray

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)


@dataclasses.dataclass
class _Call:
    op: str             # "encode" | "generate" | "align"
    key: str            # calls with equal op and key can share one batch
    rows: np.ndarray    # features (encode) or encoder output rows
    args: dict[str, Any]
    future: Future[Any]
    born: float


class BatchingWhisper:
    """Stands in for a ``ctranslate2.models.Whisper``; batches calls from many threads."""

    def __init__(self, model: Any, max_batch: int = 8, wait_s: float = 0.01,
                 on_batch: Callable[[str, int], None] | None = None) -> None:
        self._model = model
        self.max_batch = max(1, max_batch)
        self.wait_s = wait_s
        self.on_batch = on_batch
        self._lock = threading.Condition()
        self._pending: list[_Call] = []
        self._active = 0  # decodes in progress (they may still join a batch)
        self._closed = False
        self._thread = threading.Thread(target=self._dispatch, name="batcher", daemon=True)
        self._thread.start()

    # -------------------------------------------------------------- the model's surface

    def __getattr__(self, name: str) -> Any:  # is_multilingual, device, n_mels, ...
        return getattr(self._model, name)

    @contextlib.contextmanager
    def decoding(self) -> Iterator[None]:
        """Marks a decode in progress: the dispatcher waits (briefly) for its calls."""
        with self._lock:
            self._active += 1
        try:
            yield
        finally:
            with self._lock:
                self._active -= 1
                self._lock.notify_all()

    def encode(self, features: Any, to_cpu: bool = False) -> EncoderRows:
        rows = np.asarray(features)
        # equal input lengths only: padding a short-context input would change its encoding
        return self._submit("encode", repr(rows.shape[1:]), rows, {})

    def generate(self, encoder_output: EncoderRows, prompts: list[list[int]],
                 **kwargs: Any) -> list[Any]:
        # CTranslate2 batches only prompts whose start-of-transcript token sits at the same
        # position: equal prompt lengths (the decoder trims prompts to a fixed token count)
        key = repr((encoder_output.shape[1:], [len(p) for p in prompts], sorted(kwargs.items())))
        return self._submit("generate", key, encoder_output.array,
                            {"prompts": prompts, "kwargs": kwargs})

    def align(self, encoder_output: EncoderRows, start_sequence: list[int],
              text_tokens: list[list[int]], num_frames: int | list[int],
              **kwargs: Any) -> list[Any]:
        n = len(encoder_output.array)
        frames = list(num_frames) if isinstance(num_frames, (list, tuple)) else [num_frames] * n
        key = repr((encoder_output.shape[1:], start_sequence, sorted(kwargs.items())))
        return self._submit("align", key, encoder_output.array,
                            {"start": start_sequence, "tokens": text_tokens,
                             "frames": frames, "kwargs": kwargs})

    def detect_language(self, encoder_output: EncoderRows, **kwargs: Any) -> Any:
        return self._direct(lambda: self._model.detect_language(
            self._storage(encoder_output.array), **kwargs))

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._lock.notify_all()

    # -------------------------------------------------------------- dispatching

    def _submit(self, op: str, key: str, rows: np.ndarray, args: dict[str, Any]) -> Any:
        call = _Call(op, key, rows, args, Future(), time.monotonic())
        with self._lock:
            self._pending.append(call)
            self._lock.notify_all()
        return call.future.result()

    def _direct(self, fn: Callable[[], Any]) -> Any:
        """Run a rare, unbatched call on the dispatcher thread (one model user at a time)."""
        call = _Call("direct", "", np.empty(0), {"fn": fn}, Future(), time.monotonic())
        with self._lock:
            self._pending.append(call)
            self._lock.notify_all()
        return call.future.result()

    def _take(self) -> list[_Call] | None:
        with self._lock:
            while True:
                if self._closed:
                    return None
                if self._pending:
                    first = self._pending[0]
                    same = [c for c in self._pending if (c.op, c.key) == (first.op, first.key)]
                    waited = time.monotonic() - first.born
                    ready = (first.op == "direct" or len(same) >= self.max_batch
                             or len(self._pending) >= self._active or waited >= self.wait_s)
                    if ready:
                        batch = [first] if first.op == "direct" else same[:self.max_batch]
                        for c in batch:
                            self._pending.remove(c)
                        return batch
                    self._lock.wait(self.wait_s - waited)
                else:
                    self._lock.wait()

    def _dispatch(self) -> None:
        while (batch := self._take()) is not None:
            try:
                results = self._run(batch)
            except BaseException as exc:  # every waiting thread gets the error, not a hang
                for c in batch:
                    c.future.set_exception(exc)
                continue
            for c, r in zip(batch, results, strict=True):
                c.future.set_result(r)
            if self.on_batch is not None:
                self.on_batch(batch[0].op, sum(len(c.rows) for c in batch))

    def _storage(self, array: np.ndarray) -> Any:
        import ctranslate2

        return ctranslate2.StorageView.from_array(np.ascontiguousarray(array))

    def _run(self, batch: list[_Call]) -> list[Any]:
        op = batch[0].op
        if op == "direct":
            return [batch[0].args["fn"]()]
        counts = [len(c.rows) for c in batch]
        if op == "encode":
            stacked = np.concatenate([c.rows for c in batch], axis=0)
            out = self._model.encode(self._storage(stacked),
                                     to_cpu=self._model.device == "cuda")
            host = np.array(out)  # copy: the storage is freed with ``out``
            return [EncoderRows(np.ascontiguousarray(s))
                    for s in np.split(host, np.cumsum(counts)[:-1])]
        features = self._storage(np.concatenate([c.rows for c in batch], axis=0))
        if op == "generate":
            prompts = [p for c in batch for p in c.args["prompts"]]
            flat = list(self._model.generate(features, prompts, **batch[0].args["kwargs"]))
        else:
            tokens = [t for c in batch for t in c.args["tokens"]]
            frames = [f for c in batch for f in c.args["frames"]]
            flat = list(self._model.align(features, batch[0].args["start"], tokens, frames,
                                          **batch[0].args["kwargs"]))
        out, at = [], 0
        for n in counts:
            out.append(flat[at:at + n])
            at += n
        return out


def enable_batching(whisper: Any, max_batch: int, wait_s: float,
                    on_batch: Callable[[str, int], None] | None = None) -> BatchingWhisper:
    """Put a ``BatchingWhisper`` under a faster-whisper ``WhisperModel`` (idempotent)."""
    if isinstance(whisper.model, BatchingWhisper):
        return whisper.model
    whisper.model = BatchingWhisper(whisper.model, max_batch, wait_s, on_batch)
    return whisper.model
