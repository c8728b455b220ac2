"""Property-based fuzzing of everything that decodes client bytes: control messages, the
audio normaliser (raw PCM, float, WAV, base64), the WAV header walker, the query string,
credentials and forwarded addresses.

The property is the same everywhere: any input gives a result or one of the service's
own errors (an ``SttError``, which becomes an ``error`` message and a close code) --
never another exception, which would be an internal error.

A quick run is part of the default test suite. The full run (10,000 inputs per target)::

    FUZZ_EXAMPLES=10000 .venv/bin/python -m pytest tests/test_fuzz.py -q
"""

from __future__ import annotations

import base64
import json
import os
import struct
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.access import address_bucket, client_address, parse_networks
from common.audio import (
    ENCODINGS,
    MAX_RATE,
    MIN_RATE,
    AudioNormalizer,
    StreamFormat,
    parse_stream_format,
    parse_wav_header,
)
from common.auth import ApiKeys, TokenSigner, hash_key
from common.codecs import CONTAINER_ENCODINGS
from common.errors import InvalidAudio, SttError
from common.messages import CONTROL_TYPES, parse_control
from ingest.listen_core import ListenParams

# A numpy overflow or invalid-value warning is a bug here too (garbage samples).
pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "300"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# --------------------------------------------------------------------------- inputs

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner,
                                                                max_size=5),
    max_leaves=30)


@st.composite
def control_texts(draw: st.DrawFn) -> str:
    """Text a client might send as a control message: JSON-ish, broken, or deeply nested."""
    kind = draw(st.sampled_from(["json", "object", "broken", "nested", "text"]))
    if kind == "json":
        return json.dumps(draw(json_values))
    if kind == "object":
        obj = draw(st.dictionaries(st.text(max_size=10), json_values, max_size=5))
        if draw(st.booleans()):
            obj["type"] = draw(st.sampled_from([*CONTROL_TYPES, "", "rewind", 5, None]))
        return json.dumps(obj)
    if kind == "broken":
        text = json.dumps(draw(json_values))
        cut = draw(st.integers(0, len(text)))
        return "{" + text[:cut]
    if kind == "nested":
        depth = draw(st.integers(1, 5000))
        opener = draw(st.sampled_from(['{"a":', "[", '{"type":[']))
        return opener * depth
    return draw(st.text(max_size=200))


@st.composite
def wav_messages(draw: st.DrawFn) -> bytes:
    """A RIFF/WAVE message with every header field drawn, honest or not."""
    tag = draw(st.sampled_from([1, 3, 0xFFFE, 0, 2, 0x55]))
    channels = draw(st.sampled_from([0, 1, 2, 3, 65535]))
    rate = draw(st.sampled_from([0, 1, 8000, 16000, 22050, 44100, 48000, 96000, 2**32 - 1]))
    bits = draw(st.sampled_from([0, 8, 12, 16, 24, 32, 64]))
    fmt = struct.pack("<HHIIHH", tag, channels, rate, rate * max(channels, 1) * bits // 8
                      % 2**32, channels * bits // 8 % 2**16, bits)
    if tag == 0xFFFE:
        fmt += struct.pack("<HHI", 22, bits, 0) + struct.pack(
            "<H", draw(st.sampled_from([1, 3, 7]))) + b"\0" * 14
    fmt = fmt[:draw(st.integers(0, len(fmt)))] if draw(st.booleans()) else fmt
    fmt_size = draw(st.sampled_from([len(fmt), 0, 15, 16, 40, 0xFFFFFFFF]))
    data = draw(st.binary(max_size=4096))
    data_size = draw(st.sampled_from([len(data), 0, 0xFFFFFFFF, len(data) + 1, 1]))
    extra = draw(st.sampled_from([b"", b"LIST\x04\x00\x00\x00abcd", b"junk\x03\x00\x00\x00ab"]))
    body = b"WAVE" + extra + b"fmt " + struct.pack("<I", fmt_size) + fmt
    body += b"data" + struct.pack("<I", data_size) + data
    message = b"RIFF" + struct.pack("<I", len(body)) + body
    return message[:draw(st.integers(0, len(message)))] if draw(st.booleans()) else message


formats = st.builds(StreamFormat, st.sampled_from(ENCODINGS),
                    st.sampled_from([MIN_RATE, 11025, 16000, 22050, 44100, MAX_RATE]),
                    st.sampled_from([1, 2]))


def float_bytes(draw: st.DrawFn) -> bytes:
    values = draw(st.lists(st.floats(width=32), max_size=512))
    return np.asarray(values, dtype="<f4").tobytes()


@st.composite
def audio_messages(draw: st.DrawFn) -> bytes | str:
    kind = draw(st.sampled_from(["bytes", "floats", "wav", "base64", "data_url", "text"]))
    if kind == "bytes":
        return draw(st.binary(max_size=8192))
    if kind == "floats":
        return float_bytes(draw)
    if kind == "wav":
        return draw(wav_messages())
    if kind in ("base64", "data_url"):
        raw = draw(st.one_of(st.binary(max_size=2048), wav_messages()))
        text = base64.b64encode(raw).decode()
        return ("data:audio/wav;base64," + text) if kind == "data_url" else text
    return draw(st.text(max_size=300))


def _check_samples(out: Any) -> None:
    assert isinstance(out, np.ndarray) and out.dtype == np.int16 and out.ndim == 1


# --------------------------------------------------------------------------- properties


@FUZZ
@given(control_texts())
def test_control_messages_parse_or_raise_a_service_error(text: str) -> None:
    try:
        control = parse_control(text)
    except SttError:
        return
    assert control.type in CONTROL_TYPES


@FUZZ
@given(formats, st.lists(audio_messages(), min_size=1, max_size=6), st.booleans())
def test_audio_normaliser_never_fails_unexpectedly(
        fmt: StreamFormat, messages: list[bytes | str], flush: bool) -> None:
    normalizer = AudioNormalizer(fmt)
    try:
        for message in messages:
            try:
                out = (normalizer.feed_text(message) if isinstance(message, str)
                       else normalizer.feed(message))
            except SttError:
                return  # the session ends here with that error's close code
            _check_samples(out)
        if flush:
            try:
                _check_samples(normalizer.flush())
            except InvalidAudio:
                # a compressed stream cut short is reported at its end (after its finals)
                assert fmt.encoding in CONTAINER_ENCODINGS
    finally:
        normalizer.close()  # a container decoder's thread


@FUZZ
@given(st.lists(st.binary(min_size=0, max_size=64), max_size=40))
def test_16k_pcm_in_any_split_comes_out_whole(chunks: list[bytes]) -> None:
    """Odd splits of samples across messages lose and invent nothing."""
    normalizer = AudioNormalizer(StreamFormat())
    out = [normalizer.feed(c) for c in chunks]
    joined = b"".join(chunks)
    assert np.concatenate([np.zeros(0, np.int16), *out]).tobytes() == \
        joined[:len(joined) // 2 * 2]


@FUZZ
@given(st.one_of(wav_messages(), st.binary(max_size=512).map(lambda b: b"RIFF" + b)))
def test_wav_header_walker_stays_inside_the_message(data: bytes) -> None:
    try:
        fmt, offset, length = parse_wav_header(data)
    except SttError:
        return
    assert 0 <= offset <= len(data) and 0 <= length and offset + length <= len(data)
    assert MIN_RATE <= fmt.sample_rate <= MAX_RATE and fmt.channels in (1, 2)


query_values = st.one_of(st.text(max_size=30), st.sampled_from(
    ["16000", "0", "-1", "nan", "inf", "1e9", "99999999999999999999", "wav", "pcm_f32le",
     "true", "false", "auto", "en", "ab" * 16, " 16000", "１６０００"]))


@FUZZ
@given(st.dictionaries(
    st.sampled_from(["encoding", "sample_rate", "channels", "language", "interim_results",
                     "session", "after", "token", "x"]),
    st.lists(query_values, min_size=1, max_size=3), max_size=8))
def test_listen_query_validates_or_raises_a_service_error(query: dict[str, list[str]]) -> None:
    try:
        params = ListenParams(query)
    except SttError:
        return
    assert params.format.encoding in ENCODINGS
    assert MIN_RATE <= params.format.sample_rate <= MAX_RATE
    assert params.format.channels in (1, 2)
    assert params.after >= 0


@FUZZ
@given(st.one_of(st.none(), query_values), st.one_of(st.none(), query_values),
       st.one_of(st.none(), query_values))
def test_stream_format_validates_or_raises_a_service_error(
        encoding: str | None, rate: str | None, channels: str | None) -> None:
    try:
        parse_stream_format(encoding, rate, channels)
    except SttError:
        pass


SIGNER = TokenSigner("f" * 40)
KEYS = ApiKeys(f"k={hash_key('stt_known')}")


@FUZZ
@given(st.one_of(
    st.text(max_size=700),
    st.builds(lambda a, b, c: f"{a}.{b}.{c}", st.sampled_from(["stt1", "stt2", ""]),
              st.text(max_size=80), st.text(max_size=80)),
    st.builds(lambda b: "stt1." + base64.urlsafe_b64encode(b).decode().rstrip("=") + ".AAAA",
              st.binary(max_size=200)),
))
def test_credentials_are_accepted_or_refused_cleanly(credential: str) -> None:
    try:
        SIGNER.verify(credential)
    except SttError:
        pass
    assert KEYS.lookup(credential) is None


TRUSTED = parse_networks("127.0.0.1,10.0.0.0/8,::1")


@FUZZ
@given(st.sampled_from(["127.0.0.1", "10.1.2.3", "203.0.113.7", "::1", "garbage", ""]),
       st.lists(st.one_of(st.text(max_size=40), st.ip_addresses().map(str)), max_size=4))
def test_forwarded_for_always_yields_some_address(peer: str, forwarded: list[str]) -> None:
    address = client_address(peer, forwarded, TRUSTED)
    assert isinstance(address, str)
    address_bucket(address)
