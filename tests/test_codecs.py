"""Compressed client audio (common/codecs.py through common/audio.py): G.711 μ-law and A-law,
Opus in Ogg and in WebM (a live, MediaRecorder-style stream), FLAC. Real speech encoded by
PyAV (libav's encoders); decoded as the bytes arrive, the same samples however the stream is
cut into messages; a broken stream is invalid_audio (close 1007). The last tests send Opus
through the whole service and check the transcript."""

from __future__ import annotations

import asyncio
import random
import threading

import av
import numpy as np
import pytest
import soxr
from hypothesis import given, settings
from hypothesis import strategies as st

from common.audio import AUTO, AudioNormalizer, StreamFormat, parse_stream_format
from common.client import listen_url, stream
from common.codecs import CodecLimits, ContainerDecoder, DecoderSlots
from common.errors import INVALID_PAYLOAD, InvalidAudio, Overloaded, SttError, UnsupportedAudio
from tests.audio_refs import encode, load_pcm16, reference, wav16, wer
from tests.conftest import Stack

CLIP = "fw_jfk"


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    return load_pcm16(CLIP)


@pytest.fixture(scope="module")
def streams(speech: np.ndarray) -> dict[str, bytes]:
    return {
        # MediaRecorder writes a live WebM: unknown sizes, no cues, clusters as it goes
        "webm": encode(speech, "webm", "libopus", 48000, {"live": "1"}),
        "ogg": encode(speech, "ogg", "libopus", 48000),
        "flac": encode(speech, "flac", "flac", 16000),
    }


ENCODING = {"webm": "opus", "ogg": "opus", "flac": "flac"}


def cut(data: bytes, seed: int, largest: int = 5000) -> list[bytes]:
    """``data`` in messages of random sizes: single bytes first (a header split anywhere),
    then up to ``largest`` bytes."""
    rng = random.Random(seed)
    parts, pos = [], 0
    while pos < len(data):
        n = 1 if len(parts) < 12 else rng.randint(1, largest)
        parts.append(data[pos:pos + n])
        pos += n
    return parts


def decode(encoding: str, messages: list[bytes], limits: CodecLimits | None = None,
           channels: int = 1, rate: int = 16000) -> np.ndarray:
    norm = AudioNormalizer(StreamFormat(encoding, rate, channels), limits)
    try:
        out = [norm.feed(m) for m in messages]
        out.append(norm.flush())
    finally:
        norm.close()
    return np.concatenate(out)


def similarity(a: np.ndarray, b: np.ndarray) -> float:
    n = min(len(a), len(b))
    x, y = a[:n].astype(np.float64), b[:n].astype(np.float64)
    return float(np.dot(x, y) / (np.linalg.norm(x) * np.linalg.norm(y)))


# --------------------------------------------------------------------------- containers


@pytest.mark.parametrize("kind", ["webm", "ogg", "flac"])
def test_a_container_gives_the_same_samples_however_the_stream_is_cut(
        kind: str, streams: dict[str, bytes], speech: np.ndarray) -> None:
    data = streams[kind]
    whole = decode(ENCODING[kind], [data])
    for seed in (1, 2):
        assert np.array_equal(decode(ENCODING[kind], cut(data, seed)), whole)
    assert abs(len(whole) - len(speech)) <= 160, (len(whole), len(speech))
    if kind == "flac":
        # lossless and 16 kHz already: only the float scaling's rounding (one step)
        assert np.abs(whole.astype(int) - speech).max() <= 1
    else:
        assert similarity(whole, speech) > 0.9  # the same speech, through Opus and 48 kHz


def test_a_webm_stream_decodes_as_its_bytes_arrive(streams: dict[str, bytes]) -> None:
    """A quarter-second blob at a time (MediaRecorder's timeslice): each one's audio comes
    back from its own message, within a frame or two."""
    data = streams["webm"]
    norm = AudioNormalizer(StreamFormat("opus"))
    duration = 11.0
    per_blob = len(data) // 44
    lags = []
    try:
        decoded = 0
        for pos in range(0, len(data), per_blob):
            decoded += len(norm.feed(data[pos:pos + per_blob]))
            arrived = min(1.0, (pos + per_blob) / len(data)) * duration
            lags.append(arrived - decoded / 16000)
    finally:
        norm.close()
    assert max(lags[4:]) < 0.5, lags


def test_auto_tells_wav_ogg_webm_and_flac_apart(streams: dict[str, bytes],
                                                speech: np.ndarray) -> None:
    assert np.array_equal(decode(AUTO, cut(wav16(speech), 3)), speech)
    assert np.abs(decode(AUTO, cut(streams["flac"], 3)).astype(int) - speech).max() <= 1
    for kind in ("webm", "ogg"):
        assert similarity(decode(AUTO, cut(streams[kind], 3)), speech) > 0.9


def corrupt(data: bytes, at: int, garbage: int = 4000) -> bytes:
    noise = random.Random(at).randbytes(garbage)
    return data[:at] + noise + data[at + garbage:]


@pytest.mark.parametrize("kind", ["webm", "ogg", "flac"])
@pytest.mark.parametrize("damage", ["garbage inside", "header cut short", "wrong magic"])
def test_a_broken_stream_is_invalid_audio(kind: str, damage: str,
                                          streams: dict[str, bytes]) -> None:
    data = streams[kind]
    broken = {
        "garbage inside": corrupt(data, len(data) // 3),
        "header cut short": data[:60],
        "wrong magic": b"RIFX" + data[4:],
    }[damage]
    with pytest.raises(InvalidAudio) as exc:
        decode(ENCODING[kind], cut(broken, 4))
    assert exc.value.code == "invalid_audio" and exc.value.close_code == INVALID_PAYLOAD == 1007


@pytest.mark.parametrize("kind", ["webm", "flac"])
def test_a_stream_cut_off_mid_frame_is_invalid_audio_at_its_end(
        kind: str, streams: dict[str, bytes]) -> None:
    """What came before decodes; the end (``flush``, the client's close) reports the cut."""
    data = streams[kind]
    norm = AudioNormalizer(StreamFormat(ENCODING[kind]))
    try:
        got = sum(len(norm.feed(m)) for m in cut(data[:len(data) // 2 + 7], 5))
        with pytest.raises(InvalidAudio):
            norm.flush()
    finally:
        norm.close()
    assert got > 3 * 16000


def test_bytes_that_never_decode_end_the_stream_within_the_bound(
        streams: dict[str, bytes]) -> None:
    """An Ogg header, then bytes with no page in them: the demuxer would scan on forever."""
    data = streams["ogg"]
    head = data[:data.index(b"OggS", 200)]  # the header pages only
    noise = bytes(64 * 1024)
    limits = CodecLimits(max_undecoded_bytes=32 * 1024)
    with pytest.raises(InvalidAudio):
        decode("opus", [head, noise, noise, noise], limits)


def test_closing_a_decoder_stops_its_thread(streams: dict[str, bytes]) -> None:
    decoder = ContainerDecoder("opus")
    decoder.feed(streams["webm"][:20000])
    thread = decoder._thread
    assert thread is not None and thread.is_alive()
    decoder.close()
    thread.join(2.0)
    assert not thread.is_alive()
    assert all(t.name != "decode-matroska" for t in threading.enumerate())


def test_a_process_decodes_at_most_its_slots_of_streams_at_once(
        streams: dict[str, bytes]) -> None:
    """``codec_max_streams``: one slot; a second stream is overloaded (1013) until the first
    decoder's thread has ended."""
    slots = DecoderSlots(1)
    first = ContainerDecoder("opus", slots=slots)
    first.feed(streams["webm"][:5000])
    with pytest.raises(Overloaded) as exc:
        ContainerDecoder("opus", slots=slots).feed(streams["ogg"][:5000])
    assert exc.value.close_code == 1013
    thread = first._thread
    assert thread is not None
    first.close()
    thread.join(2.0)
    third = ContainerDecoder("flac", slots=slots)
    try:
        assert third.feed(streams["flac"]) or third.finish()
    finally:
        third.close()
    assert slots.in_use <= 1


# --------------------------------------------------------------------------- G.711


@pytest.mark.parametrize("law, codec", [("mulaw", "pcm_mulaw"), ("alaw", "pcm_alaw")])
def test_g711_telephony_audio_decodes_to_the_speech(law: str, codec: str,
                                                    speech: np.ndarray) -> None:
    """8 kHz G.711 from libav's encoder, two channels (the same speech) interleaved, cut
    at odd bytes: the speech comes back, the same samples for every cut."""
    pcm8k = soxr.resample(speech.astype(np.float32) / 32768, 16000, 8000)
    enc: av.AudioCodecContext = av.CodecContext.create(codec, "w")  # type: ignore[assignment]
    enc.sample_rate, enc.layout, enc.format = 8000, "mono", "s16"
    frame = av.AudioFrame.from_ndarray(
        (np.clip(pcm8k, -1, 1) * 32767).astype(np.int16).reshape(1, -1), format="s16",
        layout="mono")
    frame.sample_rate = 8000
    mono = b"".join(bytes(p) for p in [*enc.encode(frame), *enc.encode(None)])
    stereo = bytes(np.repeat(np.frombuffer(mono, np.uint8), 2))
    assert parse_stream_format(law, None, "2").sample_rate == 8000  # telephony's default
    whole = decode(law, [stereo], channels=2, rate=8000)
    assert np.array_equal(decode(law, [stereo[i:i + 333] for i in range(0, len(stereo), 333)],
                                 channels=2, rate=8000), whole)
    assert abs(len(whole) - len(speech)) <= 32
    assert similarity(whole, speech) > 0.9


# --------------------------------------------------------------------------- the service


def blobs(data: bytes, count: int, duration: float) -> list[tuple[bytes, float]]:
    """A stream as ``count`` messages cut at arbitrary bytes, each with its share of time."""
    size = -(-len(data) // count)
    return [(data[i:i + size], duration / count) for i in range(0, len(data), size)]


def test_opus_in_webm_through_the_service_gives_the_transcript(stack: Stack,
                                                               speech: np.ndarray) -> None:
    tail = np.zeros(16000, dtype=np.int16)
    data = encode(np.concatenate([speech, tail]), "webm", "libopus", 48000, {"live": "1"})
    url = listen_url(stack.ws_url, encoding="opus")
    res = asyncio.run(stream(url, blobs(data, 48, 12.0), pace=4.0))
    assert res.close_code == 1000, (res.close_code, res.messages[-3:])
    assert res.messages[0].message["encoding"] == "opus"
    assert wer(reference(CLIP), res.text) <= 0.15, res.text


def test_a_corrupt_stream_through_the_service_is_invalid_audio_1007(
        stack: Stack, streams: dict[str, bytes]) -> None:
    data = streams["ogg"]
    broken = data[:3000] + bytes(range(256)) * 40 + data[3000 + 10240:]
    url = listen_url(stack.ws_url, encoding="opus")
    res = asyncio.run(stream(url, blobs(broken, 20, 11.0), pace=None))
    errors = res.of_type("error")
    assert errors and errors[0]["code"] == "invalid_audio", res.messages[-3:]
    assert res.close_code == 1007


def test_unknown_encodings_are_still_refused() -> None:
    with pytest.raises(SttError) as exc:
        parse_stream_format("speex", None, None)
    assert exc.value.code == "unsupported_audio"


# --------------------------------------------------------------------------- hostile input


@settings(max_examples=60, deadline=None, database=None)
@given(st.sampled_from([b"OggS", b"\x1a\x45\xdf\xa3", b"fLaC", b"RIFF"]),
       st.lists(st.binary(max_size=600), max_size=8))
def test_any_bytes_after_a_magic_decode_or_are_invalid_audio(magic: bytes,
                                                             parts: list[bytes]) -> None:
    """Whatever follows a container's first bytes: samples, or invalid_audio (or unsupported
    audio for a WAV header it refuses); never another error, and the decoder's thread
    ends."""
    norm = AudioNormalizer(StreamFormat(AUTO))
    try:
        for part in [magic, *parts]:
            assert norm.feed(part).dtype == np.int16
        norm.flush()
    except (InvalidAudio, UnsupportedAudio):
        pass
    finally:
        norm.close()
    codec = norm._codec
    thread = getattr(codec, "_thread", None)
    if thread is not None:
        thread.join(2.0)
        assert not thread.is_alive()
