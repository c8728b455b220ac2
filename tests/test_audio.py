"""Audio normalisation: encodings, rates, channels, WAV chunks, base64, odd splits, bad input."""

from __future__ import annotations

import base64
import struct

import numpy as np
import pytest
import soxr

from common.audio import AudioNormalizer, StreamFormat, parse_stream_format, parse_wav_header
from common.errors import InvalidAudio, UnsupportedAudio
from tests.audio_refs import load_pcm16, wav16, wav_bytes


def feed_all(norm: AudioNormalizer, messages: list[bytes]) -> np.ndarray:
    out = [norm.feed(m) for m in messages]
    out.append(norm.flush())
    return np.concatenate(out)


def split(data: bytes, sizes: list[int]) -> list[bytes]:
    parts, pos, i = [], 0, 0
    while pos < len(data):
        n = sizes[i % len(sizes)]
        parts.append(data[pos:pos + n])
        pos += n
        i += 1
    return parts


@pytest.fixture(scope="module")
def jfk() -> np.ndarray:
    return load_pcm16("fw_jfk")


def test_s16_at_16k_passes_through_unchanged(jfk: np.ndarray) -> None:
    out = feed_all(AudioNormalizer(StreamFormat()), [jfk.tobytes()])
    assert np.array_equal(out, jfk)


def test_odd_byte_splits_give_identical_samples(jfk: np.ndarray) -> None:
    data = jfk.tobytes()
    out = feed_all(AudioNormalizer(StreamFormat()), split(data, [1, 3, 1001, 7, 3200]))
    assert np.array_equal(out, jfk)


def test_f32_48k_is_resampled_like_offline_soxr(jfk: np.ndarray) -> None:
    f = jfk.astype(np.float32) / 32768.0
    f48 = soxr.resample(f, 16000, 48000).astype("<f4")
    expected = soxr.resample(f48, 48000, 16000)
    fmt = StreamFormat("pcm_f32le", 48000, 1)
    out = feed_all(AudioNormalizer(fmt), split(f48.tobytes(), [19200, 5, 4803]))
    assert abs(len(out) - len(expected)) <= 2
    n = min(len(out), len(expected))
    err = np.abs(out[:n].astype(np.float32) / 32768.0 - expected[:n])
    assert float(err.max()) < 2e-3
    # And close to the original 16 kHz signal.
    n = min(n, len(jfk))
    corr = np.corrcoef(out[1000:n - 1000], jfk[1000:n - 1000])[0, 1]
    assert corr > 0.99


def test_stereo_is_downmixed_to_the_channel_mean() -> None:
    left = np.full(1600, 1000, dtype=np.int16)
    right = np.full(1600, 3000, dtype=np.int16)
    inter = np.stack([left, right], axis=1).reshape(-1)
    out = feed_all(AudioNormalizer(StreamFormat("pcm_s16le", 16000, 2)), [inter.tobytes()])
    assert len(out) == 1600
    assert np.all(np.abs(out.astype(int) - 2000) <= 1)


def test_wav_file_per_message_and_header_then_chunks_agree(jfk: np.ndarray) -> None:
    fmt = StreamFormat("wav", 16000, 1)
    per_message = [wav16(jfk[i:i + 8000]) for i in range(0, len(jfk), 8000)]
    a = feed_all(AudioNormalizer(fmt), per_message)
    whole = wav16(jfk)
    b = feed_all(AudioNormalizer(fmt), split(whole, [44 + 101, 999, 4000]))
    assert np.array_equal(a, jfk)
    assert np.array_equal(b, jfk)


def test_wav_float_44k_stereo_is_converted(jfk: np.ndarray) -> None:
    f = jfk.astype(np.float32) / 32768.0
    f44 = soxr.resample(f, 16000, 44100)
    stereo = np.stack([f44, f44], axis=1)
    data = wav_bytes(stereo, 44100, subtype="FLOAT")
    out = feed_all(AudioNormalizer(StreamFormat("wav")), [data])
    n = min(len(out), len(jfk))
    assert abs(len(out) - len(jfk)) <= 2
    assert np.corrcoef(out[1000:n - 1000], jfk[1000:n - 1000])[0, 1] > 0.99


def test_wav_24bit_is_decoded(jfk: np.ndarray) -> None:
    data = wav_bytes(jfk.astype(np.float32) / 32768.0, 16000, subtype="PCM_24")
    out = feed_all(AudioNormalizer(StreamFormat("wav")), [data])
    assert np.max(np.abs(out.astype(int) - jfk.astype(int))) <= 1


def test_base64_text_wav_chunks(jfk: np.ndarray) -> None:
    norm = AudioNormalizer(StreamFormat("wav"))
    parts = [norm.feed_text(base64.b64encode(wav16(jfk[i:i + 8000])).decode())
             for i in range(0, len(jfk), 8000)]
    assert np.array_equal(np.concatenate(parts), jfk)


def test_nan_float_samples_are_invalid() -> None:
    data = np.array([0.1, np.nan, 0.2], dtype="<f4").tobytes()
    with pytest.raises(InvalidAudio):
        AudioNormalizer(StreamFormat("pcm_f32le")).feed(data)


def test_wav_stream_without_header_is_invalid() -> None:
    with pytest.raises(InvalidAudio):
        AudioNormalizer(StreamFormat("wav")).feed(b"\x00\x01" * 100)


def test_truncated_and_lying_wav_headers() -> None:
    good = wav16(np.zeros(100, dtype=np.int16))
    with pytest.raises(InvalidAudio):
        parse_wav_header(good[:30])  # fmt chunk cut short
    lying = bytearray(good)
    struct.pack_into("<I", lying, 40, 10_000_000)  # data size far beyond the message
    fmt, offset, length = parse_wav_header(bytes(lying))
    assert (fmt.sample_rate, offset, length) == (16000, 44, 200)
    with pytest.raises(UnsupportedAudio):
        bad_rate = bytearray(good)
        struct.pack_into("<I", bad_rate, 24, 96000)
        parse_wav_header(bytes(bad_rate))


def test_invalid_base64_is_invalid_audio() -> None:
    with pytest.raises(InvalidAudio):
        AudioNormalizer(StreamFormat("wav")).feed_text("not base64 !!!")


@pytest.mark.parametrize(("enc", "rate", "chans"), [
    ("mp3", "16000", "1"), ("pcm_s16le", "4000", "1"), ("pcm_s16le", "96000", "1"),
    ("pcm_s16le", "16000", "3"), ("pcm_s16le", "abc", "1"), ("pcm_s16le", "16000", "0"),
])
def test_unsupported_formats_are_refused(enc: str, rate: str, chans: str) -> None:
    with pytest.raises(UnsupportedAudio):
        parse_stream_format(enc, rate, chans)


def test_default_format_is_16k_mono_s16() -> None:
    assert parse_stream_format(None, None, None) == StreamFormat("pcm_s16le", 16000, 1)
