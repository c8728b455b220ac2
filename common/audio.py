"""Client audio → 16 kHz mono int16, one stateful normaliser per session.

Handles pcm_s16le, pcm_f32le and WAV (each message a whole WAV file, or a
header followed by raw chunks), binary or base64 text; any rate from 8 to
48 kHz resampled with soxr's streaming resampler; stereo downmixed; samples
split across messages buffered until complete. The compressed encodings (G.711
``mulaw``/``alaw``, ``opus`` in Ogg or WebM, ``flac``) are decoded as they arrive by
``common/codecs.py`` and go through the same resampler.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import struct

import numpy as np
import soxr

from common.codecs import (
    CONTAINER_ENCODINGS,
    G711,
    MAGIC,
    MAGIC_BYTES,
    Chunk,
    CodecLimits,
    ContainerDecoder,
    DecoderSlots,
    G711Decoder,
)
from common.errors import InvalidAudio, UnsupportedAudio

TARGET_RATE = 16000
MIN_RATE = 8000
MAX_RATE = 48000
#: G.711 is telephony audio: its rate when the client names none.
G711_RATE = 8000
ENCODINGS = ("pcm_s16le", "pcm_f32le", "wav", *G711, *CONTAINER_ENCODINGS)
#: Not a client's choice on /v1/listen: a dialect whose clients send "a file's bytes" without
#: naming the format (Deepgram's containerised audio). WAV, Ogg, WebM or FLAC, told apart by
#: the stream's first bytes.
AUTO = "auto"
#: AUTO reads a WAV header whole: it may be this long (LIST and other chunks before data).
WAV_HEADER_MAX = 4096

_WAVE_FORMAT_PCM = 0x0001
_WAVE_FORMAT_IEEE_FLOAT = 0x0003
_WAVE_FORMAT_EXTENSIBLE = 0xFFFE


@dataclasses.dataclass(frozen=True)
class SampleFormat:
    """How raw sample bytes are laid out: ``kind`` is 'int' or 'float', ``width`` in bytes."""

    kind: str
    width: int
    sample_rate: int
    channels: int

    @property
    def frame_bytes(self) -> int:
        return self.width * self.channels


@dataclasses.dataclass(frozen=True)
class StreamFormat:
    """What the client declared in the query string."""

    encoding: str = "pcm_s16le"
    sample_rate: int = TARGET_RATE
    channels: int = 1
    #: each channel is kept (interleaved) and transcribed apart, instead of downmixed
    multichannel: bool = False

    @property
    def width(self) -> int:
        """Channels in the normalised audio: ``channels`` when multichannel, else 1."""
        return self.channels if self.multichannel else 1


#: The most channels a multichannel stream may declare at all (``max_channels``, a setting,
#: bounds it further): a WAV or query asking for more is refused before anything is built.
CHANNELS_CAP = 32
#: Encodings whose channels the gateway can keep apart (the containers' decoder downmixes).
MULTICHANNEL_ENCODINGS = ("pcm_s16le", "pcm_f32le", "wav", *G711)


def _check_rate_channels(sample_rate: int, channels: int, multichannel: bool = False) -> None:
    if not MIN_RATE <= sample_rate <= MAX_RATE:
        raise UnsupportedAudio(f"sample_rate must be between {MIN_RATE} and {MAX_RATE} Hz")
    if multichannel:
        if not 2 <= channels <= CHANNELS_CAP:
            raise UnsupportedAudio("multichannel=true needs channels=2 or more")
    elif channels not in (1, 2):
        raise UnsupportedAudio("channels must be 1 or 2 (more with multichannel=true)")


def parse_stream_format(encoding: str | None, sample_rate: str | None,
                        channels: str | None, multichannel: bool = False) -> StreamFormat:
    """Validate the query parameters that describe the audio."""
    enc = encoding if encoding is not None else "pcm_s16le"
    if enc not in ENCODINGS:
        raise UnsupportedAudio(f"encoding must be one of {', '.join(ENCODINGS)}")
    if multichannel and enc not in MULTICHANNEL_ENCODINGS:
        raise UnsupportedAudio("multichannel=true needs encoding "
                               f"{', '.join(MULTICHANNEL_ENCODINGS)}")
    try:
        rate = int(sample_rate) if sample_rate is not None else \
            G711_RATE if enc in G711 else TARGET_RATE
        chans = int(channels) if channels is not None else 1
    except ValueError:
        raise UnsupportedAudio("sample_rate and channels must be integers") from None
    _check_rate_channels(rate, chans, multichannel)
    return StreamFormat(enc, rate, chans, multichannel)


def parse_wav_header(data: bytes, multichannel: bool = False) -> tuple[SampleFormat, int, int]:
    """Walk the RIFF chunks of a WAV message: (format, data offset, data length in this message)."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise InvalidAudio("not a RIFF/WAVE header")
    pos = 12
    fmt: SampleFormat | None = None
    while pos + 8 <= len(data):
        chunk_id = data[pos:pos + 4]
        (size,) = struct.unpack_from("<I", data, pos + 4)
        body = pos + 8
        if chunk_id == b"fmt ":
            if size < 16 or body + 16 > len(data):
                raise InvalidAudio("truncated WAV fmt chunk")
            tag, chans, rate, _, _, bits = struct.unpack_from("<HHIIHH", data, body)
            if tag == _WAVE_FORMAT_EXTENSIBLE:
                if size < 40 or body + 26 > len(data):
                    raise InvalidAudio("truncated WAV extensible fmt chunk")
                (tag,) = struct.unpack_from("<H", data, body + 24)
            if tag == _WAVE_FORMAT_PCM and bits in (8, 16, 24, 32):
                kind = "uint" if bits == 8 else "int"
            elif tag == _WAVE_FORMAT_IEEE_FLOAT and bits in (32, 64):
                kind = "float"
            else:
                raise UnsupportedAudio("WAV must be PCM (8/16/24/32-bit) or IEEE float (32/64-bit)")
            _check_rate_channels(rate, chans, multichannel and chans > 1)
            fmt = SampleFormat(kind, bits // 8, rate, chans)
        elif chunk_id == b"data":
            if fmt is None:
                raise InvalidAudio("WAV data chunk before fmt chunk")
            available = len(data) - body
            # Streaming writers put 0 or 0xFFFFFFFF in the size; a lying size
            # larger than the message just means more data follows.
            length = available if size in (0, 0xFFFFFFFF) else min(size, available)
            return fmt, body, length
        pos = body + size + (size & 1)
    raise InvalidAudio("WAV header has no data chunk" if fmt else "WAV header has no fmt chunk")


def _decode_samples(raw: bytes, fmt: SampleFormat) -> np.ndarray:
    """Little-endian sample bytes (whole frames) → float32 array of shape (frames, channels)."""
    if fmt.kind == "int" and fmt.width == 3:
        b = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        ints = (b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16))
        ints = np.where(ints >= 1 << 23, ints - (1 << 24), ints)
        out = ints.astype(np.float32) / float(1 << 23)
    elif fmt.kind == "uint":
        out = (np.frombuffer(raw, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
    elif fmt.kind == "int":
        dtype = {2: "<i2", 4: "<i4"}[fmt.width]
        out = np.frombuffer(raw, dtype=dtype).astype(np.float32) / float(1 << (8 * fmt.width - 1))
    else:
        dtype = {4: "<f4", 8: "<f8"}[fmt.width]
        wide = np.frombuffer(raw, dtype=dtype)
        if not np.all(np.isfinite(wide)):
            raise InvalidAudio("float samples must be finite (no NaN or infinity)")
        # Full scale is [-1, 1]; clip here so huge finite values cannot overflow float32
        # in the resampler or the int16 conversion.
        out = np.clip(wide, -1.0, 1.0).astype(np.float32)
    return out.reshape(-1, fmt.channels)


def float_to_int16(samples: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(samples * 32767.0), -32768, 32767).astype(np.int16)


class AudioNormalizer:
    """Stateful converter from one client's audio messages to 16 kHz mono int16 (or, for a
    multichannel stream, 16 kHz int16 with its channels interleaved: ``stream.width``).

    A compressed stream holds a decoder (a thread, for containers): ``close`` it when the
    session ends without ``flush``."""

    def __init__(self, stream: StreamFormat, codec_limits: CodecLimits | None = None,
                 decoders: DecoderSlots | None = None) -> None:
        self.stream = stream
        self.codec_limits = codec_limits or CodecLimits()
        self.decoders = decoders  # the process's decoder threads, shared
        self._encoding = stream.encoding
        self._fmt: SampleFormat | None = None
        self._codec: G711Decoder | ContainerDecoder | None = None
        self._head = b""  # AUTO: the first bytes, until the format is known
        if stream.encoding == "pcm_s16le":
            self._fmt = SampleFormat("int", 2, stream.sample_rate, stream.channels)
        elif stream.encoding == "pcm_f32le":
            self._fmt = SampleFormat("float", 4, stream.sample_rate, stream.channels)
        elif stream.encoding in G711:
            self._codec = G711Decoder(stream.encoding, stream.sample_rate, stream.channels,
                                      keep_channels=stream.multichannel)
        elif stream.encoding in CONTAINER_ENCODINGS:
            self._codec = ContainerDecoder(stream.encoding, self.codec_limits,
                                           slots=decoders)
        self._remainder = b""
        self._resampler: soxr.ResampleStream | None = None
        self._resampler_rate = 0

    @property
    def sample_format(self) -> SampleFormat | None:
        return self._fmt

    def feed_text(self, text: str) -> np.ndarray:
        """A base64 text message (optionally a ``data:`` URL) carrying audio bytes."""
        if text.startswith("data:"):
            _, _, text = text.partition(",")
        try:
            raw = base64.b64decode(text.strip(), validate=True)
        except (binascii.Error, ValueError):
            raise InvalidAudio("text audio must be base64") from None
        return self.feed(raw)

    def feed(self, data: bytes) -> np.ndarray:
        """One binary message → the int16 samples it completes (possibly none)."""
        if self._encoding == AUTO:
            self._head += data
            if not self._choose(self._head):
                return np.zeros(0, dtype=np.int16)
            data, self._head = self._head, b""
        if self._codec is not None:
            return self._from_chunks(self._codec.feed(data))
        if self._encoding == "wav" and data[:4] == b"RIFF":
            fmt, offset, length = parse_wav_header(data, self.stream.multichannel)
            if self.stream.multichannel and fmt.channels != self.stream.channels:
                raise InvalidAudio(f"the WAV header has {fmt.channels} channels; the "
                                   f"stream declared channels={self.stream.channels}")
            if self._fmt is not None and fmt.sample_rate != self._fmt.sample_rate:
                self._reset_resampler()
            self._fmt = fmt
            self._remainder = b""
            data = data[offset:offset + length]
        if self._fmt is None:
            raise InvalidAudio("WAV stream must start with a RIFF/WAVE header")
        fmt = self._fmt
        if self._remainder:
            data = self._remainder + data
        whole = len(data) - len(data) % fmt.frame_bytes
        self._remainder = data[whole:]
        if whole == 0:
            return np.zeros(0, dtype=np.int16)
        raw = data[:whole]
        if fmt.kind == "int" and fmt.width == 2 and fmt.sample_rate == TARGET_RATE \
                and (fmt.channels == 1 or self.stream.multichannel):
            return np.frombuffer(raw, dtype="<i2").astype(np.int16)
        frames = _decode_samples(raw, fmt)
        if self.stream.multichannel:
            return float_to_int16(self._resample(frames, fmt.sample_rate)).reshape(-1)
        mono = frames[:, 0] if fmt.channels == 1 else frames.mean(axis=1, dtype=np.float32)
        return float_to_int16(self._resample(np.ascontiguousarray(mono), fmt.sample_rate))

    def flush(self) -> np.ndarray:
        """The end of the stream: what a decoder still holds, and the resampler's tail.
        ``InvalidAudio`` when a compressed stream turns out truncated or corrupt."""
        if self._encoding == AUTO and self._head:
            raise InvalidAudio("the stream ended before its format could be recognised")
        decoded = np.zeros(0, dtype=np.int16)
        if self._codec is not None:
            try:
                decoded = self._from_chunks(self._codec.finish())
            finally:
                self._codec.close()
        if self._resampler is None:
            return decoded
        width = self.stream.width
        empty = np.zeros((0, width) if width > 1 else 0, dtype=np.float32)
        tail = float_to_int16(self._resampler.resample_chunk(empty, last=True)).reshape(-1)
        self._resampler = None
        return np.concatenate([decoded, tail]) if len(decoded) else tail

    def close(self) -> None:
        """Stop a decoder's thread (the session ended without ``flush``)."""
        if self._codec is not None:
            self._codec.close()

    def _choose(self, head: bytes) -> bool:
        """AUTO: take the format the stream's first bytes name; False while they are too few
        to tell (a WAV header is read whole, up to ``WAV_HEADER_MAX`` bytes)."""
        if len(head) < MAGIC_BYTES:
            return False
        if head[:4] == b"RIFF":
            try:
                parse_wav_header(head)
            except InvalidAudio:
                if len(head) < WAV_HEADER_MAX:
                    return False
                raise
            self._encoding = "wav"
        elif head[:MAGIC_BYTES] in MAGIC:
            self._encoding = "container"
            self._codec = ContainerDecoder("audio", self.codec_limits,
                                           allowed=tuple(MAGIC.values()), slots=self.decoders)
        else:
            raise UnsupportedAudio("name the encoding (and sample_rate) of raw audio: the "
                                   "stream is not WAV, Ogg, WebM or FLAC")
        return True

    def _from_chunks(self, chunks: list[Chunk]) -> np.ndarray:
        """Decoded float chunks (any rate; (frames, channels) for a multichannel stream) →
        16 kHz int16 (interleaved)."""
        if not chunks:
            return np.zeros(0, dtype=np.int16)
        parts = [float_to_int16(self._resample(samples, rate)).reshape(-1)
                 for samples, rate in chunks]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _reset_resampler(self) -> None:
        self._resampler = None

    def _resample(self, samples: np.ndarray, rate: int) -> np.ndarray:
        """Mono samples, or (frames, channels) of a multichannel stream, at 16 kHz."""
        if rate == TARGET_RATE:
            return samples
        if self._resampler is None or self._resampler_rate != rate:
            channels = samples.shape[1] if samples.ndim == 2 else 1
            self._resampler = soxr.ResampleStream(rate, TARGET_RATE, channels,
                                                  dtype="float32")
            self._resampler_rate = rate
        out: np.ndarray = self._resampler.resample_chunk(samples)
        return out


def pcm16_to_float(pcm: np.ndarray) -> np.ndarray:
    return pcm.astype(np.float32) / 32768.0
