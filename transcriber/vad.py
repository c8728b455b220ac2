"""Silero VAD (the ONNX model shipped in the ``silero-vad`` wheel), streaming, state per session.

One ONNX Runtime session is shared by every stream on a worker; each stream
keeps its own recurrent state and 64-sample context, exactly as the
package's own ``OnnxWrapper`` does, so many sessions cost one model.

Silero misses quiet speech that Whisper hears (a hoarse voice 15 dB down peaks near 0.5),
so a stream may hear its windows levelled first (``VadLevel``): each window raised
toward a target level by the loudest window of the last few seconds, boost only. The
decoder always gets the audio as it came; only the speech probabilities change.
"""

from __future__ import annotations

import collections
import dataclasses
import importlib.util
import threading
from pathlib import Path

import numpy as np

from transcriber.endpointing import WINDOW

_CONTEXT = 64  # samples of the previous window prepended at 16 kHz
_RATE = np.array(16000, dtype=np.int64)


@dataclasses.dataclass(frozen=True)
class VadLevel:
    """Level normalisation of the VAD's input (``VAD_LEVEL_*`` settings)."""

    #: dBFS the loudest recent window is raised toward
    target_db: float = -26.0
    #: the most it is raised; 0 turns the levelling off
    max_gain_db: float = 30.0
    #: seconds of windows whose loudest sets the gain
    hold_s: float = 3.0

    @property
    def on(self) -> bool:
        return self.max_gain_db > 0


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

    def stream(self, level: VadLevel | None = None) -> VadStream:
        """A session's stream; ``level``: its input is levelled first (when on)."""
        return VadStream(self, level if level is not None and level.on else None)

    def run(self, chunk: np.ndarray, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with self._lock:
            out, new_state = self._session.run(
                None, {"input": chunk, "state": state, "sr": _RATE})
        return out, new_state


class VadStream:
    """Speech probability per 512-sample window, carrying state between calls."""

    def __init__(self, model: SileroVad, level: VadLevel | None = None) -> None:
        self._model = model
        self._state = np.zeros((2, 1, 128), dtype=np.float32)
        self._context = np.zeros(_CONTEXT, dtype=np.float32)
        self._level = level
        if level is not None:
            self._target = 10 ** (level.target_db / 20)
            self._max_gain = 10 ** (level.max_gain_db / 20)
            #: RMS of the last ``hold_s`` of windows (the loudest sets the gain)
            self._recent: collections.deque[float] = collections.deque(
                maxlen=max(1, round(level.hold_s * 16000 / WINDOW)))

    def gains(self, windows: np.ndarray) -> np.ndarray:
        """The gain each window gets before Silero hears it (1 when not levelled)."""
        if self._level is None:
            return np.ones(len(windows), dtype=np.float32)
        rms = np.sqrt(np.mean(np.square(windows, dtype=np.float64), axis=1))
        out = np.empty(len(windows), dtype=np.float32)
        for i, r in enumerate(rms):
            self._recent.append(float(r))
            out[i] = min(max(self._target / max(max(self._recent), 1e-9), 1.0),
                         self._max_gain)
        return out

    def __call__(self, windows: np.ndarray) -> np.ndarray:
        probs = np.empty(len(windows), dtype=np.float32)
        if self._level is not None and len(windows):
            windows = windows * self.gains(windows)[:, None]
        for i, window in enumerate(windows):
            chunk = np.concatenate([self._context, window.astype(np.float32, copy=False)])
            out, self._state = self._model.run(chunk[None, :], self._state)
            self._context = chunk[-_CONTEXT:]
            probs[i] = float(out[0, 0])
        assert len(windows) == 0 or windows.shape[1] == WINDOW
        return probs
