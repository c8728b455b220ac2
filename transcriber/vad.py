"""Silero VAD (the ONNX model shipped in the ``silero-vad`` wheel), streaming, state per session.

One ONNX Runtime session is shared by every stream on a worker; each stream
keeps its own recurrent state and 64-sample context, exactly as the
package's own ``OnnxWrapper`` does, so many sessions cost one model.
"""

from __future__ import annotations

import importlib.util
import threading
from pathlib import Path

import numpy as np

from transcriber.endpointing import WINDOW

_CONTEXT = 64  # samples of the previous window prepended at 16 kHz
_RATE = np.array(16000, dtype=np.int64)


def silero_model_path() -> Path:
    """The ONNX file inside the installed silero-vad package (found without importing torch)."""
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or spec.origin is None:
        raise RuntimeError("the silero-vad package is not installed")
    path = Path(spec.origin).parent / "data" / "silero_vad.onnx"
    if not path.is_file():
        raise RuntimeError(f"silero-vad ONNX model missing at {path}")
    return path


class SileroVad:
    """The shared model. ``stream()`` makes a per-session callable."""

    def __init__(self, path: Path | None = None) -> None:
        import onnxruntime

        opts = onnxruntime.SessionOptions()
        opts.inter_op_num_threads = 1
        opts.intra_op_num_threads = 1
        self._session = onnxruntime.InferenceSession(
            str(path or silero_model_path()), sess_options=opts,
            providers=["CPUExecutionProvider"],
        )
        self._lock = threading.Lock()

    def stream(self) -> VadStream:
        return VadStream(self)

    def run(self, chunk: np.ndarray, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with self._lock:
            out, new_state = self._session.run(
                None, {"input": chunk, "state": state, "sr": _RATE})
        return out, new_state


class VadStream:
    """Speech probability per 512-sample window, carrying state between calls."""

    def __init__(self, model: SileroVad) -> None:
        self._model = model
        self._state = np.zeros((2, 1, 128), dtype=np.float32)
        self._context = np.zeros(_CONTEXT, dtype=np.float32)

    def __call__(self, windows: np.ndarray) -> np.ndarray:
        probs = np.empty(len(windows), dtype=np.float32)
        for i, window in enumerate(windows):
            chunk = np.concatenate([self._context, window.astype(np.float32, copy=False)])
            out, self._state = self._model.run(chunk[None, :], self._state)
            self._context = chunk[-_CONTEXT:]
            probs[i] = float(out[0, 0])
        assert len(windows) == 0 or windows.shape[1] == WINDOW
        return probs
