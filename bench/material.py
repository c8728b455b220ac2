"""Harder test material, made with numpy from ``../shared/audio``: sessions of real clips
joined by pauses, conditions applied to them (quieter segments, slow fades, noise at a
given SNR, a faster pace, short pauses, a short first utterance), and non-speech (silence,
room noise, mains hum, music-like tones, clicks, breathing-like bursts).

Everything here is deterministic (seeded) and needs only numpy and the shared clips, so
tests may use it too. Levels are dBFS of RMS: 20 log10(rms) of float samples in [-1, 1].
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from tests.audio_refs import load_pcm16, reference

RATE = 16000
#: Non-English clips: babble made of them has no English words a listener could hear.
BABBLE_CLIPS = ["aeneas_de_simplicissimus", "leo_fr", "leo_de", "ds_ru", "leo_ja"]


@dataclasses.dataclass
class Session:
    """One streamed session: float32 samples in [-1, 1], the joined reference, and where
    each clip lies on the timeline (clip, start s, end s, reference, gain dB applied)."""

    name: str
    audio: np.ndarray
    spans: list[tuple[str, float, float]]
    refs: list[str]
    gains_db: list[float] = dataclasses.field(default_factory=list)

    @property
    def reference(self) -> str:
        return " ".join(self.refs)

    @property
    def seconds(self) -> float:
        return len(self.audio) / RATE

    def pcm16(self) -> np.ndarray:
        return to_pcm16(self.audio)


def to_pcm16(audio: np.ndarray) -> np.ndarray:
    return np.clip(np.round(audio * 32768.0), -32768, 32767).astype(np.int16)


def clip_audio(clip: str) -> np.ndarray:
    return load_pcm16(clip).astype(np.float32) / 32768.0


def db(x: float) -> float:
    return float(10 ** (x / 20.0))


def rms_dbfs(audio: np.ndarray) -> float:
    rms = float(np.sqrt(np.mean(np.square(audio, dtype=np.float64)))) if len(audio) else 0.0
    return 20 * np.log10(max(rms, 1e-10))


def join(name: str, clips: Sequence[str], pauses: Sequence[float] | float = 1.2,
         lead_s: float = 0.5, tail_s: float = 2.0,
         transform: Callable[[np.ndarray], np.ndarray] | None = None) -> Session:
    """Clips one after another with silence between them (``pauses``: one value, or one
    per gap); ``transform`` is applied to each clip's samples first (e.g. a tempo change)."""
    gaps = [pauses] * (len(clips) - 1) if isinstance(pauses, (int, float)) else list(pauses)
    parts = [np.zeros(int(lead_s * RATE), np.float32)]
    spans, t = [], lead_s
    for i, clip in enumerate(clips):
        x = clip_audio(clip)
        if transform is not None:
            x = transform(x).astype(np.float32)
        spans.append((clip, t, t + len(x) / RATE))
        parts.append(x)
        gap = gaps[i] if i < len(gaps) else tail_s
        parts.append(np.zeros(round(gap * RATE), np.float32))
        t = sum(len(p) for p in parts) / RATE
    return Session(name, np.concatenate(parts), spans, [reference(c) for c in clips],
                   [0.0] * len(clips))


def delayed(s: Session, seconds: float) -> Session:
    """``s`` with ``seconds`` more silence before it: the same speech, every chunk and VAD
    window boundary elsewhere in it (how much a result owes to where the cuts fall)."""
    if seconds <= 0:
        return s
    n = round(seconds * RATE)
    return Session(f"{s.name}+{round(seconds * 1000)}ms",
                   np.concatenate([np.zeros(n, np.float32), s.audio]),
                   [(c, a + n / RATE, b + n / RATE) for c, a, b in s.spans], s.refs,
                   s.gains_db)


def _span_slice(span: tuple[str, float, float]) -> slice:
    return slice(round(span[1] * RATE), round(span[2] * RATE))


def speech_power(s: Session) -> float:
    """Mean power of the clips' samples (the pauses between clips left out)."""
    return float(np.mean(np.concatenate([np.square(s.audio[_span_slice(sp)], dtype=np.float64)
                                         for sp in s.spans])))


# ---------------------------------------------------------------------- conditions


def quieter_segments(s: Session, lo_db: float = 15.0, hi_db: float = 25.0,
                     seed: int = 24) -> Session:
    """Every other clip (the second, fourth, ...) lo_db-hi_db dB quieter (drawn per clip)."""
    rng = np.random.default_rng(seed)
    audio = s.audio.copy()
    gains = list(s.gains_db)
    for i, span in enumerate(s.spans):
        if i % 2 == 1:
            g = -float(rng.uniform(lo_db, hi_db))
            audio[_span_slice(span)] *= db(g)
            gains[i] += g
    return dataclasses.replace(s, audio=audio, gains_db=gains)


def slow_fade(s: Session, depth_db: float = 24.0, period_s: float = 30.0) -> Session:
    """The level swings slowly between 0 and -depth_db dB (a cosine in dB, ``period_s``
    long), as a speaker turning away from the microphone and back."""
    t = np.arange(len(s.audio)) / RATE
    gain_db = -depth_db / 2 * (1 - np.cos(2 * np.pi * t / period_s))
    gains = [float(np.mean(gain_db[_span_slice(sp)])) + g
             for sp, g in zip(s.spans, s.gains_db, strict=True)]
    return dataclasses.replace(s, audio=(s.audio * 10 ** (gain_db / 20)).astype(np.float32),
                               gains_db=gains)


def colored_noise(n: int, exponent: float, seed: int) -> np.ndarray:
    """Gaussian noise with power ∝ 1/f**exponent (0 white, 1 pink, 2 brown), unit RMS."""
    rng = np.random.default_rng(seed)
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n, 1 / RATE)
    f[0] = f[1] if n > 1 else 1.0
    spec *= f ** (-exponent / 2)
    spec[0] = 0.0
    x = np.fft.irfft(spec, n)
    return (x / (np.sqrt(np.mean(x ** 2)) or 1.0)).astype(np.float32)


def babble(n: int, talkers: int = 5, seed: int = 24) -> np.ndarray:
    """Several non-English voices at once (the clips looped at random offsets, each at
    the same level), unit RMS: a cafe's background with no English words in it."""
    rng = np.random.default_rng(seed)
    clips = [clip_audio(c) for c in BABBLE_CLIPS]
    out = np.zeros(n, np.float64)
    for _ in range(talkers):
        order = rng.permutation(len(clips))
        voice = np.concatenate([np.concatenate([clips[i], np.zeros(int(0.3 * RATE))])
                                for i in order])
        reps = -(-(n + len(voice)) // len(voice))
        voice = np.tile(voice, reps)
        start = int(rng.integers(0, len(voice) - n))
        part = voice[start:start + n]
        out += part / (np.sqrt(np.mean(part ** 2)) or 1.0)
    return (out / np.sqrt(np.mean(out ** 2))).astype(np.float32)


NOISES: dict[str, Callable[[int, int], np.ndarray]] = {
    "white": lambda n, seed: colored_noise(n, 0.0, seed),
    "pink": lambda n, seed: colored_noise(n, 1.0, seed),
    "babble": lambda n, seed: babble(n, seed=seed),
}


def with_noise(s: Session, kind: str, snr_db: float, seed: int = 24) -> Session:
    """Noise over the whole session (pauses included) at ``snr_db`` below the clips'
    mean speech power."""
    noise = NOISES[kind](len(s.audio), seed)
    scale = np.sqrt(speech_power(s) / 10 ** (snr_db / 10))
    return dataclasses.replace(s, audio=(s.audio + scale * noise).astype(np.float32))


def tempo(x: np.ndarray, factor: float, frame: int = 640, search: int = 160) -> np.ndarray:
    """WSOLA time stretch: ``factor`` times faster, same pitch. 40 ms Hann frames at 50 %
    overlap; each next frame is taken within ±10 ms of its nominal place where it best
    continues the previous one's waveform (as sox's ``tempo`` does)."""
    hop = frame // 2
    win = np.hanning(frame + 1)[:-1].astype(np.float64)  # periodic: sums to 1 at 50 %
    xp = np.concatenate([np.zeros(search), x.astype(np.float64), np.zeros(frame + search)])
    n_out = int(len(x) / factor)
    out = np.zeros(n_out + frame)
    prev = search  # input index (in xp) of the previous frame
    k = 0
    while k * hop < n_out:
        nominal = search + round(k * hop * factor)
        if k == 0:
            pos = nominal
        else:
            natural = xp[prev + hop:prev + hop + hop]  # what would follow the last frame
            lo = max(nominal - search, 0)
            region = xp[lo:nominal + search + hop]
            if len(region) < hop or not np.any(natural):
                pos = nominal
            else:
                corr = np.correlate(region, natural, mode="valid")
                pos = lo + int(np.argmax(corr))
        seg = xp[pos:pos + frame]
        if len(seg) < frame:
            break
        out[k * hop:k * hop + frame] += seg * win
        prev = pos
        k += 1
    return out[:n_out].astype(np.float32)


# ---------------------------------------------------------------------- non-speech


def _seconds(seconds: float) -> np.ndarray:
    return np.arange(int(seconds * RATE)) / RATE


def _at(x: np.ndarray, dbfs: float) -> np.ndarray:
    rms = np.sqrt(np.mean(np.square(x, dtype=np.float64))) or 1.0
    return (x / rms * db(dbfs)).astype(np.float32)


def silence(seconds: float, seed: int = 0) -> np.ndarray:
    return np.zeros(int(seconds * RATE), np.float32)


def room_noise(seconds: float, seed: int = 0) -> np.ndarray:
    """A quiet room: pink noise at -50 dBFS plus a brown rumble at -45 dBFS."""
    n = int(seconds * RATE)
    return _at(colored_noise(n, 1.0, seed), -50) + _at(colored_noise(n, 2.0, seed + 1), -45)


def hum(seconds: float, seed: int = 0, mains: float = 50.0) -> np.ndarray:
    """Mains hum: the fundamental and four harmonics (odd ones stronger), -30 dBFS, with
    a little room noise under it."""
    t = _seconds(seconds)
    x = sum(a * np.sin(2 * np.pi * mains * k * t + k) for k, a in
            ((1, 1.0), (2, 0.3), (3, 0.6), (4, 0.15), (5, 0.35)))
    return _at(np.asarray(x), -30) + room_noise(seconds, seed) * 0.5


def _note(freq: float, seconds: float, attack: float = 0.02, release: float = 0.3) -> np.ndarray:
    t = _seconds(seconds)
    tone = sum(a * np.sin(2 * np.pi * freq * k * t) for k, a in ((1, 1.0), (2, 0.4), (3, 0.2)))
    env = np.minimum(1.0, t / attack) * np.exp(-t / max(seconds, 1e-3) * 1.5)
    tail = int(release * RATE)
    if 0 < tail < len(env):
        env[-tail:] *= np.linspace(1, 0, tail)
    return np.asarray(tone * env)


_CHORDS = [(261.63, 329.63, 392.00), (220.00, 261.63, 329.63),  # C, Am
           (174.61, 220.00, 261.63), (196.00, 246.94, 293.66)]  # F, G


def chords(seconds: float, seed: int = 0) -> np.ndarray:
    """Sustained triads (C Am F G, 2 s each, three harmonics per note), -20 dBFS."""
    n = int(seconds * RATE)
    out = np.zeros(n + 2 * RATE)
    for i, start in enumerate(range(0, n, 2 * RATE)):
        chord = np.sum([_note(f, 2.0) for f in _CHORDS[i % len(_CHORDS)]], axis=0)
        out[start:start + len(chord)] += chord
    return _at(out[:n], -20)


def arpeggio(seconds: float, seed: int = 0) -> np.ndarray:
    """The same chords broken into 0.25 s notes, up and down, -20 dBFS."""
    n = int(seconds * RATE)
    step = RATE // 4
    out = np.zeros(n + RATE)
    for i, start in enumerate(range(0, n, step)):
        chord = _CHORDS[(i // 8) % len(_CHORDS)]
        seq = [*chord, chord[0] * 2, *chord[::-1][:-1], chord[0] * 2]
        note = _note(seq[i % len(seq)], 0.4, release=0.1)
        out[start:start + len(note)] += note
    return _at(out[:n], -20)


def clicks(seconds: float, seed: int = 0) -> np.ndarray:
    """Clicks (keyboard, mouse, a pen): 3 ms decaying bursts 0.15-1.2 s apart, peaks near
    -10 dBFS, over quiet room noise."""
    rng = np.random.default_rng(seed)
    n = int(seconds * RATE)
    out = room_noise(seconds, seed).astype(np.float64)
    t = int(rng.uniform(0.1, 0.5) * RATE)
    burst_t = np.arange(int(0.003 * RATE)) / RATE
    while t < n - len(burst_t):
        burst = rng.standard_normal(len(burst_t)) * np.exp(-burst_t / 0.0008)
        out[t:t + len(burst)] += 0.3 * rng.uniform(0.5, 1.0) * burst / np.max(np.abs(burst))
        t += int(rng.uniform(0.15, 1.2) * RATE)
    return out.astype(np.float32)


def breathing(seconds: float, seed: int = 0) -> np.ndarray:
    """Breaths near a microphone: band-limited noise (mostly 300-2500 Hz) in inhale and
    exhale bursts of 0.6-1.3 s, swelling and fading, -32 dBFS within a burst, a breath
    every 2.5-4 s, over quiet room noise."""
    rng = np.random.default_rng(seed)
    n = int(seconds * RATE)
    out = room_noise(seconds, seed).astype(np.float64)
    t = int(rng.uniform(0.2, 1.0) * RATE)
    while t < n:
        for _ in range(2):  # in, then out
            if t >= n:
                break
            length = int(rng.uniform(0.6, 1.3) * RATE)
            spec = np.fft.rfft(rng.standard_normal(length))
            f = np.fft.rfftfreq(length, 1 / RATE)
            centre = rng.uniform(600, 1400)
            spec *= np.exp(-0.5 * (np.log(np.maximum(f, 1) / centre) / 0.7) ** 2)
            burst = np.fft.irfft(spec, length)
            env = np.sin(np.pi * np.arange(length) / length) ** 2
            burst = _at(burst * env, -32) * 1.0
            end = min(t + length, n)
            out[t:end] += burst[:end - t]
            t = end + int(rng.uniform(0.2, 0.5) * RATE)
        t += int(rng.uniform(1.5, 3.0) * RATE)
    return out.astype(np.float32)


def brown_noise(seconds: float, seed: int = 0) -> np.ndarray:
    """A rumble (air conditioning, traffic far away): brown noise at -40 dBFS."""
    return _at(colored_noise(int(seconds * RATE), 2.0, seed), -40)


def hum50(seconds: float, seed: int = 0) -> np.ndarray:
    return hum(seconds, seed, 50.0)


def hum60(seconds: float, seed: int = 0) -> np.ndarray:
    return hum(seconds, seed, 60.0)


NONSPEECH: dict[str, Callable[[float, int], np.ndarray]] = {
    "silence": silence,
    "room": room_noise,
    "brown": brown_noise,
    "hum50": hum50,
    "hum60": hum60,
    "chords": chords,
    "arpeggio": arpeggio,
    "clicks": clicks,
    "breathing": breathing,
}
