"""``multichannel=true`` end to end: a stereo call of two real speakers, with overlap and
crosstalk, each channel transcribed apart; its exports and viewers; a worker SIGKILLed
mid-call; the Deepgram SDK's ``multichannel``; bad ``channels`` refused.

Channel 0 is fw_jfk (11 s), channel 1 ps_librivox_0870 (7.1 s) starting 6 s in, so the two
speak at once for 5 s, and each channel hears the other at -30 dB (a headset's bleed).
"""

from __future__ import annotations

import asyncio
import io
import itertools
import json
import threading
import time
import urllib.request
import wave
from typing import Any

import numpy as np
import pytest
from deepgram.listen.v1.types import ListenV1Metadata, ListenV1Results
from websockets.asyncio.client import connect

from common.client import StreamResult, listen_url, stream
from tests.audio_refs import frames, load_pcm16, reference, stereo_call, wer
from tests.conftest import Stack
from tests.procs import raw
from tests.test_deepgram import sdk_client
from tests.test_resilience import SessionWatch, cluster_factory  # noqa: F401 (a fixture)

pytestmark = pytest.mark.integration

CLIPS = ("fw_jfk", "ps_librivox_0870")
OFFSET_S = 6.0  # channel 1 begins while channel 0 still speaks
BLEED = 0.03  # -30 dB of each side in the other's channel
TAIL_S = 2.0
#: How far a final may end before the final published ahead of it (seq order): each channel
#: ends its utterances after its own pause, so the order is that of the endpoints.
ORDER_SLACK_S = 1.5


def alone(clip: str) -> np.ndarray:
    return np.concatenate([load_pcm16(clip), np.zeros(int(TAIL_S * 16000), np.int16)])


def channel_text(finals: list[dict[str, Any]], channel: int) -> str:
    return " ".join(f["text"] for f in finals if f["channel"] == channel)


def check_channels(res: StreamResult, channels: int = 2) -> None:
    """The multichannel invariants: ``channel`` on every partial and final, one strictly
    increasing seq, exactly one final per utterance index of each channel, no partial of an
    utterance after its final, a channel's finals never overlapping (none repeated), and
    'closed' counting every channel's utterances."""
    msgs = [r.message for r in res.messages]
    assert msgs[0]["type"] == "session" and msgs[0]["multichannel"] is True
    assert msgs[0]["channels"] == channels
    results = [m for m in msgs[1:] if m["type"] != "session"]
    seqs = [m["seq"] for m in results]
    assert seqs == sorted(set(seqs)), "seq must be strictly increasing"
    spoken = [m for m in results if m["type"] in ("partial", "final")]
    assert spoken and all(m.get("channel") in range(channels) for m in spoken)
    for channel in range(channels):
        finals = [f for f in res.finals if f["channel"] == channel]
        assert [f["utterance"] for f in finals] == list(range(len(finals))), channel
        for a, b in itertools.pairwise(finals):
            assert b["start"] >= a["end"] - 0.3, ("a repeated final?", a, b)
        done = {f["utterance"]: f["seq"] for f in finals}
        for p in res.partials:
            if p["channel"] == channel and p["utterance"] in done:
                assert p["seq"] < done[p["utterance"]]
    assert results[-1]["type"] == "closed"
    assert results[-1]["utterances"] == len(res.finals)
    assert res.close_code == 1000


@pytest.fixture(scope="module")
def call_run(stack: Stack) -> dict[str, Any]:
    """Each clip streamed alone (both at once, at real time: two sessions, two decodes at a
    time, as the call has), then the stereo call at real time."""
    async def alone_runs() -> list[StreamResult]:
        return list(await asyncio.gather(*(
            stream(listen_url(stack.ws_url), frames(alone(clip)), pace=1.0)
            for clip in CLIPS)))

    baseline = asyncio.run(alone_runs())
    pcm = stereo_call(CLIPS, OFFSET_S, BLEED, TAIL_S)
    began = time.process_time()
    res = asyncio.run(stream(listen_url(stack.ws_url, multichannel=True, channels=2),
                             frames(pcm), pace=1.0))
    return {"alone": baseline, "call": res, "pcm": pcm, "client_cpu": time.process_time() - began}


def test_each_channel_of_a_stereo_call_is_transcribed_as_well_as_alone(
        call_run: dict[str, Any]) -> None:
    res = call_run["call"]
    check_channels(res)
    for channel, (clip, solo) in enumerate(zip(CLIPS, call_run["alone"], strict=True)):
        ref = reference(clip)
        alone_wer, call_wer = wer(ref, solo.text), wer(ref, channel_text(res.finals, channel))
        print(f"\nchannel {channel} ({clip}): WER alone {alone_wer:.3f}, in the call "
              f"{call_wer:.3f}: {channel_text(res.finals, channel)!r}")
        # Issue 25's target is 1 point; a word of either clip is 4.5 points (22 words),
        # and the alone run itself varies by one word between runs (the quiet
        # "and" that begins ps_librivox_0870 is heard or not): no more than one word worse.
        word = 1 / len(ref.split())
        assert call_wer <= alone_wer + word + 1e-9, (channel, channel_text(res.finals, channel),
                                                     solo.text)


def test_finals_of_both_channels_interleave_in_time_order(call_run: dict[str, Any]) -> None:
    finals = call_run["call"].finals  # in seq order
    assert {f["channel"] for f in finals} == {0, 1}
    for a, b in itertools.pairwise(finals):
        assert b["end"] >= a["end"] - ORDER_SLACK_S, (a, b)
    # channel 1 speaks while channel 0 still does: its first final is not held back
    # until channel 0 is done
    first_1 = next(i for i, f in enumerate(finals) if f["channel"] == 1)
    assert any(f["channel"] == 0 for f in finals[first_1:]) or \
        finals[first_1]["start"] < max(f["end"] for f in finals if f["channel"] == 0)


def test_exports_and_viewers_carry_the_channels(stack: Stack, call_run: dict[str, Any]) -> None:
    res = call_run["call"]
    sid = res.messages[0].message["session_id"]
    base = f"{stack.http_url}/v1/sessions/{sid}"

    def get(path: str) -> bytes:
        with urllib.request.urlopen(f"{base}/{path}") as r:
            return bytes(r.read())

    lines = get("transcript.txt").decode().splitlines()
    assert lines and all(line.startswith(("[channel 0] ", "[channel 1] ")) for line in lines)
    assert "<v Channel 1>" in get("transcript.vtt").decode()
    assert "[channel 0] " in get("transcript.srt").decode()
    body = json.loads(get("transcript.json"))
    assert [u["channel"] for u in body["utterances"]] == [f["channel"] for f in res.finals]
    with wave.open(io.BytesIO(get("audio.wav"))) as w:
        assert (w.getnchannels(), w.getframerate()) == (2, 16000)
        stored = np.frombuffer(w.readframes(w.getnframes()), "<i2").reshape(-1, 2)
    assert np.array_equal(stored, call_run["pcm"])  # both channels, as sent

    async def view() -> list[dict[str, Any]]:
        out = []
        async with connect(f"{stack.ws_url}/v1/sessions/{sid}/results") as ws:
            async for message in ws:
                out.append(json.loads(message))
                if out[-1]["type"] == "closed":
                    break
        return out

    seen = asyncio.run(view())
    finals = [m for m in seen if m["type"] == "final"]
    assert [(f["channel"], f["utterance"], f["text"]) for f in finals] == \
        [(f["channel"], f["utterance"], f["text"]) for f in res.finals]


def test_a_replay_transcribes_the_same_channels_apart(stack: Stack,
                                                      call_run: dict[str, Any]) -> None:
    sid = call_run["call"].messages[0].message["session_id"]

    async def replay() -> list[dict[str, Any]]:
        async with connect(f"{stack.ws_url}/v1/sessions/{sid}/replay?speed=max") as ws:
            return [json.loads(m) async for m in ws]

    replayed = asyncio.run(replay())
    assert replayed[0]["channels"] == 2 and replayed[-1]["type"] == "closed"
    finals = [m for m in replayed if m["type"] == "final"]
    assert {f["channel"] for f in finals} == {0, 1}
    for channel, clip in enumerate(CLIPS):
        live = wer(reference(clip), channel_text(call_run["call"].finals, channel))
        again = wer(reference(clip), channel_text(finals, channel))
        assert again <= live + 0.05, (channel, channel_text(finals, channel))


@pytest.mark.long  # 20-25 s: make test-long (STT_LONG_TESTS=1)
def test_a_worker_killed_mid_call_loses_and_repeats_no_final_on_any_channel(
        cluster_factory: Any, call_run: dict[str, Any]) -> None:  # noqa: F811
    """SIGKILL of the owner 8 s in (both channels speaking): the survivor takes over after
    the 3 s lease and continues each channel from its own commit point."""
    cluster = cluster_factory(workers=2, worker_args=["--lease-ms", "3000"])
    watch = SessionWatch()
    killed: dict[str, Any] = {}

    def before(owner: str) -> None:
        killed["name"], killed["finals"] = owner, len(watch.finals)

    res = watch.stream_through_owner_kill(
        cluster, listen_url(cluster.ws_url, multichannel=True, channels=2),
        frames(call_run["pcm"]), 8.0, before)
    check_channels(res)
    assert watch.sid is not None
    assert cluster.owner(watch.sid) != killed["name"]
    assert len(watch.finals) > killed["finals"], "no final after the kill"
    undisturbed = call_run["call"].finals
    for channel, clip in enumerate(CLIPS):
        ref = reference(clip)
        before, after = wer(ref, channel_text(undisturbed, channel)), \
            wer(ref, channel_text(res.finals, channel))
        print(f"\nchannel {channel}: WER undisturbed {before:.3f}, with the kill {after:.3f}")
        assert after <= before + 0.02, (channel, channel_text(res.finals, channel))


@pytest.mark.parametrize("query, code, error", [
    ("multichannel=true&channels=5", 1003, "unsupported_audio"),  # over MAX_CHANNELS (4)
    ("multichannel=true&channels=1", 1003, "unsupported_audio"),
    ("multichannel=true", 1003, "unsupported_audio"),  # one channel: nothing to keep apart
    ("multichannel=true&channels=2&encoding=opus", 1003, "unsupported_audio"),
    ("multichannel=true&channels=two", 1003, "unsupported_audio"),
    ("multichannel=maybe&channels=2", 1008, "bad_request"),
    ("channels=3", 1003, "unsupported_audio"),  # downmixed: 1 or 2
])
def test_bad_channels_are_refused_with_an_error_and_a_close_code(
        stack: Stack, query: str, code: int, error: str) -> None:
    messages, close = asyncio.run(raw(f"{stack.ws_url}/v1/listen?{query}", []))
    assert close == code
    assert messages[-1]["type"] == "error" and messages[-1]["code"] == error, messages
    assert "channel" in messages[-1]["message"] or "multichannel" in messages[-1]["message"] \
        or "encoding" in messages[-1]["message"]


def test_the_deepgram_sdk_gets_results_by_channel_index(stack: Stack) -> None:
    """The official SDK with ``multichannel=True``: each ``Results`` names its channel as
    Deepgram's do (``channel_index`` [i, 2]); each channel's transcript is its speaker's."""
    pcm = stereo_call(CLIPS, OFFSET_S, BLEED, TAIL_S)
    got: list[Any] = []
    failure: list[BaseException] = []
    with sdk_client(stack).listen.v1.connect(
            model="nova-3", encoding="linear16", sample_rate=16000, channels=2,
            multichannel=True) as conn:

        def read() -> None:
            try:
                got.extend(conn)
            except BaseException as exc:  # the test reports it
                failure.append(exc)

        reader = threading.Thread(target=read)
        reader.start()
        for chunk, _seconds in frames(pcm):
            conn.send_media(chunk)
            time.sleep(0.05)  # 2x real time
        conn.send_close_stream()
        reader.join(60.0)
    assert not failure, failure
    assert isinstance(got[-1], ListenV1Metadata) and got[-1].channels == 2
    finals = [m for m in got if isinstance(m, ListenV1Results) and m.is_final]
    assert {tuple(m.channel_index) for m in finals} == {(0, 2), (1, 2)}
    for channel, clip in enumerate(CLIPS):
        text = " ".join(m.channel.alternatives[0].transcript for m in finals
                        if m.channel_index[0] == channel)
        assert wer(reference(clip), text) <= 0.15, (channel, text)


def test_a_dropped_call_resumes_with_its_channels_and_only_with_them(stack: Stack) -> None:
    """A resume must name the same channels (else ``unsupported_audio``, 1003, and the
    session is untouched); with them, the call continues where the server's audio ends."""
    pcm = stereo_call(CLIPS, OFFSET_S, BLEED, TAIL_S)[:6 * 16000]
    url = listen_url(stack.ws_url, multichannel=True, channels=2)
    messages = frames(pcm)

    async def drop_after(seconds: float) -> str:
        async with connect(url) as ws:
            sid = json.loads(await ws.recv())["session_id"]
            for chunk, _ in messages[:int(seconds * 10)]:
                await ws.send(chunk)
            await asyncio.sleep(0.5)  # stored, then the socket drops without 'close'
        return str(sid)

    sid = asyncio.run(drop_after(3.0))
    for wrong in ({}, {"channels": 2}, {"multichannel": True, "channels": 3}):
        got, code = asyncio.run(raw(listen_url(stack.ws_url, session=sid, after=0, **wrong),
                                    []))
        assert (code, got[-1]["code"]) == (1003, "unsupported_audio"), (wrong, got)
    again = listen_url(stack.ws_url, multichannel=True, channels=2, session=sid, after=0)
    res = asyncio.run(stream(again, messages[30:], pace=None))
    assert res.messages[0].message["resumed"] is True
    assert res.messages[0].message["stored_samples"] == 3 * 16000
    check_channels(res)
    heard = channel_text(res.finals, 0).lower()  # 6 s of fw_jfk: before and after the drop
    assert "so my fellow americans" in heard and "ask not" in heard, heard


def test_a_channel_silent_for_long_moves_its_commit_point_on(stack: Stack) -> None:
    """Channel 1 says nothing while channel 0 speaks for 24 s: its stored commit point
    moves on anyway (every 10 s of silence), so a takeover re-reads from near the end, not
    from where channel 1 last spoke (the start)."""
    speech = np.concatenate([alone("fw_jfk"), alone("fw_jfk")])
    pcm = np.stack([speech, np.zeros_like(speech)], axis=1)
    res = asyncio.run(stream(listen_url(stack.ws_url, multichannel=True, channels=2),
                             frames(pcm), pace=None))
    check_channels(res)
    assert {f["channel"] for f in res.finals} == {0}
    sid = res.messages[0].message["session_id"]
    meta = {k.decode(): v.decode() for k, v in
            stack.redis.client().hgetall(f"stt:{{{sid}}}:meta").items()}
    assert int(meta["commit_sample.1"]) >= 20 * 16000, meta
    assert meta.get("next_utterance.1", "0") == "0"
    assert int(meta["commit_sample"]) == min(int(meta["commit_sample.0"]),
                                             int(meta["commit_sample.1"]))
