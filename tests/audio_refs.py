"""The shared speech clips, their reference transcripts, and WER scoring."""

from __future__ import annotations

import csv
import functools
import io
import os
import re
import wave
from pathlib import Path

import jiwer
import numpy as np
import soundfile as sf

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


def normalize(text: str) -> str:
    """Lowercase, drop [..] and <..> tokens, apostrophes and punctuation (audio README)."""
    text = re.sub(r"\[[^\]]*\]|<[^>]*>", " ", text.lower())
    text = re.sub(r"['\u2018\u2019]", "", text)
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


def frames(pcm16: np.ndarray, frame_s: float = 0.1, rate: int = 16000) -> list[tuple[bytes, float]]:
    """int16 samples → (bytes, seconds) messages of ``frame_s``."""
    step = int(rate * frame_s)
    return [(pcm16[i:i + step].astype("<i2").tobytes(), len(pcm16[i:i + step]) / rate)
            for i in range(0, len(pcm16), step)]
