"""The shared speech clips, their reference transcripts, and WER scoring."""

from __future__ import annotations

import csv
import functools
import io
import os
import re
import wave
from pathlib import Path
from typing import Any

import av
import jiwer
import numpy as np
import soundfile as sf
import soxr
from num2words import num2words

AUDIO_DIR = Path(os.environ.get("STT_AUDIO_DIR",
                                Path(__file__).resolve().parents[2] / "shared" / "audio"))


@functools.cache
def manifest() -> dict[str, dict[str, str]]:
    with open(AUDIO_DIR / "manifest.tsv", newline="") as fh:
        return {row["id"]: row for row in csv.DictReader(fh, delimiter="\t")}


def reference(clip: str) -> str:
    return manifest()[clip]["reference_transcript"]


def load_pcm16(clip: str) -> np.ndarray:
    """A clip as 16 kHz mono int16."""
    data, rate = sf.read(AUDIO_DIR / manifest()[clip]["file"], dtype="int16")
    assert rate == 16000, rate
    return data if data.ndim == 1 else data.mean(axis=1).astype(np.int16)


#: A number as Whisper writes it: digits with thousands commas or a decimal point, an
#: ordinal suffix, a percent sign.
_NUMBER = re.compile(r"\d+(?:,\d{3})*(?:\.\d+)?(?:st|nd|rd|th)?%?")


def _spell(m: re.Match[str]) -> str:
    s = m.group(0)
    percent = s.endswith("%")
    s = s.rstrip("%")
    ordinal = s[-2:] in ("st", "nd", "rd", "th")
    s = (s[:-2] if ordinal else s).replace(",", "")
    value: int | float = float(s) if "." in s else int(s)
    if ordinal and isinstance(value, int):
        words = num2words(value, to="ordinal")
    elif isinstance(value, int) and 1100 <= value <= 2099 and "," not in m.group(0):
        words = num2words(value, to="year")  # "1999": nineteen ninety-nine
    else:
        words = num2words(value)
    return f" {words}{' percent' if percent else ''} "


def normalize(text: str) -> str:
    """Lowercase, drop [..] and <..> tokens, apostrophes and punctuation (audio README), and
    spell out numbers: the references spell them ("go forward ten meters"), Whisper writes
    digits or words depending on context ("10"), and either is a right transcript."""
    text = re.sub(r"\[[^\]]*\]|<[^>]*>", " ", text.lower())
    text = re.sub(r"['\u2018\u2019]", "", text)
    text = _NUMBER.sub(_spell, text)
    text = re.sub(r"[^\w\s]+", " ", text)
    return " ".join(text.split())


def wer(ref: str, hyp: str) -> float:
    return float(jiwer.wer(normalize(ref), normalize(hyp) or "<empty>"))


def wav_bytes(pcm: np.ndarray, rate: int, subtype: str = "PCM_16") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, pcm, rate, subtype=subtype, format="WAV")
    return buf.getvalue()


def wav16(pcm: np.ndarray, rate: int = 16000) -> bytes:
    """Stdlib-written 16-bit mono WAV, to cross-check the parser against another writer."""
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.astype("<i2").tobytes())
    return buf.getvalue()


def stereo_call(clips: tuple[str, str] | list[str], offset_s: float, bleed: float,
                tail_s: float = 2.0) -> np.ndarray:
    """(frames, 2) int16: the first clip on channel 0 from the start, the second on channel
    1 from ``offset_s``, each channel carrying the other at ``bleed`` (headset crosstalk),
    with ``tail_s`` of silence after the later one."""
    a, b = (load_pcm16(clip).astype(np.float32) for clip in clips)
    off = int(offset_s * 16000)
    n = max(len(a), off + len(b)) + int(tail_s * 16000)
    left, right = np.zeros(n, np.float32), np.zeros(n, np.float32)
    left[:len(a)] = a
    right[off:off + len(b)] = b
    mixed = np.stack([left + bleed * right, right + bleed * left], axis=1)
    return np.clip(np.rint(mixed), -32768, 32767).astype(np.int16)


def frames(pcm16: np.ndarray, frame_s: float = 0.1, rate: int = 16000) -> list[tuple[bytes, float]]:
    """int16 samples (or (frames, channels) rows, sent interleaved) → (bytes, seconds)
    messages of ``frame_s``."""
    step = int(rate * frame_s)
    return [(pcm16[i:i + step].astype("<i2").tobytes(), len(pcm16[i:i + step]) / rate)
            for i in range(0, len(pcm16), step)]


def encode(pcm16: np.ndarray, fmt: str, codec: str, rate: int,
           options: dict[str, str] | None = None) -> bytes:
    """16 kHz int16 speech → a ``fmt`` stream of ``codec`` at ``rate``, encoded by libav."""
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt, options=options or {}) as box:
        out: Any = box.add_stream(codec, rate=rate, layout="mono")
        frame = av.AudioFrame.from_ndarray(pcm16.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = 16000
        resampler = av.AudioResampler(format=out.codec_context.format, layout="mono",
                                      rate=rate)
        for part in [*resampler.resample(frame), *resampler.resample(None)]:
            box.mux(out.encode(part))
        box.mux(out.encode(None))
    return buf.getvalue()


def mulaw(pcm16: np.ndarray) -> bytes:
    """16 kHz speech → 8 kHz μ-law, by libav's G.711 encoder (what a phone line carries)."""
    pcm8k = soxr.resample(pcm16.astype(np.float32) / 32768, 16000, 8000)
    enc: Any = av.CodecContext.create("pcm_mulaw", "w")
    enc.sample_rate, enc.layout, enc.format = 8000, "mono", "s16"
    frame = av.AudioFrame.from_ndarray(
        (np.clip(pcm8k, -1, 1) * 32767).astype(np.int16).reshape(1, -1), format="s16",
        layout="mono")
    frame.sample_rate = 8000
    return b"".join(bytes(p) for p in [*enc.encode(frame), *enc.encode(None)])
