"""A multichannel session's cores: one ``StreamingTranscriber`` per channel. No I/O.

The session's audio stream holds the channels interleaved (``AudioFrame.channels``), on one
timeline. ``ChannelCores`` splits what arrives into each channel's samples (a channel that
resumed further on skips what it has heard), and merges what the channels emit into one
list in time order, so the session's one ``seq`` interleaves the channels as they spoke.
Each channel keeps its own VAD, endpointing, partials, finals, utterance numbers, prompt
and commit point (``ChannelPoint`` in the session record): a takeover continues every
channel from its own point, and re-reads the audio from the earliest of them.

The pump (``session.py``) runs the channels' calls on separate inference threads at once,
so their decodes meet at the decode gate and, with batching on, in one model call
(``transcriber/batching.py``); ``feed`` here runs them one after another (the same split
and merge: for tests).
"""

from __future__ import annotations

import dataclasses
import heapq
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.signal import lfilter

from common.messages import Partial, Word
from transcriber.streaming import RATE, Committed, Event, PartialJob, StreamingTranscriber


@dataclasses.dataclass(frozen=True)
class ChannelPartials:
    """The partial decodes due on several channels at once, as one detached job (the pump
    runs one detached partial at a time); ``run_each`` decodes them on parallel threads."""

    jobs: tuple[PartialJob, ...]

    def run(self) -> list[list[Word]]:
        return [job.run() for job in self.jobs]


def _when(ev: Event) -> float:
    """Where on the timeline an event was decided: a final at its commit point, a partial
    at the audio it had heard."""
    if isinstance(ev, Committed):
        return ev.commit_sample / RATE
    if isinstance(ev, Partial):
        return ev.end
    return ev.position / RATE


class CrosstalkGate:
    """Silences a channel where it only carries another channel's bleed: where its energy
    (a running mean of the squared samples, time constant ``ENVELOPE_S``) is ``db`` or
    more below the loudest channel's, and has been for ``HOLD_S`` (a channel stays open
    that long after it was last loud enough, so the quiet ends and onsets of its own words
    are kept). Bleed is a scaled copy: its energy stays ``db`` below at any time constant,
    so a short one reacts to a word's onset without letting bleed through. Each sample's
    decision depends only on the samples before it, never on how the audio was chunked
    (the filter's state and the last open sample carry over)."""

    ENVELOPE_S = 0.01
    HOLD_S = 0.15

    def __init__(self, channels: int, db: float) -> None:
        self.ratio = 10.0 ** (-db / 10.0)
        self.decay = math.exp(-1.0 / (self.ENVELOPE_S * RATE))
        self.hold = int(self.HOLD_S * RATE)
        self._state = np.zeros((1, channels))
        self._at = 0  # samples seen
        self._last = np.full(channels, -(1 << 40), dtype=np.int64)  # last loud-enough sample

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        """(frames, channels) int16 → the same, bleed set to zero."""
        n = len(frames)
        if n == 0:
            return frames
        x = frames.astype(np.float64) / 32768.0
        env, self._state = lfilter([1.0 - self.decay], [1.0, -self.decay], x * x, axis=0,
                                   zi=self._state)
        loud = env >= env.max(axis=1, keepdims=True) * self.ratio
        at = np.arange(self._at, self._at + n, dtype=np.int64)[:, None]
        last = np.maximum.accumulate(
            np.vstack([self._last[None, :], np.where(loud, at, -(1 << 40))]), axis=0)[1:]
        self._last = last[-1]
        self._at += n
        return np.where(at - last <= self.hold, frames, 0).astype(np.int16)


class ChannelCores:
    """The cores of one multichannel session, with the interface the pump uses;
    ``crosstalk_db`` (0: off) silences a channel's bleed of the others (``CrosstalkGate``)."""

    def __init__(self, cores: Sequence[StreamingTranscriber], crosstalk_db: float = 0.0
                 ) -> None:
        self.cores = list(cores)
        self.width = len(self.cores)
        #: samples (per channel) of the session's timeline received: from the earliest
        #: channel's commit point on
        self.position = min(core.position for core in self.cores)
        self.gate = CrosstalkGate(self.width, crosstalk_db) if crosstalk_db > 0 else None

    # ------------------------------------------------------------------ what the pump reads

    @property
    def utterance(self) -> int:
        """Utterances finalised, all channels together."""
        return sum(core.utterance for core in self.cores)

    @property
    def open_utterance_start(self) -> int | None:
        starts = [s for core in self.cores if (s := core.open_utterance_start) is not None]
        return min(starts) if starts else None

    @property
    def commit_sample(self) -> int:
        """Where every channel has committed: the audio before it is done for all of them."""
        return min(core.commit_sample for core in self.cores)

    def channel(self, index: int | None) -> StreamingTranscriber:
        return self.cores[index or 0]

    # ------------------------------------------------------------------ audio in

    def split(self, pcm: np.ndarray) -> list[np.ndarray]:
        """Interleaved samples (int16, ``width`` channels) from ``position`` on → each
        channel's samples it has not heard yet."""
        frames = pcm.reshape(-1, self.width)
        if self.gate is not None:
            frames = self.gate(frames)
        out = []
        for c, core in enumerate(self.cores):
            skip = max(0, core.position - self.position)
            out.append(np.ascontiguousarray(frames[skip:, c]))
        self.position += len(frames)
        return out

    def merge(self, emitted: Sequence[list[Event]]) -> list[Event]:
        """The channels' events in time order (each channel's own order kept); their
        detached partial decodes as one ``ChannelPartials`` at the end."""
        jobs = [ev for events in emitted for ev in events if isinstance(ev, PartialJob)]
        streams = [[ev for ev in events if not isinstance(ev, PartialJob)]
                   for events in emitted]
        merged: list[Any] = list(heapq.merge(*streams, key=_when))
        if jobs:
            merged.append(ChannelPartials(tuple(jobs)))
        return merged

    def feed(self, pcm: np.ndarray, **kwargs: bool) -> list[Event]:
        parts = self.split(pcm)
        return self.merge([core.feed(part, **kwargs) if len(part) else []
                           for core, part in zip(self.cores, parts, strict=True)])

    def finalize(self) -> list[Event]:
        return self.merge([core.finalize() for core in self.cores])

    def finish(self) -> list[Event]:
        return self.merge([core.finish() for core in self.cores])

    def partial_done(self, job: ChannelPartials, words: Sequence[list[Word]]) -> list[Partial]:
        out = []
        for one, heard in zip(job.jobs, words, strict=True):
            partial = self.channel(one.channel).partial_done(one, heard)
            if partial is not None:
                out.append(partial)
        return out
