"""Deepgram's live protocol at /deepgram/v1/listen (ingest/dialects/deepgram.py).

The wire's words are checked against the official SDK's own message models
(``deepgram-sdk``); the last tests run that SDK, unchanged but for its base URL, against the
running service: a real clip streamed, ``Finalize`` flushing an utterance while the stream
goes on, ``CloseStream`` ending with ``Metadata`` and a normal close, the transcript checked
by WER; and the session it made is an ordinary session of the sessions API.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
import time
import urllib.error
import urllib.request
import uuid
from typing import Any

import numpy as np
import pytest
import websockets
from aiohttp.test_utils import make_mocked_request
from deepgram import DeepgramClient
from deepgram.environment import DeepgramClientEnvironment
from deepgram.listen.v1.types import (
    ListenV1Error,
    ListenV1Metadata,
    ListenV1Results,
    ListenV1SpeechStarted,
    ListenV1UtteranceEnd,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict

from common.access import AccessGuard, select_subprotocol
from common.audio import AUTO
from common.errors import (
    InvalidAudio,
    InvalidMessage,
    MessageTooBig,
    SttError,
    UnsupportedAudio,
)
from common.messages import AudioMarker, Closed, Final, Partial, SessionStarted, Warning, Word
from common.session_meta import ENDPOINTING_DEFAULT, ENDPOINTING_OFF, SessionMeta
from ingest.dialects.deepgram import DeepgramOptions, DeepgramWire, deepgram_params, http_error
from ingest.listen_core import Received
from tests.audio_refs import load_pcm16, reference, wer
from tests.conftest import Stack
from tests.procs import raw

SID = uuid.uuid4().hex
MODEL = "tiny.en"


def query(text: str) -> dict[str, list[str]]:
    from urllib.parse import parse_qs
    return parse_qs(text, keep_blank_values=True)


def wire(**options: Any) -> DeepgramWire:
    w = DeepgramWire(DeepgramOptions(**options), MODEL)
    w.opening(SessionStarted(SID, MODEL, 16000, "pcm_s16le", 1, "en", True))
    return w


def decoded(messages: list[str | bytes]) -> list[dict[str, Any]]:
    return [json.loads(m) for m in messages]


MODELS = {"Results": ListenV1Results, "Metadata": ListenV1Metadata,
          "SpeechStarted": ListenV1SpeechStarted, "UtteranceEnd": ListenV1UtteranceEnd,
          "Error": ListenV1Error}


def sdk_valid(message: dict[str, Any]) -> dict[str, Any]:
    """The message validates against the SDK's model of its type (required fields, types)."""
    MODELS[message["type"]].model_validate(message)
    return message


# --------------------------------------------------------------------------- the query


def test_the_query_maps_to_the_session_s_parameters() -> None:
    params, options = deepgram_params(query(
        "model=nova-3&encoding=linear16&sample_rate=48000&channels=2&language=en-US"
        "&punctuate=true&smart_format=true&endpointing=300&keyterm=Americans&keyterm=JFK"
        "&utterance_end_ms=1000&vad_events=true"))
    fmt = params.format
    assert (fmt.encoding, fmt.sample_rate, fmt.channels) == ("pcm_s16le", 48000, 2)
    assert params.language == "en"
    assert params.interim_results  # partials drive SpeechStarted
    assert options == DeepgramOptions(interim_results=False, vad_events=True,
                                      utterance_end_ms=1000, channels=2)
    assert params.session is None  # Deepgram has no resume
    assert params.endpointing == 300  # ms of silence that end an utterance


@pytest.mark.parametrize("text, ms", [
    ("", ENDPOINTING_DEFAULT), ("endpointing=10", 10), ("endpointing=false", ENDPOINTING_OFF),
    ("endpointing=0", ENDPOINTING_OFF), ("endpointing=1500", 1500),
])
def test_endpointing_is_the_session_s_silence_before_a_final(text: str, ms: int) -> None:
    assert deepgram_params(query(text))[0].endpointing == ms


@pytest.mark.parametrize("text, encoding, rate", [
    ("encoding=mulaw", "mulaw", 8000),
    ("encoding=alaw&sample_rate=16000", "alaw", 16000),
    ("encoding=opus", "opus", 16000),
    ("encoding=ogg-opus", "opus", 16000),
    ("encoding=flac", "flac", 16000),
    ("", AUTO, 16000),  # containerised audio: its header says
])
def test_encodings_map_to_native_ones(text: str, encoding: str, rate: int) -> None:
    params, options = deepgram_params(query(text))
    assert (params.format.encoding, params.format.sample_rate) == (encoding, rate)
    assert not params.interim_results and not options.interim_results  # Deepgram's default


@pytest.mark.parametrize("text, error", [
    ("encoding=speex", UnsupportedAudio),
    ("encoding=linear16&sample_rate=4000", UnsupportedAudio),
    ("multichannel=true&channels=2", UnsupportedAudio),  # needs a raw encoding
    ("multichannel=true&encoding=linear16&channels=1", UnsupportedAudio),
    ("multichannel=true&encoding=opus&channels=2", UnsupportedAudio),
    ("interim_results=maybe", SttError),
    ("utterance_end_ms=soon", SttError),
    ("endpointing=soon", SttError),
    ("endpointing=5", SttError),
    ("endpointing=70000", SttError),
])
def test_a_bad_query_is_refused(text: str, error: type[SttError]) -> None:
    with pytest.raises(error):
        deepgram_params(query(text))


def test_refusals_before_the_upgrade_have_deepgram_s_body() -> None:
    response = http_error(UnsupportedAudio("nope"))
    assert response.status == 400
    assert isinstance(response.body, bytes)
    body = json.loads(response.body)
    assert body["err_code"] == "unsupported_audio" and body["err_msg"] == "nope"
    assert uuid.UUID(body["request_id"])


def test_authorization_token_is_an_api_key_like_bearer() -> None:
    for scheme in ("Token", "token", "Bearer"):
        request = make_mocked_request("GET", "/deepgram/v1/listen",
                                      headers=CIMultiDict({"Authorization": f"{scheme} k1"}))
        assert AccessGuard.credential(request) == "k1"


def test_a_browser_s_token_subprotocol_carries_the_key_and_is_selected() -> None:
    """Deepgram's browser SDKs offer ``token`` and the key: ``token`` is selected (browsers
    fail a handshake that selects none), the key never."""
    request = make_mocked_request("GET", "/deepgram/v1/listen", headers=CIMultiDict(
        {"Sec-WebSocket-Protocol": "token, k2"}))
    assert AccessGuard.credential(request) == "k2"
    assert select_subprotocol(["token", "k2"]) == "token"
    assert select_subprotocol(["stt", "bearer.x"]) == "stt"
    assert select_subprotocol(["token"]) is None


# --------------------------------------------------------------------------- the wire


def test_client_messages_are_deepgram_s_controls() -> None:
    w = wire()
    assert [w.control(json.dumps({"type": t}), 4096).type  # type: ignore[union-attr]
            for t in ("KeepAlive", "Finalize", "CloseStream", "Configure")] == \
        ["keepalive", "finalize", "close", "keepalive"]
    for bad in ('{"type": "close"}', "aGVsbG8=", "[1]", '{"type": 3}'):
        with pytest.raises(InvalidMessage):
            w.control(bad, 4096)


def test_partials_are_interim_results_only_when_asked() -> None:
    partial = Partial(SID, 0, "ask not", "ask", 0.5, 1.4, seq=3)
    assert wire().results(partial) == []
    [out] = decoded(wire(interim_results=True).results(partial))
    sdk_valid(out)
    assert out["is_final"] is False and out["speech_final"] is False
    assert out["channel"]["alternatives"][0]["transcript"] == "ask not"
    assert (out["start"], out["duration"]) == (0.5, 0.9)
    assert out["metadata"]["request_id"] == str(uuid.UUID(SID))


WORDS = (Word(" Ask", 5.5, 5.8, 0.9), Word(" not,", 5.8, 6.2, 0.7))


def test_finals_say_whether_a_finalize_or_a_pause_ended_them() -> None:
    w = wire(vad_events=True, utterance_end_ms=1000)
    first = decoded(w.results(Partial(SID, 0, "ask", "", 5.4, 6.0)))
    assert [m["type"] for m in first] == ["SpeechStarted"]
    assert sdk_valid(first[0])["timestamp"] == 5.4
    # a pause ended utterance 0; the client then sent Finalize at 9.0 s during utterance 1
    paused = decoded(w.results(Final(SID, 0, "Ask not,", 5.4, 6.5, WORDS)))
    w.received('{"type": "Finalize"}', Received([AudioMarker("finalize", 9, 9 * 16000)]))
    flushed = decoded(w.results(Final(SID, 1, "What", 7.0, 9.0,
                                      (Word(" What", 7.1, 7.4, 0.8),))))
    assert [m["type"] for m in paused] == ["Results", "UtteranceEnd"]
    results = [sdk_valid(m) for m in paused + flushed if m["type"] == "Results"]
    assert [(r["is_final"], r["speech_final"], r["from_finalize"]) for r in results] == \
        [(True, True, False), (True, False, True)]
    assert [m["type"] for m in flushed] == ["SpeechStarted", "Results", "UtteranceEnd"]
    words = results[0]["channel"]["alternatives"][0]["words"]
    assert [(x["word"], x["punctuated_word"]) for x in words] == [("ask", "Ask"), ("not", "not,")]
    assert results[0]["channel"]["alternatives"][0]["confidence"] == 0.8
    assert sdk_valid(paused[1])["last_word_end"] == 6.2
    # a Finalize in silence ends nothing: the next utterance's final is not from it
    w.received('{"type": "Finalize"}', Received([AudioMarker("finalize", 10, 12 * 16000)]))
    later = decoded(w.results(Final(SID, 2, "Go.", 12.2, 13.0, (Word(" Go.", 12.3, 12.9, 1),))))
    assert later[-2]["from_finalize"] is False and later[-2]["speech_final"] is True


def test_finals_that_say_what_ended_them_are_flagged_exactly() -> None:
    """With the final's ``ended_by`` nothing is inferred from timing: a Finalize whose final
    ended long before it is still from_finalize, a length cut is neither speech_final nor
    from_finalize, a pause and the stream's end are speech_final."""
    w = wire()
    w.received('{"type": "Finalize"}', Received([AudioMarker("finalize", 9, 20 * 16000)]))
    got = []
    for u, ended_by in enumerate(["finalize", "max_length", "pause", "end"]):
        got += [sdk_valid(m) for m in decoded(w.results(
            Final(SID, u, "Ask not,", 5.4 + u, 6.5 + u, WORDS, ended_by=ended_by)))
            if m["type"] == "Results"]
    assert [(r["is_final"], r["speech_final"], r["from_finalize"]) for r in got] == \
        [(True, False, True), (True, False, False), (True, True, False), (True, True, False)]


def test_multichannel_results_name_their_channel_as_deepgram_s_do() -> None:
    params, options = deepgram_params(query(
        "encoding=linear16&sample_rate=16000&channels=3&multichannel=true&vad_events=true"
        "&utterance_end_ms=1000"))
    assert (params.format.channels, params.format.multichannel, options.multichannel) == \
        (3, True, True)
    w = DeepgramWire(options, MODEL)
    w.opening(SessionStarted(SID, MODEL, 16000, "pcm_s16le", 3, "en", True))
    words = (Word(" Hi.", 0.5, 0.9, 0.9),)
    out = decoded(w.results(Final(SID, 0, " Hi.", 0.5, 0.9, words, seq=4, channel=2)))
    assert [m["type"] for m in out] == ["SpeechStarted", "Results", "UtteranceEnd"]
    assert [m["channel"] if m["type"] != "Results" else m["channel_index"] for m in out] == \
        [[2, 3]] * 3
    sdk_valid(out[1])
    # channel 0's utterance 0 is another utterance: its own SpeechStarted
    out = decoded(w.results(Partial(SID, 0, "Yes", "", 1.0, 1.5, seq=5, channel=0)))
    assert out[0] == {"type": "SpeechStarted", "channel": [0, 3], "timestamp": 1.0}
    assert decoded(w.results(Closed(SID, 2, 3.0, seq=9)))[0]["channels"] == 3


def test_the_end_is_metadata_and_warnings_are_not_sent() -> None:
    w = wire()
    audio = [b"\x01\x02" * 800, b"\x03" * 999]
    for chunk in audio:
        w.received(chunk, Received())
    assert w.results(Warning(SID, "lagging", "behind")) == []
    [meta] = decoded(w.results(Closed(SID, 2, 12.5)))
    sdk_valid(meta)
    assert meta["duration"] == 12.5 and meta["channels"] == 1
    assert meta["sha256"] == hashlib.sha256(b"".join(audio)).hexdigest()
    assert meta["request_id"] == str(uuid.UUID(SID))


def test_errors_are_an_error_message_and_the_native_close_code() -> None:
    messages, code, reason = wire().error(InvalidAudio("the Ogg stream is corrupt"))
    [body] = decoded(messages)
    sdk_valid(body)
    assert body["variant"] == "invalid_audio" and "corrupt" in body["description"]
    assert (code, reason) == (1007, "DATA-0000")


# --------------------------------------------------------------------------- the service

CLIP = "fw_jfk"
FINALIZE_AT_S = 7.0  # inside "your country can do for you" (5.5 - 7.8 s)


def sdk_client(stack: Stack) -> DeepgramClient:
    base = f"{stack.ws_url}/deepgram"
    env = DeepgramClientEnvironment(base=f"{stack.http_url}/deepgram", production=base,
                                    agent=base, agent_rest=f"{stack.http_url}/deepgram")
    return DeepgramClient(api_key="a-deepgram-key", environment=env)


@pytest.fixture(scope="module")
def sdk_run(stack: Stack) -> dict[str, Any]:
    """The official SDK streams the clip (4x real time), sends Finalize mid-utterance,
    waits for its result, streams the rest, then KeepAlive and CloseStream."""
    pcm = np.concatenate([load_pcm16(CLIP), np.zeros(16000, np.int16)])
    got: list[tuple[float, Any]] = []
    failure: list[BaseException] = []
    flushed = threading.Event()
    client = sdk_client(stack)
    with client.listen.v1.connect(
            model="nova-3", encoding="linear16", sample_rate=16000, channels=1,
            interim_results=True, vad_events=True, utterance_end_ms=1000, punctuate=True,
            smart_format=True, endpointing=300, keyterm="Americans") as conn:

        def read() -> None:
            try:
                for message in conn:
                    got.append((time.monotonic(), message))
                    if isinstance(message, ListenV1Results) and message.from_finalize:
                        flushed.set()
            except BaseException as exc:  # the test reports it
                failure.append(exc)

        reader = threading.Thread(target=read)
        reader.start()
        step = 1600
        split = int(FINALIZE_AT_S * 16000)
        for i in range(0, split, step):
            conn.send_media(pcm[i:min(i + step, split)].tobytes())
            time.sleep(0.025)
        conn.send_finalize()
        finalized_at = time.monotonic()
        flushed.wait(15.0)
        for i in range(split, len(pcm), step):
            conn.send_media(pcm[i:i + step].tobytes())
            time.sleep(0.025)
        conn.send_keep_alive()
        conn.send_close_stream()
        reader.join(60.0)
    return {"got": got, "failure": failure, "finalized_at": finalized_at}


def test_the_deepgram_sdk_transcribes_a_clip(sdk_run: dict[str, Any]) -> None:
    assert not sdk_run["failure"], sdk_run["failure"]  # the server closed with 1000
    messages = [m for _, m in sdk_run["got"]]
    assert isinstance(messages[-1], ListenV1Metadata), messages[-3:]
    finals = [m for m in messages if isinstance(m, ListenV1Results) and m.is_final]
    text = " ".join(f.channel.alternatives[0].transcript for f in finals)
    assert wer(reference(CLIP), text) <= 0.15, text
    # (interim Results are not required here: a loaded transcriber sheds partials first;
    # their mapping is test_partials_are_interim_results_only_when_asked)
    assert any(isinstance(m, ListenV1SpeechStarted) for m in messages)
    assert any(isinstance(m, ListenV1UtteranceEnd) for m in messages)
    ids = {m.metadata.request_id for m in finals} | {messages[-1].request_id}
    assert len(ids) == 1
    assert 11.5 <= messages[-1].duration <= 12.5
    words = [w for f in finals for w in f.channel.alternatives[0].words]
    assert words and all(w.start <= w.end for w in words)


def test_finalize_flushes_the_utterance_and_the_stream_goes_on(
        sdk_run: dict[str, Any]) -> None:
    got = sdk_run["got"]
    flushed = [(at, m) for at, m in got if isinstance(m, ListenV1Results) and m.from_finalize]
    assert len(flushed) == 1, [m for _, m in got]
    at, result = flushed[0]
    assert result.is_final and not result.speech_final
    end = result.start + result.duration  # its last word
    assert result.start < FINALIZE_AT_S and FINALIZE_AT_S - 0.5 < end <= FINALIZE_AT_S + 0.01
    print(f"\nFinalize → its final in {at - sdk_run['finalized_at']:.3f} s")
    after = [m for t, m in got if t > at and isinstance(m, ListenV1Results) and m.is_final]
    assert after and all(m.start >= FINALIZE_AT_S - 0.05 for m in after)
    assert " ".join(m.channel.alternatives[0].transcript for m in after).strip()


def test_the_session_is_an_ordinary_session(stack: Stack, sdk_run: dict[str, Any]) -> None:
    meta = sdk_run["got"][-1][1]
    sid = uuid.UUID(meta.request_id).hex
    with urllib.request.urlopen(f"{stack.http_url}/v1/sessions/{sid}/transcript.txt") as r:
        stored = r.read().decode()
    finals = [m for _, m in sdk_run["got"] if isinstance(m, ListenV1Results) and m.is_final]
    assert wer(" ".join(f.channel.alternatives[0].transcript for f in finals), stored) == 0
    raw_meta = stack.redis.client().hgetall(f"stt:{{{sid}}}:meta")
    assert SessionMeta.decode(raw_meta).endpointing == 300  # the SDK's endpointing=300


@pytest.mark.parametrize("path, send, variant, code", [
    ("?encoding=linear16", ['{"type": "Flush"}'], "invalid_message", 1007),
    ("?encoding=speex", [], "unsupported_audio", 1003),
    ("?encoding=opus", [b"OggS" + bytes(100), '{"type": "CloseStream"}'], "invalid_audio",
     1007),
    # the native limits, in Deepgram's words: 6.25 s of audio in one message, a 5 KB control
    ("?encoding=linear16", [bytes(200_000)], "message_too_big", 1009),
    ("?encoding=linear16", [json.dumps({"type": "KeepAlive", "pad": "x" * 5000})],
     "message_too_big", 1009),
    ("?encoding=linear16&sample_rate=96000", [], "unsupported_audio", 1003),
])
def test_bad_input_gets_an_error_message_and_a_close_code(
        stack: Stack, path: str, send: list[str | bytes], variant: str, code: int) -> None:
    received, close_code = asyncio.run(raw(f"{stack.ws_url}/deepgram/v1/listen{path}", send))
    errors = [sdk_valid(m) for m in received if m["type"] == "Error"]
    assert [e["variant"] for e in errors] == [variant], received
    assert close_code == code


def test_a_browser_client_offering_its_key_as_a_subprotocol_connects(stack: Stack) -> None:
    async def go() -> str | None:
        async with websockets.connect(f"{stack.ws_url}/deepgram/v1/listen",
                                      subprotocols=["token", "a-key"]) as ws:  # type: ignore[list-item]
            await ws.send('{"type": "CloseStream"}')
            with pytest.raises(websockets.ConnectionClosedOK):
                while True:
                    json.loads(await ws.recv())
            return ws.subprotocol
    assert asyncio.run(go()) == "token"


def test_plain_http_is_refused_in_deepgram_s_words(stack: Stack) -> None:
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(f"{stack.http_url}/deepgram/v1/listen")
    assert exc.value.code == 426
    assert json.loads(exc.value.read())["err_code"] == "websocket_required"


# --------------------------------------------------------------------------- hostile input

FUZZ = settings(max_examples=80, deadline=None, database=None)
JSONISH = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                       lambda kids: st.lists(kids, max_size=4)
                       | st.dictionaries(st.text(max_size=10), kids, max_size=4), max_leaves=12)


@FUZZ
@given(st.one_of(st.text(max_size=200), JSONISH.map(json.dumps),
                 st.dictionaries(st.just("type"), JSONISH).map(json.dumps)))
def test_any_text_is_a_control_or_its_client_error(text: str) -> None:
    try:
        control = wire().control(text, 4096)
    except (InvalidMessage, MessageTooBig):
        return
    assert control is not None and control.type in ("keepalive", "finalize", "close")


@FUZZ
@given(st.dictionaries(st.text(max_size=20), st.lists(st.text(max_size=12), max_size=3),
                       max_size=8))
def test_any_query_is_parameters_or_a_client_error(q: dict[str, list[str]]) -> None:
    try:
        params, _ = deepgram_params(q)
    except SttError as exc:
        assert exc.close_code in (1003, 1008), exc
        return
    assert params.format.channels in (1, 2)
