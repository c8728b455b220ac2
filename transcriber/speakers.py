"""Speaker labels for ``diarize=true``: who said each word, decided online, one final at a time.

A final's speech (its words' span) is cut into overlapping windows (``window_s`` long,
``hop_s`` apart); each window gets a speaker embedding (resemblyzer's voice encoder, whose
weights ship inside its wheel). Where the windows before and after a point differ enough
(``change_threshold``), the utterance is split between two speakers, at the widest pause
between words near that point. Each stretch of one speaker is then matched against the
session's speakers (``SpeakerTracker``: one centroid per speaker, the duration-weighted mean
of the embeddings given to it): at ``threshold`` cosine similarity or above it is the most
similar speaker, below it for all of them a new one (up to ``max_speakers``).

The tracker's state is small (a sum and a weight per speaker) and is committed with each
final (``pack``/``unpack``), so a worker that takes a session over, or a replay of its
audio from the commit point, labels with the same speakers. Partials carry a provisional
label: the speaker most like the last window, nothing updated.

No I/O here; the embedder is injected (a fake in the unit tests), and the real one is
loaded by the worker on the first session that asks for speakers (``load_embedder``).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import math
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import msgpack
import numpy as np

from common.messages import Word

RATE = 16000
#: Words are labelled by their middle; a pause wider than this next to an estimated speaker
#: change is where the change goes (seconds either side of the estimate).
SNAP_S = 0.6
#: Speech shorter than this is not embedded (too little voice to say whose it is).
MIN_EMBED_S = 0.3
#: Extra audio kept either side of the words' span when embedding (seconds).
EDGE_S = 0.1
#: Window embeddings of the open utterance kept for its final (one 25 s utterance at the
#: default hop has 60).
MAX_WINDOWS_KEPT = 512


class Embedder(Protocol):
    def embed(self, audio: np.ndarray, spans: Sequence[tuple[int, int]]) -> np.ndarray:
        """L2-normalised speaker embeddings, one row per ``(start, end)`` sample span of
        ``audio`` (float32, 16 kHz)."""


@dataclasses.dataclass(frozen=True)
class SpeakerConfig:
    threshold: float = 0.7
    max_speakers: int = 8
    window_s: float = 1.6
    hop_s: float = 0.4
    change_threshold: float = 0.65
    min_turn_s: float = 1.0
    min_new_s: float = 1.0

    @classmethod
    def from_settings(cls, s: Any) -> SpeakerConfig:
        return cls(threshold=s.diarize_threshold, max_speakers=s.diarize_max_speakers,
                   window_s=s.diarize_window_s, hop_s=s.diarize_hop_s,
                   change_threshold=s.diarize_change_threshold,
                   min_turn_s=s.diarize_min_turn_s, min_new_s=s.diarize_min_new_s)


def _unit(v: np.ndarray) -> np.ndarray:
    norm = float(np.linalg.norm(v))
    return v / norm if norm > 0 else v


class SpeakerTracker:
    """A session's speakers: online clustering of embeddings against their centroids."""

    def __init__(self, threshold: float = 0.7, max_speakers: int = 8, min_new_s: float = 1.0,
                 sums: np.ndarray | None = None, weights: Sequence[float] = ()) -> None:
        self.threshold = threshold
        self.max_speakers = max(1, max_speakers)
        self.min_new_s = min_new_s
        self.sums = np.zeros((0, 0), np.float32) if sums is None else sums.astype(np.float32)
        self.weights = [float(w) for w in weights]

    @classmethod
    def from_config(cls, config: SpeakerConfig, raw: bytes = b"") -> SpeakerTracker:
        """A session's tracker, restored from its committed state (``raw``, or none yet)."""
        tracker = cls(config.threshold, config.max_speakers, config.min_new_s)
        if raw:
            obj = msgpack.unpackb(raw)
            dim = int(obj["d"])
            tracker.sums = np.frombuffer(obj["s"], "<f4").reshape(-1, dim).copy() if dim \
                else np.zeros((0, 0), np.float32)
            tracker.weights = [float(w) for w in obj["w"]]
        return tracker

    def pack(self) -> bytes:
        """The state to commit with a final (a few KB: 256 floats per speaker)."""
        dim = self.sums.shape[1] if len(self.weights) else 0
        return msgpack.packb({"d": dim, "s": self.sums.astype("<f4").tobytes(),
                              "w": self.weights})

    def copy(self) -> SpeakerTracker:
        return SpeakerTracker(self.threshold, self.max_speakers, self.min_new_s,
                              self.sums.copy(), self.weights)

    @property
    def count(self) -> int:
        return len(self.weights)

    def centroids(self) -> np.ndarray:
        if not self.weights:
            return np.zeros((0, 0), np.float32)
        norms = np.linalg.norm(self.sums, axis=1, keepdims=True)
        return self.sums / np.maximum(norms, 1e-12)

    def similarities(self, emb: np.ndarray) -> np.ndarray:
        return self.centroids() @ emb if self.weights else np.zeros(0, np.float32)

    def match(self, emb: np.ndarray, seconds: float) -> int:
        """The speaker of ``seconds`` of speech with embedding ``emb``, nothing changed: the
        most similar at ``threshold`` or above, else a new one (``count``), unless the
        session has ``max_speakers`` already or the speech is shorter than ``min_new_s``."""
        sims = self.similarities(emb)
        if not len(sims):
            return 0
        best = int(np.argmax(sims))
        if sims[best] >= self.threshold or self.count >= self.max_speakers or \
                seconds < self.min_new_s:
            return best
        return self.count

    def add(self, speaker: int, emb: np.ndarray, seconds: float) -> None:
        weight = max(seconds, 1e-3)
        if speaker == self.count:
            row = (emb * weight).astype(np.float32)[None, :]
            self.sums = row if not self.count else np.vstack([self.sums, row])
            self.weights.append(weight)
        else:
            self.sums[speaker] += (emb * weight).astype(np.float32)
            self.weights[speaker] += weight

    def assign(self, emb: np.ndarray, seconds: float) -> int:
        """``match``, then the speaker's centroid takes the embedding in."""
        speaker = self.match(emb, seconds)
        self.add(speaker, emb, seconds)
        return speaker


def window_spans(n: int, window: int, hop: int, offset: int = 0) -> list[tuple[int, int]]:
    """Windows of ``window`` samples over ``n`` samples: the first at 0, the last ending at
    ``n``, between them every ``hop`` on a grid of the session's samples (``offset`` is
    sample 0's place in the session: windows keep their place when the speech's edges
    move, and are embedded once); one window of everything when ``n`` is at most
    ``window``."""
    if n <= window:
        return [(0, n)]
    first = -(-offset // hop) * hop - offset  # the first grid point at or after sample 0
    starts = sorted({0, *range(first, n - window, hop), n - window})
    return [(s, s + window) for s in starts]


def change_points(embs: np.ndarray, min_windows: int, threshold: float) -> list[int]:
    """Window indices where the speaker changes: recursive binary segmentation, each side of
    a change at least ``min_windows`` long and their mean embeddings' similarity below
    ``threshold``."""
    def split(a: int, b: int) -> list[int]:
        if b - a < 2 * min_windows:
            return []
        best, best_sim = -1, threshold
        for c in range(a + min_windows, b - min_windows + 1):
            sim = float(_unit(embs[a:c].mean(0)) @ _unit(embs[c:b].mean(0)))
            if sim < best_sim:
                best, best_sim = c, sim
        if best < 0:
            return []
        return [*split(a, best), best, *split(best, b)]

    return split(0, len(embs))


def crossing(embs: np.ndarray, spans: Sequence[tuple[int, int]], a: int, c: int, b: int
             ) -> float:
    """Where (in samples) the voice of windows ``a:c`` gives way to that of ``c:b``: the
    point where a window would be as like one side as the other (a window that straddles
    the change is a mix of both), interpolated between the centres of the windows either
    side of it."""
    left, right = _unit(embs[a:c].mean(0)), _unit(embs[c:b].mean(0))
    lean = embs[a:b] @ left - embs[a:b] @ right  # > 0: more like the left side
    centres = [(s + e) / 2 for s, e in spans[a:b]]
    for i in range(1, len(lean)):
        if lean[i - 1] > 0 >= lean[i]:
            share = lean[i - 1] / (lean[i - 1] - lean[i])
            return float(centres[i - 1] + share * (centres[i] - centres[i - 1]))
    return (spans[c - 1][0] + spans[c][1]) / 2  # between the two windows either side


class SpeakerLabeler:
    """One session's labelling: the embedder (shared by the worker) and its tracker."""

    def __init__(self, embedder: Embedder, config: SpeakerConfig,
                 tracker: SpeakerTracker | None = None) -> None:
        self.embedder = embedder
        self.config = config
        self.tracker = tracker or SpeakerTracker.from_config(config)
        self.window = max(1, round(config.window_s * RATE))
        self.hop = max(1, round(config.hop_s * RATE))
        #: the open utterance's window embeddings by absolute sample span: made at each
        #: pause (``prepare``), so a final embeds only the windows no pause reached
        self._windows: dict[tuple[int, int], np.ndarray] = {}

    def pack(self) -> bytes:
        return self.tracker.pack()

    def _embed(self, audio: np.ndarray, origin_s: float, spoken: Sequence[Word]
               ) -> tuple[float, list[tuple[int, int]], np.ndarray] | None:
        """The windows over the words' speech (seconds of the first, their sample spans
        from there) and their embeddings; None when there is too little speech."""
        lo = max(0, round((spoken[0].start - EDGE_S - origin_s) * RATE))
        hi = min(len(audio), round((spoken[-1].end + EDGE_S - origin_s) * RATE))
        if hi - lo < MIN_EMBED_S * RATE:  # too little: the whole utterance's audio
            lo, hi = 0, len(audio)
        if hi - lo < MIN_EMBED_S * RATE:
            return None
        speech = audio[lo:hi]
        at = round(origin_s * RATE) + lo
        spans = window_spans(len(speech), self.window, self.hop, at)
        keys = [(at + s, at + e) for s, e in spans]
        missing = [i for i, k in enumerate(keys) if k not in self._windows]
        if missing:
            if len(self._windows) + len(missing) > MAX_WINDOWS_KEPT:
                self._windows.clear()
            for i, emb in zip(missing, self.embedder.embed(speech, [spans[i] for i in missing]),
                              strict=True):
                self._windows[keys[i]] = emb
        return origin_s + lo / RATE, spans, np.stack([self._windows[k] for k in keys])

    def prepare(self, audio: np.ndarray, origin_s: float, words: Sequence[Word]) -> None:
        """Embed ahead, at a pause that may end the utterance (with its speculative final's
        words): the final then embeds only what came after (its last window), so the
        encoder's time is hardly added to the time to final, and a long utterance with
        many pauses embeds each window once."""
        spoken = [w for w in words if w.word.strip()]
        if spoken:
            self._embed(audio, origin_s, spoken)

    def label(self, audio: np.ndarray, origin_s: float,
              words: Sequence[Word]) -> tuple[list[Word], int | None]:
        """``words`` with their speakers, and the final's speaker (who spoke longest);
        ``audio`` (float32) begins at ``origin_s`` seconds and holds the words. Windows
        ``prepare`` embedded already are not embedded again."""
        spoken = [w for w in words if w.word.strip()]
        embedded = self._embed(audio, origin_s, spoken) if spoken else None
        self._windows.clear()  # the utterance is done
        if embedded is None:
            return list(words), None
        start_s, spans, embs = embedded
        min_windows = max(1, math.ceil(self.config.min_turn_s / self.config.hop_s))
        cuts = change_points(embs, min_windows, self.config.change_threshold) \
            if len(spans) > 1 else []
        bounds = [0, *cuts, len(spans)]
        # where each change is, in seconds, moved to the widest pause between words near there
        changes = [self._snap(start_s + crossing(embs, spans, a, c, b) / RATE, spoken)
                   for a, c, b in zip(bounds, bounds[1:], bounds[2:], strict=False)]
        speakers = []
        for a, b in itertools.pairwise(bounds):
            seconds = (spans[b - 1][1] - spans[a][0]) / RATE
            speakers.append(self.tracker.assign(_unit(embs[a:b].mean(0)), seconds))
        labelled = []
        spoke: dict[int, float] = {}
        for w in words:
            middle = (w.start + w.end) / 2
            speaker = speakers[sum(1 for t in changes if middle >= t)]
            labelled.append(dataclasses.replace(w, speaker=speaker))
            if w.word.strip():
                spoke[speaker] = spoke.get(speaker, 0.0) + max(w.end - w.start, 0.01)
        return labelled, max(spoke, key=lambda k: spoke[k])

    @staticmethod
    def _snap(t: float, words: Sequence[Word]) -> float:
        """The middle of the widest pause between words within ``SNAP_S`` of ``t`` (of
        equally wide ones the nearest; with none there, the word boundary nearest to it)."""
        gaps = [(b.start - a.end, (a.end + b.start) / 2) for a, b in itertools.pairwise(words)]
        near = [g for g in gaps if abs(g[1] - t) <= SNAP_S]
        if near:  # the widest (to 10 ms), then the nearest
            return max(near, key=lambda g: (round(g[0], 2), -abs(g[1] - t)))[1]
        if gaps:
            return min(gaps, key=lambda g: abs(g[1] - t))[1]
        return t

    def provisional(self, audio: np.ndarray, tracker: SpeakerTracker) -> int | None:
        """Who seems to speak at the end of ``audio`` (the open utterance so far), against a
        snapshot of the session's speakers; nothing is updated."""
        if len(audio) < MIN_EMBED_S * RATE:
            return None
        tail = audio[-self.window:]
        emb = self.embedder.embed(tail, [(0, len(tail))])[0]
        return tracker.match(emb, len(tail) / RATE)


def encoder_weights_path() -> Path:
    """resemblyzer's pretrained voice encoder inside its installed wheel, found without
    importing the package (its ``__init__`` imports webrtcvad, which needs the removed
    ``pkg_resources``, and silence trimming this service does not use)."""
    spec = importlib.util.find_spec("resemblyzer")
    if spec is None or spec.origin is None:
        raise RuntimeError("the resemblyzer package is not installed (pip install resemblyzer)")
    path = Path(spec.origin).parent / "pretrained.pt"
    if not path.is_file():
        raise RuntimeError(f"resemblyzer's voice encoder weights missing at {path}")
    return path


class ResemblyzerEmbedder:
    """resemblyzer's voice encoder: a 3-layer LSTM over 40 mel bands (power, 25 ms windows
    every 10 ms) whose last state, through a linear layer and a ReLU, L2-normalised, is the
    embedding; the same network as ``resemblyzer.VoiceEncoder``, with the weights of its wheel.
    The mel spectrogram is computed once per utterance and cut into the windows."""

    FRAME = 160  # samples per mel frame (10 ms)
    FFT = 400  # 25 ms
    MELS = 40
    HIDDEN = 256
    LAYERS = 3
    TARGET_DBFS = -30.0  # the encoder's training audio was brought up to this level

    def __init__(self, device: str = "cpu", threads: int = 1) -> None:
        import librosa.filters
        import torch
        from torch import nn

        if device == "cpu" and threads > 0:
            torch.set_num_threads(threads)
        self._torch = torch
        # librosa's mel filters (Slaney), the spectrogram in numpy: librosa.feature's first
        # call in a process costs seconds (numba), and it is the same arithmetic (the
        # spectra agree to 1e-7)
        self._filters = librosa.filters.mel(sr=RATE, n_fft=self.FFT, n_mels=self.MELS
                                            ).astype(np.float32)
        self._window = np.hanning(self.FFT + 1)[:-1].astype(np.float32)  # periodic Hann
        self.device = device
        self.lstm = nn.LSTM(self.MELS, self.HIDDEN, self.LAYERS, batch_first=True)
        self.linear = nn.Linear(self.HIDDEN, self.HIDDEN)
        state = torch.load(encoder_weights_path(), map_location="cpu",
                           weights_only=True)["model_state"]
        self.lstm.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("lstm.")})
        self.linear.load_state_dict({k[7:]: v for k, v in state.items()
                                     if k.startswith("linear.")})
        self.lstm.to(device).eval()
        self.linear.to(device).eval()

    def _gain(self, audio: np.ndarray) -> float:
        """The factor that brings ``audio`` up to the training level (never down)."""
        rms = float(np.sqrt(np.mean(np.square(audio)))) if len(audio) else 0.0
        if rms <= 1e-5:
            return 1.0
        return max(1.0, 10 ** ((self.TARGET_DBFS - 20 * math.log10(rms)) / 20))

    def _mel(self, audio: np.ndarray) -> np.ndarray:
        # librosa.feature.melspectrogram(center=True, pad_mode="constant", power=2)
        padded = np.pad(audio.astype(np.float32), self.FFT // 2)
        frames = np.lib.stride_tricks.sliding_window_view(padded, self.FFT)[::self.FRAME]
        power = np.abs(np.fft.rfft(frames * self._window, axis=1)) ** 2
        return (power @ self._filters.T).astype(np.float32)  # (frames, 40)

    def _forward(self, mels: np.ndarray) -> np.ndarray:
        torch = self._torch
        x = torch.from_numpy(mels).to(self.device)
        _, (hidden, _) = self.lstm(x)
        raw = torch.relu(self.linear(hidden[-1]))
        out = raw / torch.clamp(torch.norm(raw, dim=1, keepdim=True), min=1e-12)
        return out.cpu().numpy()

    def embed(self, audio: np.ndarray, spans: Sequence[tuple[int, int]]) -> np.ndarray:
        mel = self._mel(audio.astype(np.float32, copy=False))
        rows: list[np.ndarray | None] = [None] * len(spans)
        by_length: dict[int, list[tuple[int, int]]] = {}
        gains = []  # each window brought to the training level on its own (mel is power: x²)
        for i, (start, end) in enumerate(spans):
            first = min(start // self.FRAME, len(mel) - 1)
            frames = max(1, min(len(mel), end // self.FRAME) - first)
            by_length.setdefault(frames, []).append((i, first))
            gains.append(self._gain(audio[start:end]) ** 2)
        with self._torch.inference_mode():
            for frames, items in by_length.items():
                out = self._forward(np.stack([mel[first:first + frames] * gains[i]
                                              for i, first in items]).astype(np.float32))
                for (i, _), row in zip(items, out, strict=True):
                    rows[i] = row
        return np.stack([r for r in rows if r is not None]).astype(np.float32)


_LOCK = threading.Lock()
_EMBEDDERS: dict[str, ResemblyzerEmbedder] = {}


def load_embedder(device: str = "cpu") -> ResemblyzerEmbedder:
    """The process's one embedder for ``device``, loaded on first use (the worker pays for
    torch and the encoder only once a session asks for speakers)."""
    with _LOCK:
        if device not in _EMBEDDERS:
            _EMBEDDERS[device] = ResemblyzerEmbedder(device)
        return _EMBEDDERS[device]
