"""Compressed audio for closed sessions: the codec step of compaction (I/O free).

A session's audio stream holds 16 kHz mono int16 in stream entries: about 38 KB per
second of audio in Redis (139 MB per audio-hour). Once the session is closed nothing is
appended any more, and the stream is replaced by one compressed blob (``Sessions.compact``;
key ``stt:{sid}:audio.z``). Two codecs, through maintained libraries:

* ``opus`` (default, lossy): Opus in Ogg through PyAV (libopus), ``COMPACT_OPUS_BITRATE``
  bits per second (24 kbps: 10.8 MB per audio-hour); decoded back to 16 kHz and cut or padded
  to the exact sample count, so offsets and durations stay exact; the samples are close,
  not identical (docs/storage.md has the WER of re-transcription, raw vs compacted).
* ``flac`` (lossless): FLAC through libsndfile (``soundfile``): sample-identical; about
  half the raw size for speech.

Both are encoded incrementally (``Encoder.feed`` chunk by chunk: memory is one chunk, not
the session) and decoded incrementally (``decode`` yields chunks).
"""

from __future__ import annotations

import io
from collections.abc import Iterator

import av
import numpy as np
import soundfile as sf
import soxr

from common.audio import TARGET_RATE

CODECS = ("opus", "flac")
#: Samples per decoded chunk (one second).
CHUNK = TARGET_RATE
#: libopus's own rate: its decoder gives 48 kHz, resampled to 16 kHz here.
OPUS_RATE = 48000


class Encoder:
    """Feed int16 chunks, then ``finish()`` for the encoded bytes."""

    def __init__(self, codec: str, opus_bitrate: int = 24000) -> None:
        if codec not in CODECS:
            raise ValueError(f"unknown codec {codec!r}: one of {', '.join(CODECS)}")
        self.codec = codec
        self.samples = 0
        self._out = io.BytesIO()
        if codec == "flac":
            self._flac = sf.SoundFile(self._out, "w", TARGET_RATE, 1, "PCM_16", format="FLAC")
        else:
            self._container = av.open(self._out, "w", format="ogg")
            self._stream = self._container.add_stream("libopus", rate=TARGET_RATE)
            self._stream.bit_rate = opus_bitrate
            self._stream.layout = "mono"
            self._stream.options = {"application": "voip"}

    def feed(self, pcm: np.ndarray) -> None:
        pcm = np.asarray(pcm, dtype=np.int16)
        if not len(pcm):
            return
        self.samples += len(pcm)
        if self.codec == "flac":
            self._flac.write(pcm)
            return
        frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = TARGET_RATE
        for packet in self._stream.encode(frame):
            self._container.mux(packet)

    def finish(self) -> bytes:
        if self.codec == "flac":
            self._flac.close()
        else:
            for packet in self._stream.encode(None):
                self._container.mux(packet)
            self._container.close()
        return self._out.getvalue()


def encode(pcm: np.ndarray, codec: str, opus_bitrate: int = 24000) -> bytes:
    enc = Encoder(codec, opus_bitrate)
    for start in range(0, len(pcm), CHUNK):
        enc.feed(pcm[start:start + CHUNK])
    return enc.finish()


def decode(data: bytes, codec: str, samples: int) -> Iterator[np.ndarray]:
    """The audio back as int16 chunks at 16 kHz, exactly ``samples`` long in all (a lossy
    codec's padding cut, a short end padded with silence)."""
    left = samples
    for chunk in _decoded(data, codec):
        if left <= 0:
            return
        chunk = chunk[:left]
        left -= len(chunk)
        yield chunk
    while left > 0:
        step = min(left, CHUNK)
        yield np.zeros(step, dtype=np.int16)
        left -= step


def _decoded(data: bytes, codec: str) -> Iterator[np.ndarray]:
    if codec == "flac":
        with sf.SoundFile(io.BytesIO(data)) as f:
            for block in f.blocks(CHUNK, dtype="int16"):
                yield np.asarray(block, dtype=np.int16).reshape(-1)
        return
    if codec != "opus":
        raise ValueError(f"unknown codec {codec!r}")
    resampler = soxr.ResampleStream(OPUS_RATE, TARGET_RATE, 1, dtype="float32")
    with av.open(io.BytesIO(data), "r", format="ogg") as container:
        for frame in container.decode(audio=0):
            pcm = frame.to_ndarray().astype(np.float32).reshape(-1)
            if frame.format.name.startswith("s16"):
                pcm /= 32768.0
            rate = frame.sample_rate
            if rate != OPUS_RATE:  # a decoder that gives another rate: resample from it
                pcm = soxr.resample(pcm, rate, OPUS_RATE).astype(np.float32)
            out = resampler.resample_chunk(pcm)
            if len(out):
                yield _to_int16(out)
    tail = resampler.resample_chunk(np.zeros(0, dtype=np.float32), last=True)
    if len(tail):
        yield _to_int16(tail)


def _to_int16(x: np.ndarray) -> np.ndarray:
    return np.clip(np.round(x * 32768.0), -32768, 32767).astype(np.int16)
