"""Twilio Media Streams at /v1/twilio (ingest/dialects/twilio.py).

Twilio's documented event sequence (``connected``, ``start``, ``media`` every 20 ms, ``mark``,
``dtmf``, ``stop``) is replayed at real time with real speech converted to 8 kHz μ-law; the
transcript is read from the sessions API under the id derived from ``streamSid``. The
credential may come in ``customParameters`` (a ``<Stream>`` URL takes no query string).
"""

from __future__ import annotations

import asyncio
import base64
import json
import urllib.request
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import websockets
from hypothesis import given, settings
from hypothesis import strategies as st

from common.auth import hash_key, new_key
from common.errors import (
    BadRequest,
    InvalidAudio,
    InvalidMessage,
    TooManyMessages,
    UnsupportedAudio,
)
from common.ratelimit import MessageLimits
from ingest.dialects.twilio import (
    CLOSE,
    KEEPALIVE,
    TwilioWire,
    parse_start,
    session_for,
    twilio_params,
)
from tests.audio_refs import load_pcm16, mulaw, reference, wer
from tests.conftest import Stack
from tests.procs import Service, start_gateway

CLIP, OTHER = "mfa_ls_61-70968-0000", "ps_librivox_0870"
ACCOUNT, CALL = "AC" + "0" * 32, "CA" + "1" * 32
KEY = new_key()


def start_event(stream_sid: str, tracks: tuple[str, ...] = ("inbound", "outbound"),
                **custom: str) -> dict[str, Any]:
    return {"event": "start", "sequenceNumber": "1", "streamSid": stream_sid, "start": {
        "accountSid": ACCOUNT, "streamSid": stream_sid, "callSid": CALL,
        "tracks": list(tracks), "customParameters": custom,
        "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}}}


def media(stream_sid: str, seq: int, track: str, chunk: bytes, at_ms: int) -> str:
    return json.dumps({"event": "media", "sequenceNumber": str(seq), "streamSid": stream_sid,
                       "media": {"track": track, "chunk": str(seq), "timestamp": str(at_ms),
                                 "payload": base64.b64encode(chunk).decode()}})


async def call(url: str, stream_sid: str, inbound: bytes, outbound: bytes = b"",
               pace: float = 1.0, **custom: str) -> tuple[int | None, str]:
    """One Twilio stream, as Twilio sends it: 20 ms of μ-law per media event, at ``pace``
    × real time; both tracks when ``outbound`` (each event stamped with its track's
    ``timestamp``). (close code, reason)."""
    seq = 0
    tracks = ("inbound", "outbound") if outbound else ("inbound",)
    async with websockets.connect(url) as ws:
        await ws.send(json.dumps({"event": "connected", "protocol": "Call",
                                  "version": "1.0.0"}))
        await ws.send(json.dumps(start_event(stream_sid, tracks, **custom)))
        loop = asyncio.get_running_loop()
        began = loop.time()
        try:
            for i, pos in enumerate(range(0, len(inbound), 160)):
                for track, audio in (("inbound", inbound), ("outbound", outbound)):
                    if audio[pos:pos + 160]:
                        seq += 1
                        await ws.send(media(stream_sid, seq, track, audio[pos:pos + 160],
                                            20 * i))
                if i == 50:
                    await ws.send(json.dumps({"event": "mark", "streamSid": stream_sid,
                                              "mark": {"name": "greeting"}}))
                    await ws.send(json.dumps({"event": "dtmf", "streamSid": stream_sid,
                                              "dtmf": {"track": "inbound_track",
                                                       "digit": "1"}}))
                await asyncio.sleep(max(0.0, began + (i + 1) * 0.02 / pace - loop.time()))
            await ws.send(json.dumps({"event": "stop", "streamSid": stream_sid,
                                      "stop": {"accountSid": ACCOUNT, "callSid": CALL}}))
            async for _ in ws:
                pass  # Twilio is sent nothing back
        except websockets.ConnectionClosed:
            pass
        return ws.close_code, ws.close_reason


def transcript(http_url: str, sid: str) -> str:
    with urllib.request.urlopen(f"{http_url}/v1/sessions/{sid}/transcript.txt") as r:
        return str(r.read().decode())


# --------------------------------------------------------------------------- the events


def test_start_names_the_stream_and_its_session() -> None:
    start = parse_start(start_event("MZ" + "a" * 32, token="t1", language="en"))
    assert (start.stream_sid, start.call_sid, start.tracks) == \
        ("MZ" + "a" * 32, CALL, ("inbound", "outbound"))
    assert start.token == "t1" and start.session_id == session_for("MZ" + "a" * 32)
    assert len(start.session_id) == 32 and start.session_id != session_for("MZ" + "b" * 32)
    params = twilio_params(start)
    fmt = params.format
    # both tracks: two channels, each transcribed apart (inbound 0, outbound 1)
    assert (fmt.encoding, fmt.sample_rate, fmt.channels, fmt.multichannel,
            params.language) == ("mulaw", 8000, 2, True, "en")
    one = twilio_params(parse_start(start_event("MZ" + "a" * 32, ("inbound",)))).format
    assert (one.channels, one.multichannel) == (1, False)


@pytest.mark.parametrize("change, error", [
    ({"mediaFormat": {"encoding": "audio/x-l16", "sampleRate": 16000, "channels": 1}},
     UnsupportedAudio),
    ({"streamSid": ""}, BadRequest),
    ({"tracks": ["sideways"]}, BadRequest),
    ({"customParameters": {"n": 1}}, BadRequest),
])
def test_a_bad_start_is_refused(change: dict[str, Any], error: type[Exception]) -> None:
    event = start_event("MZ1")
    event["start"].update(change)
    with pytest.raises(error):
        parse_start(event)


def test_events_unwrap_to_what_the_session_reads() -> None:
    wire = TwilioWire(parse_start(start_event("MZ1", ("inbound",))))
    assert wire.inbound(media("MZ1", 2, "inbound", b"\xff\x7f", 0)) == b"\xff\x7f"
    assert wire.inbound(media("MZ1", 3, "outbound", b"\xff\x7f", 0)) is None  # dropped
    both = TwilioWire(parse_start(start_event("MZ2")))
    assert both.inbound(media("MZ2", 2, "inbound", b"\x01\x02", 0)) is None  # waits
    assert both.inbound(media("MZ2", 3, "outbound", b"\x03\x04", 0)) == b"\x01\x03\x02\x04"
    assert both.inbound(media("MZ2", 4, "inbound", b"\x05", 1)) is None  # 1 ms = 8 samples
    # the end: the outbound track is filled with silence up to the inbound one's end
    assert both.inbound('{"event": "stop", "stop": {}}') == [
        b"\xff\xff" * 6 + b"\x05\xff", CLOSE]
    assert wire.inbound('{"event": "mark", "mark": {"name": "x"}}') == KEEPALIVE
    assert wire.inbound('{"event": "dtmf", "dtmf": {"digit": "1"}}') == KEEPALIVE
    assert wire.inbound('{"event": "stop", "stop": {}}') == CLOSE
    with pytest.raises(InvalidAudio):
        wire.inbound('{"event": "media", "media": {"payload": "not base64!"}}')
    for bad in (b"\x00\x01", "hello", '{"event": "clear"}', '{"event": "media"}'):
        with pytest.raises(InvalidMessage):
            wire.inbound(bad)


# --------------------------------------------------------------------------- the service


def test_a_call_replayed_at_real_time_is_transcribed_track_by_track(stack: Stack) -> None:
    """The caller's speech on the inbound track, the agent's (what the caller hears) on the
    outbound track, starting 3 s in, while the caller still speaks: each track is a channel
    of the session (inbound 0, outbound 1), transcribed apart."""
    caller, agent = load_pcm16(CLIP), load_pcm16(OTHER)
    length = 3 * 16000 + len(agent) + 16000
    inbound, outbound = np.zeros(length, np.int16), np.zeros(length, np.int16)
    inbound[:len(caller)] = caller
    outbound[3 * 16000:3 * 16000 + len(agent)] = agent
    stream_sid = "MZ" + "c" * 32
    code, _ = asyncio.run(call(f"{stack.ws_url}/v1/twilio", stream_sid, mulaw(inbound),
                               mulaw(outbound)))
    assert code == 1000
    sid = session_for(stream_sid)
    with urllib.request.urlopen(f"{stack.http_url}/v1/sessions/{sid}/transcript.json") as r:
        said = json.loads(r.read())["utterances"]
    assert said and all(u["channel"] in (0, 1) for u in said)
    for channel, clip in ((0, CLIP), (1, OTHER)):
        text = " ".join(u["text"] for u in said if u["channel"] == channel)
        assert wer(reference(clip), text) <= 0.25, (channel, text)
    assert transcript(stack.http_url, sid).startswith("[channel 0] ")


@pytest.mark.parametrize("first, code", [
    (b"\x00" * 10, 1007),
    ("not json", 1007),
    ('{"event": "media", "media": {"payload": ""}}', 1008),
])
def test_a_stream_that_is_not_twilio_s_is_closed_with_a_code(
        stack: Stack, first: str | bytes, code: int) -> None:
    async def go() -> int | None:
        async with websockets.connect(f"{stack.ws_url}/v1/twilio") as ws:
            await ws.send(first)
            with pytest.raises(websockets.ConnectionClosed):
                await ws.recv()
            return ws.close_code
    assert asyncio.run(go()) == code


@pytest.fixture(scope="module")
def secured(stack: Stack) -> Iterator[tuple[Service, int]]:
    """A gateway on the stack's Redis that requires an API key."""
    gateway, port = start_gateway(stack.redis.url, AUTH="required",
                                  API_KEYS=f"phone={hash_key(KEY)}")
    yield gateway, port
    gateway.stop()


@pytest.mark.parametrize("where", ["customParameters", "query"])
def test_the_credential_may_come_in_custom_parameters_or_the_url(
        secured: tuple[Service, int], where: str) -> None:
    _, port = secured
    audio = mulaw(np.zeros(8000, np.int16))
    url = f"ws://127.0.0.1:{port}/v1/twilio"
    stream_sid = f"MZ{where}"
    custom = {"token": KEY} if where == "customParameters" else {}
    if where == "query":
        url += f"?token={KEY}"
    code, _ = asyncio.run(call(url, stream_sid, audio, pace=8.0, **custom))
    assert code == 1000
    code, reason = asyncio.run(call(f"ws://127.0.0.1:{port}/v1/twilio", "MZnone", audio,
                                    pace=8.0))
    assert (code, reason) == (1008, "unauthorized")


def test_the_dropped_track_is_counted_apart_and_bounded() -> None:
    """A track the stream did not ask for (Twilio sends only those it named) is read and
    dropped, counted against a bucket of its own, as are the events a both-tracks stream
    holds until the other track reaches them, so a call stays within the session's message
    rate and a flood of ignored events still ends the connection."""
    wire = TwilioWire(parse_start(start_event("MZ1", ("inbound",))),
                      MessageLimits(0, 100.0, 10, 0.0))
    with pytest.raises(TooManyMessages):
        for seq in range(20):
            wire.inbound(media("MZ1", seq, "outbound", b"\xff" * 160, 20 * seq))
    wire = TwilioWire(parse_start(start_event("MZ1")), MessageLimits(0, 100.0, 10, 0.0))
    with pytest.raises(TooManyMessages):
        for seq in range(20):
            wire.inbound(media("MZ1", seq, "outbound", b"\xff" * 160, 20 * seq))


# --------------------------------------------------------------------------- hostile input

FUZZ = settings(max_examples=80, deadline=None, database=None)
JSONISH = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                       lambda kids: st.lists(kids, max_size=4)
                       | st.dictionaries(st.text(max_size=10), kids, max_size=4), max_leaves=12)
EVENTS = st.fixed_dictionaries({"event": st.sampled_from(
    ["media", "start", "stop", "mark", "dtmf", "connected", "clear"])}, optional={
    "media": JSONISH, "start": JSONISH, "streamSid": JSONISH})


@FUZZ
@given(st.one_of(st.binary(max_size=64), st.text(max_size=100), JSONISH.map(json.dumps),
                 EVENTS.map(json.dumps)))
def test_any_message_unwraps_or_is_its_client_error(message: str | bytes) -> None:
    wire = TwilioWire(parse_start(start_event("MZ1")))
    try:
        native = wire.inbound(message)
    except (InvalidMessage, InvalidAudio):
        return
    assert native is None or isinstance(native, bytes) or native in (KEEPALIVE, CLOSE) or \
        (isinstance(native, list) and native[-1] == CLOSE)


@FUZZ
@given(EVENTS.map(lambda e: {**e, "event": "start"}))
def test_any_start_is_a_stream_or_its_client_error(event: dict[str, Any]) -> None:
    try:
        start = parse_start(event)
    except (BadRequest, UnsupportedAudio):
        return
    assert len(start.session_id) == 32
