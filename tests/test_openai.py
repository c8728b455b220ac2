"""OpenAI's transcription APIs: /v1/realtime?intent=transcription and POST
/v1/audio/transcriptions (ingest/dialects/openai.py).

The wire's events are checked against the official SDK's own event models (``openai``);
the last tests run that SDK, unchanged but for ``base_url``, against the running service: a
real clip streamed over the realtime client (24 kHz PCM, server VAD, a commit at the end)
and uploaded through ``audio.transcriptions.create`` as json, verbose_json with words, and
srt; the transcripts are checked by WER, and the sessions they made are ordinary sessions.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import json
import time
import urllib.error
import urllib.request
from typing import Any

import numpy as np
import openai as openai_sdk
import pytest
import soxr
import websockets
from hypothesis import given, settings
from hypothesis import strategies as st
from openai.types.audio import Transcription, TranscriptionVerbose
from openai.types.realtime import (
    ConversationItemInputAudioTranscriptionCompletedEvent,
    ConversationItemInputAudioTranscriptionDeltaEvent,
    InputAudioBufferClearedEvent,
    InputAudioBufferCommittedEvent,
    InputAudioBufferSpeechStartedEvent,
    InputAudioBufferSpeechStoppedEvent,
    RealtimeErrorEvent,
    SessionCreatedEvent,
    SessionUpdatedEvent,
)

from common.codecs import g711_table
from common.errors import BadRequest, InvalidMessage, SttError, UnsupportedAudio
from common.messages import Final, Partial, Word
from ingest.dialects.openai import (
    KEEPALIVE,
    RealtimeConfig,
    RealtimeWire,
    Upload,
    check_intent,
    decode_file,
    transcription_response,
    updated,
    upload_entries,
)
from tests.audio_refs import load_pcm16, reference, wav_bytes, wer
from tests.conftest import Stack
from tests.procs import raw, start_gateway, wait_until

SID = "0123456789abcdef0123456789abcdef"
MODELS: dict[str, Any] = {
    "session.created": SessionCreatedEvent,
    "session.updated": SessionUpdatedEvent,
    "input_audio_buffer.speech_started": InputAudioBufferSpeechStartedEvent,
    "input_audio_buffer.speech_stopped": InputAudioBufferSpeechStoppedEvent,
    "input_audio_buffer.committed": InputAudioBufferCommittedEvent,
    "input_audio_buffer.cleared": InputAudioBufferClearedEvent,
    "conversation.item.input_audio_transcription.delta":
        ConversationItemInputAudioTranscriptionDeltaEvent,
    "conversation.item.input_audio_transcription.completed":
        ConversationItemInputAudioTranscriptionCompletedEvent,
    "error": RealtimeErrorEvent,
}


def events(messages: list[str | bytes]) -> list[dict[str, Any]]:
    """The messages as events, each validated by the SDK's model of its type."""
    out = [json.loads(m) for m in messages]
    for event in out:
        MODELS[event["type"]].model_validate(event)
    return out


def ga_update(**audio_input: Any) -> dict[str, Any]:
    return {"type": "session.update",
            "session": {"type": "transcription", "audio": {"input": audio_input}}}


# --------------------------------------------------------------------------- configuration


def test_session_update_sets_the_session_s_format_language_and_turns() -> None:
    config = updated(RealtimeConfig(), ga_update(
        format={"type": "audio/pcmu"},
        transcription={"model": "gpt-4o-transcribe", "language": "en-US", "prompt": "JFK"},
        turn_detection=None))
    params = config.listen_params()
    assert (params.format.encoding, params.format.sample_rate) == ("mulaw", 8000)
    assert params.language == "en" and params.interim_results
    assert not config.server_vad and config.prompt == "JFK"
    # fields an update leaves out keep their values; the beta API's flat shape works too
    beta = updated(config, {"type": "transcription_session.update", "session": {
        "input_audio_format": "g711_alaw",
        "turn_detection": {"type": "server_vad", "silence_duration_ms": 700}}})
    assert (beta.format, beta.language, beta.server_vad) == ("audio/pcma", "en", True)
    default = RealtimeConfig().listen_params().format
    assert (default.encoding, default.sample_rate) == ("pcm_s16le", 24000)


@pytest.mark.parametrize("update, error", [
    (ga_update(format={"type": "audio/pcm", "rate": 16000}), UnsupportedAudio),
    (ga_update(format={"type": "audio/opus"}), UnsupportedAudio),
    (ga_update(turn_detection={"type": "push_to_talk"}), BadRequest),
    (ga_update(turn_detection={"type": "server_vad", "silence_duration_ms": -5}), BadRequest),
    (ga_update(transcription={"language": "en; drop"}), BadRequest),
    ({"type": "session.update", "session": {"type": "realtime"}}, BadRequest),
])
def test_a_bad_session_update_is_refused(update: dict[str, Any], error: type) -> None:
    with pytest.raises(error):
        updated(RealtimeConfig(), update)


def test_only_transcription_intent_is_served() -> None:
    check_intent({"intent": ["transcription"]})
    for query in ({}, {"model": ["gpt-realtime"]}, {"intent": ["conversation"]}):
        with pytest.raises(BadRequest):
            check_intent(query)


# --------------------------------------------------------------------------- the wire


def wire(**config: Any) -> RealtimeWire:
    return RealtimeWire(SID, RealtimeConfig(**config))


def test_client_events_become_native_messages_and_replies() -> None:
    w = wire(turn_detection=None)
    audio = base64.b64encode(bytes(4800)).decode()
    commit = json.dumps({"type": "input_audio_buffer.commit"})
    assert w.inbound(commit) == KEEPALIVE  # nothing appended yet: a non-fatal error
    [empty] = events(w.replies())
    assert empty["error"]["code"] == "input_audio_buffer_commit_empty"
    assert w.inbound(json.dumps({"type": "input_audio_buffer.append", "audio": audio})) == audio
    finalize = w.inbound(commit)
    assert isinstance(finalize, str)
    control = w.control(finalize, 4096)
    assert control is not None and control.type == "finalize"
    assert w.inbound(json.dumps({"type": "input_audio_buffer.clear"})) == KEEPALIVE
    assert [e["type"] for e in events(w.replies())] == ["input_audio_buffer.cleared"]
    assert w.inbound(json.dumps(ga_update(turn_detection={"type": "server_vad"}))) == KEEPALIVE
    assert [e["type"] for e in events(w.replies())] == ["session.updated"]
    assert w.config.server_vad
    # the format is the session's once audio came: an error event, the rest applies
    assert w.inbound(json.dumps(ga_update(format={"type": "audio/pcmu"}))) == KEEPALIVE
    replies = events(w.replies())
    assert [e["type"] for e in replies] == ["error", "session.updated"]
    assert w.config.format == "audio/pcm"
    assert w.inbound(json.dumps({"type": "response.create"})) == KEEPALIVE
    assert [e["type"] for e in events(w.replies())] == ["error"]
    for bad in (b"\x00\x01", "not json", "[1]", '{"type": 3}',
                '{"type": "input_audio_buffer.append"}'):
        with pytest.raises(InvalidMessage):
            w.inbound(bad)


WORDS = (Word(" Ask", 5.5, 5.8, 0.9), Word(" not", 5.8, 6.2, 0.7))


def test_results_are_speech_events_deltas_and_completed_items() -> None:
    w = wire()
    first = events(w.results(Partial(SID, 0, " Ask not", " Ask", 5.4, 6.0)))
    assert [e["type"] for e in first] == ["input_audio_buffer.speech_started",
                                          "conversation.item.input_audio_transcription.delta"]
    item = first[0]["item_id"]
    assert first[0]["audio_start_ms"] == 5400 and first[1]["delta"] == "Ask"
    # unstable text is not sent; a revision of it changes nothing sent
    assert w.results(Partial(SID, 0, " Ask nut", " Ask", 5.4, 6.1)) == []
    final = events(w.results(Final(SID, 0, " Ask not.", 5.4, 6.5, WORDS)))
    assert [e["type"] for e in final] == [
        "input_audio_buffer.speech_stopped", "input_audio_buffer.committed",
        "conversation.item.input_audio_transcription.delta",
        "conversation.item.input_audio_transcription.completed"]
    assert {e["item_id"] for e in final} == {item}
    assert final[0]["audio_end_ms"] == 6500 and final[1]["previous_item_id"] is None
    assert first[1]["delta"] + final[2]["delta"] == final[3]["transcript"] == "Ask not."
    second = events(w.results(Final(SID, 1, " What?", 7.0, 8.0)))
    assert second[2]["previous_item_id"] == item and second[2]["item_id"] != item
    assert w.results(Final(SID, 2, "", 9.0, 9.5)) == []  # silence made no item
    assert len({e["event_id"] for e in first + final + second}) == len(first + final + second)


def test_manual_turns_have_no_vad_events_and_errors_close() -> None:
    w = wire(turn_detection=None)
    got = events(w.results(Partial(SID, 3, " Go", " Go", 1.0, 1.5))
                 + w.results(Final(SID, 3, " Go.", 1.0, 1.6)))
    assert [e["type"] for e in got] == [
        "conversation.item.input_audio_transcription.delta", "input_audio_buffer.committed",
        "conversation.item.input_audio_transcription.delta",
        "conversation.item.input_audio_transcription.completed"]
    messages, code, reason = w.error(UnsupportedAudio("nope"))
    [error] = events(messages)
    assert error["error"]["code"] == "unsupported_audio" and (code, reason) == \
        (1003, "unsupported_audio")


# --------------------------------------------------------------------------- uploads


def test_an_upload_is_decoded_framed_and_answered_in_each_format() -> None:
    tone = (np.sin(np.arange(48000) / 10) * 8000).astype(np.int16)
    pcm = decode_file(wav_bytes(tone, 48000), 60.0)
    assert abs(len(pcm) - 16000) < 64  # resampled to 16 kHz
    entries = upload_entries(pcm)
    assert [e.seq for e in entries] == [1, 2] and entries[-1].offset == len(pcm)
    with pytest.raises(BadRequest):
        decode_file(wav_bytes(tone, 48000), 0.5)
    finals = [Final(SID, 0, " Ask not.", 0.5, 1.2, WORDS), Final(SID, 1, " ", 2.0, 2.1)]
    for fmt, check in [
        ("json", lambda b: json.loads(b) == {"text": "Ask not.",
                                            "usage": {"type": "duration", "seconds": 3}}),
        ("text", lambda b: b == "Ask not.\n"),
        ("srt", lambda b: b.startswith("1\n00:00:05,500 --> 00:00:06,200\nAsk not")),
        ("vtt", lambda b: b.startswith("WEBVTT")),
    ]:
        response = transcription_response(Upload(response_format=fmt), finals, 2.5, SID)
        assert response.headers["X-Session-Id"] == SID
        assert check(response.text), (fmt, response.text)
    verbose = transcription_response(
        Upload(response_format="verbose_json", granularities=("word",)), finals, 2.5, SID)
    body = TranscriptionVerbose.model_validate(json.loads(verbose.text or ""))
    assert body.words and [w.word for w in body.words] == ["Ask", "not"]
    assert body.segments is None and body.duration == 2.5


# --------------------------------------------------------------------------- the service

CLIP = "fw_jfk"
SPEED = 4.0  # times real time the clip is streamed


def pcm24(pcm16: np.ndarray) -> np.ndarray:
    """16 kHz int16 as 24 kHz int16 (OpenAI's audio/pcm)."""
    up = soxr.resample(pcm16.astype(np.float32) / 32768, 16000, 24000)
    return (np.clip(up, -1, 1) * 32767).astype(np.int16)


@pytest.fixture(scope="module")
def realtime_run(stack: Stack) -> dict[str, Any]:
    """The SDK's realtime client: session.update (24 kHz PCM, server VAD, English), the clip
    streamed at 4x real time in 100 ms appends, then a commit; events read until the items
    hold the clip and 1 s passes without one (40 s at most)."""
    audio = pcm24(load_pcm16(CLIP))

    async def go() -> dict[str, Any]:
        client = openai_sdk.AsyncOpenAI(base_url=f"{stack.http_url}/v1", api_key="sk-test")
        got: list[Any] = []
        async with client.realtime.connect(extra_query={"intent": "transcription"}) as conn:
            await conn.session.update(session={
                "type": "transcription",
                "audio": {"input": {
                    "format": {"type": "audio/pcm", "rate": 24000},
                    "transcription": {"model": "gpt-4o-transcribe", "language": "en"},
                    "turn_detection": {"type": "server_vad", "silence_duration_ms": 500,
                                       "prefix_padding_ms": 300}}}})

            async def read() -> None:
                async for event in conn:
                    got.append(event)

            reader = asyncio.create_task(read())
            step = 2400
            for i in range(0, len(audio), step):
                await conn.input_audio_buffer.append(
                    audio=base64.b64encode(audio[i:i + step].tobytes()).decode())
                await asyncio.sleep(0.1 / SPEED)
            await conn.input_audio_buffer.commit()
            # until the items hold the clip and 1 s passed without an event (or 40 s)
            deadline = time.monotonic() + 40
            seen, quiet_since = -1, time.monotonic()
            while time.monotonic() < deadline:
                await asyncio.sleep(0.1)
                if seen != len(got):
                    seen, quiet_since = len(got), time.monotonic()
                elif time.monotonic() - quiet_since >= 1.0 and wer(reference(CLIP), " ".join(
                        e.transcript for e in got if isinstance(
                            e, ConversationItemInputAudioTranscriptionCompletedEvent))) <= 0.15:
                    break
            reader.cancel()
        return {"events": got}

    return asyncio.run(go())


def test_the_realtime_client_transcribes_a_clip(realtime_run: dict[str, Any]) -> None:
    got = realtime_run["events"]
    kinds = [e.type for e in got]
    assert kinds[:2] == ["session.created", "session.updated"], kinds
    assert got[1].session.audio.input.transcription.language == "en"
    assert "error" not in kinds, [e for e in got if e.type == "error"]
    completed = [e for e in got if isinstance(
        e, ConversationItemInputAudioTranscriptionCompletedEvent)]
    text = " ".join(e.transcript for e in completed)
    assert wer(reference(CLIP), text) <= 0.15, text
    committed = [e.item_id for e in got if isinstance(e, InputAudioBufferCommittedEvent)]
    assert committed == [e.item_id for e in completed]
    started = [e for e in got if isinstance(e, InputAudioBufferSpeechStartedEvent)]
    assert {e.item_id for e in started} == set(committed)
    assert 0 <= started[0].audio_start_ms < 2000
    # the deltas of an item add up to its transcript
    for event in completed:
        deltas = "".join(e.delta or "" for e in got if isinstance(
            e, ConversationItemInputAudioTranscriptionDeltaEvent) and e.item_id == event.item_id)
        assert deltas == event.transcript


def test_the_realtime_session_is_an_ordinary_session(
        stack: Stack, realtime_run: dict[str, Any]) -> None:
    """Listed by the sessions API under ``session.created``'s id, and closed as soon as the
    client closed its socket (OpenAI has no resume: no grace is waited)."""
    sid = realtime_run["events"][0].session.id

    def info() -> dict[str, Any]:
        with urllib.request.urlopen(f"{stack.http_url}/v1/sessions/{sid}") as r:
            return dict(json.loads(r.read()))

    wait_until("the session closed", lambda: info()["state"] == "closed", 10.0)
    assert info()["language"] == "en" and 10.5 <= info()["duration"] <= 11.5
    completed = [e.transcript for e in realtime_run["events"] if isinstance(
        e, ConversationItemInputAudioTranscriptionCompletedEvent)]
    with urllib.request.urlopen(f"{stack.http_url}/v1/sessions/{sid}/transcript.txt") as r:
        assert wer(" ".join(completed), r.read().decode()) == 0


def test_the_sdk_transcribes_an_uploaded_file(stack: Stack) -> None:
    client = openai_sdk.OpenAI(base_url=f"{stack.http_url}/v1", api_key="sk-test",
                               max_retries=0)
    audio = wav_bytes(load_pcm16(CLIP), 16000)

    def create(**options: Any) -> Any:
        return client.audio.transcriptions.with_raw_response.create(
            model="whisper-1", file=("jfk.wav", audio, "audio/wav"), **options)

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        plain, verbose, srt = pool.map(lambda o: create(**o), [
            {}, {"response_format": "verbose_json", "timestamp_granularities": ["word"],
                 "language": "en"},
            {"response_format": "srt"}])
    result = plain.parse()
    assert isinstance(result, Transcription)
    assert wer(reference(CLIP), result.text) <= 0.15, result.text
    words = verbose.parse()
    assert isinstance(words, TranscriptionVerbose)
    assert 10.5 <= words.duration <= 11.5 and words.language == "en"
    assert words.words and all(w.start <= w.end for w in words.words)
    assert wer(reference(CLIP), " ".join(w.word for w in words.words)) <= 0.15
    subtitles = srt.parse()
    assert isinstance(subtitles, str) and "00:00:0" in subtitles and " --> " in subtitles
    # each upload is an ordinary session: its transcript is stored under its id
    sid = plain.headers["x-session-id"]
    with urllib.request.urlopen(f"{stack.http_url}/v1/sessions/{sid}/transcript.txt") as r:
        assert wer(result.text, r.read().decode()) == 0


def test_bad_uploads_get_openai_s_error_body(stack: Stack) -> None:
    client = openai_sdk.OpenAI(base_url=f"{stack.http_url}/v1", api_key="sk-test",
                               max_retries=0)
    with pytest.raises(openai_sdk.BadRequestError) as exc:
        client.audio.transcriptions.create(model="whisper-1",
                                           file=("x.wav", b"not audio at all", "audio/wav"))
    assert exc.value.code == "invalid_audio"
    assert exc.value.status_code == 400
    with pytest.raises(openai_sdk.BadRequestError) as exc:
        client.audio.transcriptions.create(
            model="whisper-1", file=("x.wav", wav_bytes(np.zeros(1600, np.int16), 16000),
                                     "audio/wav"), response_format="diarized_json")
    assert exc.value.code == "bad_request"
    with pytest.raises(urllib.error.HTTPError) as http:
        urllib.request.urlopen(urllib.request.Request(
            f"{stack.http_url}/v1/audio/transcriptions", data=b'{"file": "x"}',
            headers={"Content-Type": "application/json"}))
    assert http.value.code == 400
    assert json.loads(http.value.read())["error"]["code"] == "bad_request"
    with pytest.raises(urllib.error.HTTPError) as http:
        urllib.request.urlopen(f"{stack.http_url}/v1/audio/transcriptions")
    assert http.value.code == 405
    assert json.loads(http.value.read())["error"]["code"] == "method_not_allowed"


def mulaw(pcm16: np.ndarray) -> bytes:
    """16 kHz int16 as 8 kHz μ-law bytes (the nearest code in libav's table)."""
    table = g711_table("mulaw")
    order = np.argsort(table)
    ordered = table[order]
    x = soxr.resample(pcm16.astype(np.float32) / 32768, 16000, 8000)
    pos = np.clip(np.searchsorted(ordered, x), 1, 255)
    nearer = np.where(np.abs(ordered[pos - 1] - x) < np.abs(ordered[pos] - x), pos - 1, pos)
    return bytes(order[nearer].astype(np.uint8))


def text_of(got: list[dict[str, Any]]) -> str:
    return " ".join(e["transcript"] for e in got
                    if e["type"] == "conversation.item.input_audio_transcription.completed")


def test_mulaw_with_manual_turns_and_a_final_commit(stack: Stack) -> None:
    """audio/pcmu, turn_detection null: the clip up to 10.55 s (its last word ends at 10.4 s:
    too little silence after it for the VAD to end the utterance) sent at once, then a
    commit, which ends the last item: every word comes back, no VAD events."""
    audio = mulaw(load_pcm16(CLIP)[:int(10.55 * 16000)])
    update = ga_update(format={"type": "audio/pcmu"}, turn_detection=None,
                       transcription={"language": "en"})

    async def go() -> list[dict[str, Any]]:
        got: list[dict[str, Any]] = []
        async with websockets.connect(f"{stack.ws_url}/v1/realtime?intent=transcription",
                                      additional_headers={"Authorization": "Bearer k"}) as ws:
            await ws.send(json.dumps(update))
            for i in range(0, len(audio), 1600):  # 200 ms appends
                chunk = base64.b64encode(audio[i:i + 1600]).decode()
                await ws.send(json.dumps({"type": "input_audio_buffer.append",
                                          "audio": chunk}))
            await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
            with contextlib.suppress(TimeoutError):  # 30 s at most
                async with asyncio.timeout(30):
                    while True:  # until the items hold the clip and 1 s passes quietly
                        try:
                            async with asyncio.timeout(1.0):
                                got.append(json.loads(await ws.recv()))
                        except TimeoutError:
                            if wer(reference(CLIP), text_of(got)) <= 0.25:
                                break
        return got

    got = events([json.dumps(e) for e in asyncio.run(go())])
    kinds = [e["type"] for e in got]
    assert kinds[:2] == ["session.created", "session.updated"]
    assert got[1]["session"]["audio"]["input"]["format"]["type"] == "audio/pcmu"
    assert "input_audio_buffer.speech_started" not in kinds and "error" not in kinds, kinds
    completed = [e for e in got
                 if e["type"] == "conversation.item.input_audio_transcription.completed"]
    assert kinds.count("input_audio_buffer.committed") == len(completed) >= 1
    text = text_of(got)
    assert wer(reference(CLIP), text) <= 0.25, text  # μ-law 8 kHz: ~0.14 on this clip


@pytest.mark.parametrize("send, code_name, close", [
    (["not json"], "invalid_message", 1007),
    ([json.dumps(ga_update(format={"type": "audio/pcm", "rate": 16000}))],
     "unsupported_audio", 1003),
    ([json.dumps({"type": "input_audio_buffer.append", "audio": "@@not base64@@"})],
     "invalid_audio", 1007),
    # events answered by the wire count in the message rate too (messages_burst: 1000)
    ([json.dumps({"type": "input_audio_buffer.append", "audio": ""})] * 1500,
     "too_many_messages", 1008),
])
def test_bad_realtime_input_gets_an_error_event_and_a_close_code(
        stack: Stack, send: list[str | bytes], code_name: str, close: int) -> None:
    received, close_code = asyncio.run(
        raw(f"{stack.ws_url}/v1/realtime?intent=transcription", send))
    assert received[0]["type"] == "session.created"
    errors = events([json.dumps(m) for m in received if m["type"] == "error"])
    assert [e["error"]["code"] for e in errors] == [code_name], received
    assert close_code == close


def test_a_realtime_conversation_is_refused_in_openai_s_words(stack: Stack) -> None:
    with pytest.raises(websockets.InvalidStatus) as exc:
        asyncio.run(raw(f"{stack.ws_url}/v1/realtime?model=gpt-realtime", []))
    response = exc.value.response
    assert response.status_code == 400
    assert json.loads(response.body or b"")["error"]["code"] == "bad_request"


def test_keys_and_per_key_caps_apply_to_both_endpoints(module_redis: Any) -> None:
    """A gateway that requires API keys, one session per key (no worker needed): a wrong
    Bearer key is 401 on both endpoints; an open realtime socket holds the key's one session,
    so a second socket and an upload are 429 until it closes."""
    from common.auth import hash_key, new_key

    key = new_key()
    gateway, port = start_gateway(module_redis.url, AUTH="required",
                                  API_KEYS=f"app={hash_key(key)}", MAX_SESSIONS_PER_KEY="1")
    base = f"http://127.0.0.1:{port}/v1"
    url = f"ws://127.0.0.1:{port}/v1/realtime?intent=transcription"
    wav = ("x.wav", wav_bytes(np.zeros(1600, np.int16), 16000), "audio/wav")

    def upload(api_key: str) -> None:
        openai_sdk.OpenAI(base_url=base, api_key=api_key, max_retries=0) \
            .audio.transcriptions.create(model="whisper-1", file=wav)

    async def refused(api_key: str) -> tuple[int, str]:
        with pytest.raises(websockets.InvalidStatus) as exc:
            async with websockets.connect(
                    url, additional_headers={"Authorization": f"Bearer {api_key}"}):
                pass
        body = json.loads(exc.value.response.body or b"")
        return exc.value.response.status_code, body["error"]["code"]

    async def go() -> None:
        assert await refused("wrong") == (401, "unauthorized")
        async with websockets.connect(
                url, additional_headers={"Authorization": f"Bearer {key}"}) as ws:
            assert json.loads(await ws.recv())["type"] == "session.created"
            assert await refused(key) == (429, "too_many_sessions")
            with pytest.raises(openai_sdk.RateLimitError) as exc:
                await asyncio.to_thread(upload, key)
            assert exc.value.code == "too_many_sessions"

    try:
        with pytest.raises(openai_sdk.AuthenticationError) as exc:
            upload("wrong")
        assert exc.value.code == "unauthorized"
        asyncio.run(go())
    finally:
        gateway.stop()


# --------------------------------------------------------------------------- hostile input

FUZZ = settings(max_examples=80, deadline=None, database=None)
JSONISH = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() |
                       st.text(max_size=12),
                       lambda kids: st.lists(kids, max_size=4)
                       | st.dictionaries(st.text(max_size=10), kids, max_size=4), max_leaves=12)
KINDS = st.sampled_from(["session.update", "transcription_session.update",
                         "input_audio_buffer.append", "input_audio_buffer.commit",
                         "input_audio_buffer.clear", "response.create"])
SESSIONS = st.fixed_dictionaries({}, optional={
    "type": st.sampled_from(["transcription", "realtime"]) | JSONISH,
    "audio": st.fixed_dictionaries({}, optional={"input": st.fixed_dictionaries({}, optional={
        "format": JSONISH | st.fixed_dictionaries({"type": st.sampled_from(
            ["audio/pcm", "audio/pcmu", "audio/pcma"]) | JSONISH}, optional={"rate": JSONISH}),
        "transcription": JSONISH | st.dictionaries(st.sampled_from(
            ["model", "language", "prompt"]), JSONISH),
        "turn_detection": JSONISH | st.dictionaries(st.sampled_from(
            ["type", "threshold", "silence_duration_ms"]), JSONISH),
        "noise_reduction": JSONISH}) | JSONISH}) | JSONISH,
    "input_audio_format": JSONISH, "include": JSONISH})


@FUZZ
@given(st.one_of(st.text(max_size=100), JSONISH.map(json.dumps),
                 st.builds(lambda k, s, a: json.dumps({"type": k, "session": s, "audio": a}),
                           KINDS, SESSIONS, JSONISH | st.text(max_size=20))))
def test_any_event_is_a_native_message_or_its_client_error(text: str) -> None:
    w = wire()
    try:
        native = w.inbound(text)
    except SttError:
        return
    assert isinstance(native, str)
    if native.startswith("{"):  # never a control the client wrote: only the wire's own
        assert native in (KEEPALIVE, '{"type":"finalize"}'), native
    events(w.replies())
