"""Compressed client audio, decoded as it arrives: G.711 (μ-law, A-law), and Opus in Ogg or
WebM and FLAC through PyAV (libav).

Both decoders turn bytes into ``(samples, rate)`` chunks of float32 mono (channels
downmixed); ``common/audio.py`` resamples them to 16 kHz with the same soxr stream it uses for
PCM. Nothing waits for the end of a stream.

G.711 is a table: PyAV's own ``pcm_mulaw``/``pcm_alaw`` decoders fill it once, so the values
are libav's.

A container needs a demuxer, and libav's demuxers *pull* bytes from a reader. A
``ContainerDecoder`` therefore runs the demuxer and decoder in a thread of its own whose reader
blocks on a small buffer: ``feed`` puts a client message's bytes there and waits (at most
``wait_s``) until the thread has taken them all and decoded what they complete, so a
message's audio normally comes back from the same ``feed`` call, however the stream was cut
into messages (a ``MediaRecorder`` WebM blob ends anywhere). The buffer is bounded
(``max_pending_bytes``); ``finish`` ends the input and returns the rest; ``close`` stops the
thread whatever state it is in.

A stream that is not what it claims — wrong magic bytes, a header cut short, a CRC or
structure error libav reports while reading, FLAC frames missing from the sequence, or
``max_undecoded_bytes`` taken without a sample coming out — is ``InvalidAudio`` (close
1007), raised from the ``feed`` or ``finish`` that meets it. libav's error log lines are
captured per thread to see the errors its demuxers otherwise skip over (they resynchronise
silently).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import threading
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np

from common.errors import InvalidAudio, Overloaded

log = logging.getLogger(__name__)

#: Compressed encodings a client may declare (``encoding=``); ``opus`` is Ogg or WebM, told
#: apart by the stream's first bytes.
G711 = ("mulaw", "alaw")
CONTAINER_ENCODINGS = ("opus", "flac")

#: The first bytes of each container this decodes, and the libav demuxer that reads it.
MAGIC: dict[bytes, str] = {
    b"OggS": "ogg",
    b"\x1a\x45\xdf\xa3": "matroska",  # EBML: WebM (and Matroska)
    b"fLaC": "flac",
}
MAGIC_BYTES = 4
_NAMES = {"ogg": "Ogg", "matroska": "WebM", "flac": "FLAC"}
#: Which containers each declared encoding may arrive in.
CONTAINERS_OF: dict[str, tuple[str, ...]] = {
    "opus": ("ogg", "matroska"),
    "flac": ("flac", "ogg"),
}
#: Decoded rates accepted from a container's header (they are resampled to 16 kHz).
MIN_DECODED_RATE = 8000
MAX_DECODED_RATE = 192000

#: A FLAC frame starting this far from where the one before it ended: frames were lost.
FLAC_GAP_S = 0.002

Chunk = tuple[np.ndarray, int]  # float32 mono samples in [-1, 1], and their rate


@dataclasses.dataclass(frozen=True)
class CodecLimits:
    """Bounds of one container decoder (settings ``codec_*``)."""

    #: bytes received but not yet taken by the decoder thread; beyond: ``Overloaded``
    max_pending_bytes: int = 1 << 20
    #: seconds ``feed`` waits for the decoder to take a message's bytes
    wait_s: float = 0.5
    #: bytes the decoder may take without a decoded sample before the stream is invalid
    max_undecoded_bytes: int = 256 * 1024


# --------------------------------------------------------------------------- G.711


@functools.cache
def g711_table(law: str) -> np.ndarray:
    """The 256 values of μ-law (``mulaw``) or A-law (``alaw``) bytes, as float32 in [-1, 1],
    decoded by libav."""
    import av

    codec: Any = av.CodecContext.create({"mulaw": "pcm_mulaw", "alaw": "pcm_alaw"}[law], "r")
    codec.sample_rate = 8000
    codec.layout = "mono"
    frames = codec.decode(av.Packet(bytes(range(256))))
    table = np.concatenate([f.to_ndarray().reshape(-1) for f in frames])
    assert table.shape == (256,)
    out: np.ndarray = (table.astype(np.float32) / 32768.0)
    out.flags.writeable = False
    return out


class G711Decoder:
    """μ-law or A-law bytes (one byte per sample, channels interleaved) → float32 mono, or
    with ``keep_channels`` (frames, channels) (a multichannel stream)."""

    def __init__(self, law: str, sample_rate: int, channels: int,
                 keep_channels: bool = False) -> None:
        self.table = g711_table(law)
        self.rate = sample_rate
        self.channels = channels
        self.keep_channels = keep_channels
        self._remainder = b""

    def feed(self, data: bytes) -> list[Chunk]:
        if self._remainder:
            data = self._remainder + data
        whole = len(data) - len(data) % self.channels
        self._remainder = data[whole:]
        if not whole:
            return []
        samples = self.table[np.frombuffer(data, dtype=np.uint8, count=whole)]
        if self.keep_channels:
            samples = samples.reshape(-1, self.channels)
        elif self.channels > 1:
            samples = samples.reshape(-1, self.channels).mean(axis=1, dtype=np.float32)
        return [(samples, self.rate)]

    def finish(self) -> list[Chunk]:
        self._remainder = b""
        return []

    def close(self) -> None:
        pass


# --------------------------------------------------------------------------- containers


class DecoderSlots:
    """How many container decoders (threads) one process runs at once: ``limit`` (0: no
    limit). Shared by a gateway's sessions; a slot is taken when a stream's decoder starts
    and given back when its thread ends."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_use = 0
        self._lock = threading.Lock()

    def take(self) -> bool:
        with self._lock:
            if self.limit and self.in_use >= self.limit:
                return False
            self.in_use += 1
            return True

    def give_back(self) -> None:
        with self._lock:
            self.in_use -= 1


def sniff(head: bytes) -> str | None:
    """The container whose magic ``head`` starts with (``ogg``, ``matroska``, ``flac``), or
    None."""
    return MAGIC.get(bytes(head[:MAGIC_BYTES]))


class _Aborted(Exception):
    """The decoder was closed: its thread unwinds."""


@functools.cache
def _enable_error_log() -> None:
    """libav's log is off under PyAV by default; errors must reach the per-thread captures.
    (Errors outside a capture go to Python logging under ``libav.*``.)"""
    import av.logging

    av.logging.set_level(av.logging.ERROR)
    # An error worded like the one before it (another stream's) must still be seen.
    av.logging.set_skip_repeated(False)


class _Shared:
    """What the decoder thread and ``feed`` share, under one condition. Kept apart from
    ``ContainerDecoder`` so the thread holds no reference to the decoder (a decoder dropped
    without ``close`` is closed by its finalizer)."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.pending = bytearray()
        self.eof = False  # finish(): no more bytes
        self.aborted = False  # close(): stop now
        self.starved = False  # the reader waits for bytes (all fed bytes were taken)
        self.done = False  # the thread ended
        self.out: list[Chunk] = []
        self.error: str | None = None  # why the stream is invalid
        self.taken = 0  # bytes handed to libav
        self.decoded_at = 0  # ``taken`` when a sample last came out

    # the reader libav pulls from (called in the decoder thread)
    def read(self, size: int) -> bytes:
        with self.cond:
            while not self.pending and not self.eof and not self.aborted:
                self.starved = True
                self.cond.notify_all()
                self.cond.wait()
            self.starved = False
            if self.aborted:
                raise _Aborted
            data = bytes(self.pending[:size])
            del self.pending[:size]
            self.taken += len(data)
            return data


def _run(shared: _Shared, container: str, limits: CodecLimits,
         slots: DecoderSlots | None) -> None:
    """The decoder thread: demux and decode until the input ends, an error, or ``close``."""
    import av
    import av.logging

    error: str | None = None
    try:
        with av.logging.Capture(local=True) as logs:
            # The format is known from the magic bytes: no probing, and no analysis that
            # would wait for seconds of packets before the first frame comes out.
            with av.open(shared, "r", format=container,
                         options={"analyzeduration": "0", "probesize": "32"}) as box:
                if not box.streams.audio:
                    raise InvalidAudio("the stream has no audio track")
                stream = box.streams.audio[0]
                expected: float | None = None  # FLAC: where the next frame must start
                for frame in box.decode(stream):
                    if logs:
                        break
                    if container == "flac" and frame.pts is not None and frame.time_base:
                        # FLAC numbers its frames; the parser skips damaged ones silently
                        at = float(frame.pts * frame.time_base)
                        if expected is not None and abs(at - expected) > FLAC_GAP_S:
                            error = "the FLAC stream is corrupt (frames are missing)"
                            break
                        expected = at + frame.samples / frame.sample_rate
                    rate = frame.sample_rate
                    if not MIN_DECODED_RATE <= rate <= MAX_DECODED_RATE:
                        raise InvalidAudio(f"decoded audio at {rate} Hz is outside "
                                           f"{MIN_DECODED_RATE}-{MAX_DECODED_RATE} Hz")
                    samples = _mono(frame.to_ndarray(), frame.format.name, frame.format.is_planar,
                                    len(frame.layout.channels))
                    with shared.cond:
                        if len(samples):
                            shared.out.append((samples, rate))
                            shared.decoded_at = shared.taken
                        if shared.taken - shared.decoded_at > limits.max_undecoded_bytes:
                            error = "no audio could be decoded from the stream"
                            break
            if logs and error is None:
                log.debug("%s decoder: %s", container, logs[0][2].strip())
                error = f"the {_NAMES[container]} stream is corrupt"
    except _Aborted:
        pass
    except InvalidAudio as exc:
        error = exc.message
    except Exception as exc:  # libav's errors: what is wrong with the bytes
        if not shared.aborted:
            error = f"the {_NAMES[container]} stream cannot be decoded"
            log.debug("%s decoder: %r", container, exc)
    finally:
        with shared.cond:
            if error is not None and shared.error is None:
                shared.error = error
            shared.done = True
            shared.cond.notify_all()
        if slots is not None:
            slots.give_back()


def _mono(array: np.ndarray, fmt: str, planar: bool, channels: int) -> np.ndarray:
    """A decoded frame's samples as float32 mono in [-1, 1]."""
    if not planar:  # packed: (1, samples * channels)
        array = array.reshape(-1, channels).T
    if array.dtype == np.int16:
        data = array.astype(np.float32) / 32768.0
    elif array.dtype == np.int32:
        data = (array.astype(np.float64) / 2147483648.0).astype(np.float32)
    elif array.dtype == np.uint8:
        data = (array.astype(np.float32) - 128.0) / 128.0
    else:
        data = np.clip(np.nan_to_num(array.astype(np.float32, copy=False)), -1.0, 1.0)
    mono = data[0] if data.shape[0] == 1 else data.mean(axis=0, dtype=np.float32)
    return np.ascontiguousarray(mono, dtype=np.float32)


def _abort(shared: _Shared) -> None:
    with shared.cond:
        shared.aborted = True
        shared.cond.notify_all()


class ContainerDecoder:
    """One compressed stream in a container, decoded incrementally by libav in a thread."""

    def __init__(self, encoding: str, limits: CodecLimits | None = None,
                 allowed: tuple[str, ...] | None = None,
                 slots: DecoderSlots | None = None) -> None:
        self.encoding = encoding
        self.slots = slots
        self.limits = limits or CodecLimits()
        self.allowed = allowed if allowed is not None else CONTAINERS_OF[encoding]
        self.container: str | None = None
        self._head = b""
        self._shared = _Shared()
        self._thread: threading.Thread | None = None
        self._finalizer: Callable[[], Any] = weakref.finalize(self, _abort, self._shared)

    def feed(self, data: bytes) -> list[Chunk]:
        """A message's bytes → the audio they complete (possibly none yet)."""
        if self._thread is None:
            self._head += data
            if len(self._head) < MAGIC_BYTES:
                return []
            self._start()
            data, self._head = self._head, b""
        shared = self._shared
        with shared.cond:
            self._check()
            shared.pending += data
            shared.starved = False
            shared.cond.notify_all()
            shared.cond.wait_for(lambda: (shared.starved and not shared.pending)
                                 or shared.done or shared.error is not None,
                                 self.limits.wait_s)
            self._check()
            if len(shared.pending) > self.limits.max_pending_bytes:
                raise Overloaded("audio decoding fell behind; try again later")
            out, shared.out = shared.out, []
        return out

    def finish(self) -> list[Chunk]:
        """The input ended: the rest of the audio (waits for the thread, at most a few
        ``wait_s``)."""
        if self._thread is None:
            if self._head:
                raise InvalidAudio(f"the {self.encoding} stream ended inside its header")
            return []
        shared = self._shared
        with shared.cond:
            shared.eof = True
            shared.cond.notify_all()
            shared.cond.wait_for(lambda: shared.done, 4 * self.limits.wait_s)
            finished = shared.done
            out, shared.out = shared.out, []
            error = shared.error
        if not finished:
            self.close()
            raise Overloaded("audio decoding did not finish in time")
        if error is not None:
            raise InvalidAudio(error)
        if shared.decoded_at == 0 and shared.taken:
            raise InvalidAudio(f"no audio could be decoded from the {self.encoding} stream")
        return out

    def close(self) -> None:
        """Stop the decoder thread (idempotent)."""
        self._finalizer()

    def _start(self) -> None:
        container = sniff(self._head)
        if container is None or container not in self.allowed:
            raise InvalidAudio(f"not a {self.encoding} stream in "
                               f"{' or '.join(_NAMES[c] for c in self.allowed)}"
                               " (its first bytes do not match)")
        if self.slots is not None and not self.slots.take():
            raise Overloaded("this server decodes as many compressed streams as it can; "
                             "try again later, or send PCM")
        self.container = container
        _enable_error_log()
        self._thread = threading.Thread(
            target=_run, args=(self._shared, container, self.limits, self.slots),
            name=f"decode-{container}", daemon=True)
        self._thread.start()

    def _check(self) -> None:
        if self._shared.error is not None:
            raise InvalidAudio(self._shared.error)
