"""Recorded sessions end to end: real Redis, gateway, transcriber and fanout processes.

A JFK session is streamed live at real time while viewers attach mid-session;
then it is listed, exported (WAV, txt, json, srt, vtt), replayed through the
transcribers, and replayed to a viewer with its original timing. The ``stt``
command line is run against the same servers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pysrt
import pytest
import soundfile as sf
import soxr
import webvtt

from common.audio import AudioNormalizer, StreamFormat
from common.client import StreamResult, listen_url, stream
from tests.audio_refs import frames, load_pcm16, reference, wav16, wer
from tests.conftest import Stack
from tests.procs import ROOT, Service, free_port, wait_port, wait_until

pytestmark = pytest.mark.integration

# --------------------------------------------------------------------------- helpers


@dataclasses.dataclass
class Watched:
    messages: list[tuple[float, dict[str, Any]]]  # (monotonic arrival, message)
    close_code: int | None
    close_reason: str
    started: float

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [m for _, m in self.messages if m["type"] == kind]

    @property
    def results(self) -> list[dict[str, Any]]:
        return [m for _, m in self.messages if m["type"] not in ("session", "error")]

    @property
    def text(self) -> str:
        return " ".join(f["text"] for f in self.of("final") if f["text"]).strip()


async def watch(url: str) -> Watched:
    """Read a results socket (viewer or replay) to its close."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    out: list[tuple[float, dict[str, Any]]] = []
    started = time.monotonic()
    async with connect(url, max_size=None) as ws:
        try:
            async for raw in ws:
                out.append((time.monotonic(), json.loads(raw)))
        except ConnectionClosed:
            pass
    return Watched(out, ws.close_code, ws.close_reason or "", started)


def get(url: str) -> tuple[int, bytes, dict[str, str]]:
    try:
        with urllib.request.urlopen(url, timeout=60) as resp:
            return resp.status, resp.read(), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers)


def get_json(url: str) -> Any:
    status, body, _ = get(url)
    assert status == 200, (status, body)
    return json.loads(body)


def check_results(results: list[dict[str, Any]], sid: str) -> None:
    """Every stream of results: one session, seq strictly increasing, one final per
    utterance in order, ``closed`` last and counting the finals."""
    assert all(m["session_id"] == sid for m in results)
    seqs = [m["seq"] for m in results]
    assert seqs == sorted(set(seqs)), "seq must be strictly increasing"
    finals = [m for m in results if m["type"] == "final"]
    assert [f["utterance"] for f in finals] == list(range(len(finals)))
    assert results[-1]["type"] == "closed"
    assert results[-1]["utterances"] == len(finals)


def with_tail(pcm: np.ndarray, seconds: float = 2.0) -> np.ndarray:
    return np.concatenate([pcm, np.zeros(int(seconds * 16000), dtype=np.int16)])


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def fanout(stack: Stack) -> Iterator[str]:
    """A standalone ``python -m fanout`` on the stack's Redis (HTTP base URL)."""
    port = free_port()
    svc = Service("fanout", ["--host", "127.0.0.1", "--port", str(port)],
                  {"REDIS_URL": stack.redis.url}, "fanout listening")
    svc.wait_ready()
    wait_port(port)
    yield f"http://127.0.0.1:{port}"
    svc.stop()


@dataclasses.dataclass
class Live:
    sid: str
    pcm: np.ndarray
    res: StreamResult
    viewer_fanout: Watched  # attached mid-session to python -m fanout, finals only
    viewer_gateway: Watched  # attached mid-session to the gateway, with partials


@pytest.fixture(scope="module")
def live(stack: Stack, fanout: str) -> Live:
    """JFK streamed at real time; two viewers attach once the first final is out."""
    pcm = with_tail(load_pcm16("fw_jfk"))

    async def run() -> Live:
        first_final = asyncio.Event()
        sid: list[str] = []

        def on_message(m: dict[str, Any]) -> None:
            if m["type"] == "session":
                sid.append(m["session_id"])
            if m["type"] == "final":
                first_final.set()

        streaming = asyncio.create_task(
            stream(listen_url(stack.ws_url), frames(pcm), pace=1.0, on_message=on_message))
        await asyncio.wait_for(first_final.wait(), 30)
        base_f = fanout.replace("http", "ws")
        viewers = [asyncio.create_task(watch(f"{base_f}/v1/sessions/{sid[0]}/results")),
                   asyncio.create_task(watch(
                       f"{stack.ws_url}/v1/sessions/{sid[0]}/results?partials=true"))]
        res = await streaming
        vf, vg = await asyncio.wait_for(asyncio.gather(*viewers), 30)
        return Live(sid[0], pcm, res, vf, vg)

    return asyncio.run(run())


@pytest.fixture(scope="module")
def short(stack: Stack) -> tuple[str, np.ndarray, StreamResult]:
    """A short clip streamed as 48 kHz float32 as fast as possible; (sid, messages' audio,
    result). The normalised audio is what the gateway's normaliser makes of the messages."""
    pcm = with_tail(load_pcm16("ds_ldc93s1"), 1.0)
    f48 = soxr.resample(pcm.astype(np.float32) / 32768.0, 16000, 48000).astype("<f4")
    msgs = [(f48[i:i + 4801].tobytes(), len(f48[i:i + 4801]) / 48000)
            for i in range(0, len(f48), 4801)]  # odd sizes: resampler state carries over
    url = listen_url(stack.ws_url, encoding="pcm_f32le", sample_rate=48000)
    res = asyncio.run(stream(url, msgs, pace=None))
    normaliser = AudioNormalizer(StreamFormat("pcm_f32le", 48000, 1))
    normalised = np.concatenate([normaliser.feed(m) for m, _ in msgs] + [normaliser.flush()])
    return res.messages[0].message["session_id"], normalised, res


# --------------------------------------------------------------------------- viewers


def test_viewer_attached_mid_session_gets_every_final_once_and_in_order(live: Live) -> None:
    finals = live.res.finals
    assert wer(reference("fw_jfk"), live.res.text) <= 0.10, live.res.text
    for viewer in (live.viewer_fanout, live.viewer_gateway):
        first = viewer.messages[0][1]
        assert first["type"] == "session" and first["session_id"] == live.sid
        assert first["state"] == "active", "the viewer attached while the session was live"
        check_results(viewer.results, live.sid)
        assert viewer.of("final") == finals, "every final exactly once, in order, unchanged"
        assert viewer.close_code == 1000
    assert live.viewer_fanout.of("partial") == []
    # Attached after the first final: the stored first final came from history, and every
    # partial it got is a live one of a later utterance (stale ones are not replayed).
    partials = live.viewer_gateway.of("partial")
    assert partials, "a viewer asking for partials gets the live ones"
    assert all(p["utterance"] >= 1 for p in partials)
    assert set(map(json.dumps, partials)) <= set(map(json.dumps, live.res.partials))


def test_viewer_of_a_closed_session_gets_the_stored_results_from_after(
        live: Live, fanout: str) -> None:
    base = fanout.replace("http", "ws")
    whole = asyncio.run(watch(f"{base}/v1/sessions/{live.sid}/results"))
    assert whole.messages[0][1]["state"] == "closed"
    assert whole.of("final") == live.res.finals and whole.close_code == 1000
    cut = live.res.finals[1]["seq"]
    rest = asyncio.run(watch(f"{base}/v1/sessions/{live.sid}/results?after={cut}"))
    assert rest.of("final") == live.res.finals[2:]
    assert all(m["seq"] > cut for m in rest.results)


def test_results_replayed_with_original_timing(live: Live, stack: Stack, fanout: str) -> None:
    ids = [entry_id.decode() for entry_id, _ in
           stack.redis.client().xrange(f"stt:{{{live.sid}}}:results")]
    span = (int(ids[-1].split("-")[0]) - int(ids[0].split("-")[0])) / 1000.0
    speed = 4.0
    base = fanout.replace("http", "ws")
    timed = asyncio.run(watch(
        f"{base}/v1/sessions/{live.sid}/results?original_timing=true&partials=true"
        f"&speed={speed}"))
    results = [(at, m) for at, m in timed.messages if m["type"] != "session"]
    assert len(results) == len(ids), "every stored result, partials included"
    assert [m for _, m in results if m["type"] == "final"] == live.res.finals
    elapsed = results[-1][0] - results[0][0]
    print(f"\noriginal span {span:.2f} s, replayed at x{speed:g} in {elapsed:.2f} s")
    assert span / speed - 0.05 <= elapsed <= span / speed + 1.0


# --------------------------------------------------------------------------- inspect


def test_listing_shows_state_duration_model_and_counts(live: Live, stack: Stack) -> None:
    body = get_json(f"{stack.http_url}/v1/sessions?limit=500")
    listed = {s["session_id"]: s for s in body["sessions"]}
    s = listed[live.sid]
    assert s["state"] == "closed"
    assert s["duration"] == pytest.approx(len(live.pcm) / 16000, abs=0.01)
    assert s["model"] == "tiny.en"
    assert s["finals"] == len(live.res.finals)
    assert s["results"] == len(live.res.messages) - 1  # all but the session message
    assert s["replay_of"] is None and s["expires_in"] > 0
    created = [x["created"] for x in body["sessions"]]
    assert created == sorted(created, reverse=True), "newest first"
    info = get_json(f"{stack.http_url}/v1/sessions/{live.sid}")
    assert info["counts"] == {"partial": len(live.res.partials), "final": len(live.res.finals),
                              "warning": len(live.res.of_type("warning")), "closed": 1}
    active_only = get_json(f"{stack.http_url}/v1/sessions?state=active")["sessions"]
    assert live.sid not in {x["session_id"] for x in active_only}
    # Pages: next_before continues where a page ended.
    first = get_json(f"{stack.http_url}/v1/sessions?limit=1")
    second = get_json(f"{stack.http_url}/v1/sessions?limit=1&before={first['next_before']}")
    assert [x["session_id"] for x in first["sessions"] + second["sessions"]] == \
        [x["session_id"] for x in body["sessions"][:2]]


def test_unknown_malformed_and_expired_sessions_get_clear_errors(
        stack: Stack, fanout: str) -> None:
    missing = "0" * 32
    for base in (stack.http_url, fanout):
        for leaf in ("", "/audio.wav", "/transcript.srt", "/transcript.json"):
            status, body, headers = get(f"{base}/v1/sessions/{missing}{leaf}")
            assert status == 404, (leaf, status)
            assert headers["Content-Type"] == "application/json"
            err = json.loads(body)
            assert err["type"] == "error" and err["code"] == "session_not_found"
            assert "expired" in err["message"]
        assert get(f"{base}/v1/sessions/not-an-id")[0] == 404
        assert json.loads(get(f"{base}/v1/sessions/{missing}/nope")[1])["code"] == "not_found"
        status, body, _ = get(f"{base}/v1/sessions/{missing}/results")  # plain GET on a socket
        assert status == 426 and json.loads(body)["code"] == "websocket_required"
    ws_urls = [f"{stack.ws_url}/v1/sessions/{missing}/results",
               f"{fanout.replace('http', 'ws')}/v1/sessions/{missing}/results",
               f"{stack.ws_url}/v1/sessions/{missing}/replay"]
    for url in ws_urls:
        w = asyncio.run(watch(url))
        assert [m["code"] for _, m in w.messages] == ["session_not_found"]
        assert w.close_code == 1008

    # A session whose retention ran out: gone from the API and from the listing index.
    res = asyncio.run(stream(listen_url(stack.ws_url), frames(np.zeros(8000, np.int16)),
                             pace=None))
    sid = res.messages[0].message["session_id"]
    assert get(f"{stack.http_url}/v1/sessions/{sid}")[0] == 200
    r = stack.redis.client()
    for kind in ("meta", "audio", "results"):
        r.pexpire(f"stt:{{{sid}}}:{kind}", 50)
    wait_until("the session's keys expired",
               lambda: not r.exists(*(f"stt:{{{sid}}}:{kind}" for kind in ("meta", "audio",
                                                                           "results"))))
    assert get(f"{stack.http_url}/v1/sessions/{sid}")[0] == 404
    listed = get_json(f"{stack.http_url}/v1/sessions?limit=500")["sessions"]
    assert sid not in {s["session_id"] for s in listed}
    assert r.zscore("stt:index", sid) is None, "expired members are pruned from the index"


# --------------------------------------------------------------------------- export


def test_exported_wav_is_sample_identical_to_the_streamed_audio(
        live: Live, stack: Stack, fanout: str) -> None:
    status, body, headers = get(f"{stack.http_url}/v1/sessions/{live.sid}/audio.wav")
    assert status == 200 and headers["Content-Type"] == "audio/wav"
    data, rate = sf.read(io.BytesIO(body), dtype="int16")
    assert rate == 16000 and data.ndim == 1
    assert np.array_equal(data, live.pcm)

    # The fanout streams the same WAV; a window is a WAV of its own.
    status, body, headers = get(f"{fanout}/v1/sessions/{live.sid}/audio.wav")
    assert status == 200 and headers["Content-Length"] == str(len(body))
    data, _ = sf.read(io.BytesIO(body), dtype="int16")
    assert np.array_equal(data, live.pcm)
    status, body, _ = get(f"{fanout}/v1/sessions/{live.sid}/audio.wav?start=2.5&end=7")
    assert status == 200
    window, _ = sf.read(io.BytesIO(body), dtype="int16")
    assert np.array_equal(window, live.pcm[40000:112000])


def test_exported_wav_of_a_48k_float_stream_is_the_normalised_audio(
        short: tuple[str, np.ndarray, StreamResult], stack: Stack) -> None:
    sid, normalised, res = short
    assert res.close_code == 1000
    status, body, _ = get(f"{stack.http_url}/v1/sessions/{sid}/audio.wav")
    assert status == 200
    assert body[:4] == b"RIFF" and len(body) == 44 + 2 * len(normalised)
    assert np.array_equal(np.frombuffer(body[44:], "<i2"), normalised)


def transcript_words(base: str, sid: str) -> list[dict[str, Any]]:
    body = get_json(f"{base}/v1/sessions/{sid}/transcript.json")
    return [w for u in body["utterances"] for w in u["words"]]


def check_cues_match_words(cues: list[tuple[float, float, str]],
                           words: list[dict[str, Any]]) -> None:
    """Each cue is the next run of words, on screen from its first word's start to its
    last word's end; together the cues carry every word once, in order."""
    pos = 0
    for start, end, text in cues:
        n = len(text.split())
        run = words[pos:pos + n]
        assert " ".join("".join(w["word"] for w in run).split()) == " ".join(text.split())
        assert start == pytest.approx(run[0]["start"], abs=0.0011)
        assert end == pytest.approx(run[-1]["end"], abs=0.0011)
        pos += n
    assert pos == len(words)


def vtt_seconds(stamp: str) -> float:
    h, m, s = stamp.split(":")
    return int(h) * 3600 + int(m) * 60 + float(s)


def test_srt_and_vtt_parse_and_their_cue_times_match_the_words(
        live: Live, stack: Stack, fanout: str) -> None:
    words = transcript_words(stack.http_url, live.sid)
    assert len(words) >= 20
    status, srt_body, headers = get(f"{fanout}/v1/sessions/{live.sid}/transcript.srt")
    assert status == 200 and headers["Content-Type"].startswith("application/x-subrip")
    srt = pysrt.from_string(srt_body.decode())
    assert len(srt) >= len([f for f in live.res.finals if f["text"]])
    check_cues_match_words([(s.start.ordinal / 1000, s.end.ordinal / 1000, s.text)
                            for s in srt], words)
    status, vtt_body, headers = get(f"{stack.http_url}/v1/sessions/{live.sid}/transcript.vtt")
    assert status == 200 and headers["Content-Type"].startswith("text/vtt")
    vtt = webvtt.from_string(vtt_body.decode())
    check_cues_match_words([(vtt_seconds(c.start), vtt_seconds(c.end), c.text) for c in vtt],
                           words)


def test_text_and_json_transcripts_carry_the_finals(live: Live, stack: Stack) -> None:
    spoken = [f for f in live.res.finals if f["text"]]
    status, txt, headers = get(f"{stack.http_url}/v1/sessions/{live.sid}/transcript.txt")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    assert txt.decode().splitlines() == [f["text"].strip() for f in spoken]
    body = get_json(f"{stack.http_url}/v1/sessions/{live.sid}/transcript.json")
    assert body["session_id"] == live.sid and body["complete"] is True
    assert [(u["utterance"], u["text"], u["words"]) for u in body["utterances"]] == \
        [(f["utterance"], f["text"].strip(), f["words"]) for f in spoken]


# --------------------------------------------------------------------------- replay


def test_replay_at_full_speed_matches_the_original_and_beats_real_time(
        live: Live, stack: Stack) -> None:
    duration = len(live.pcm) / 16000
    w = asyncio.run(watch(f"{stack.ws_url}/v1/sessions/{live.sid}/replay?speed=max"))
    elapsed = w.messages[-1][0] - w.started
    first = w.messages[0][1]
    assert first["type"] == "session" and first["replay_of"] == live.sid
    assert first["speed"] == "max" and first["model"] == "tiny.en"
    new = first["session_id"]
    assert new != live.sid
    check_results(w.results, new)
    assert w.close_code == 1000
    original, replayed = wer(reference("fw_jfk"), live.res.text), wer(reference("fw_jfk"), w.text)
    print(f"\nreplay at max: {elapsed:.2f} s for {duration:.1f} s of audio; "
          f"WER original {original:.3f}, replay {replayed:.3f}")
    assert replayed <= original + 0.02, w.text
    assert elapsed < duration
    info = get_json(f"{stack.http_url}/v1/sessions/{new}")
    assert info["replay_of"] == live.sid and info["state"] == "closed"
    assert info["duration"] == pytest.approx(duration, abs=0.01)
    listed = get_json(f"{stack.http_url}/v1/sessions?limit=500")["sessions"]
    assert any(s["session_id"] == new and s["replay_of"] == live.sid for s in listed)
    # The replayed audio is the original's, sample for sample.
    assert get(f"{stack.http_url}/v1/sessions/{new}/audio.wav")[1][44:] == live.pcm.tobytes()


def test_replay_at_real_time_takes_the_audio_duration(
        short: tuple[str, np.ndarray, StreamResult], stack: Stack) -> None:
    sid, normalised, res = short
    duration = len(normalised) / 16000
    w = asyncio.run(watch(
        f"{stack.ws_url}/v1/sessions/{sid}/replay?speed=realtime&interim_results=false"))
    elapsed = w.messages[-1][0] - w.started
    print(f"\nreplay at real time: {elapsed:.2f} s for {duration:.2f} s of audio")
    assert w.messages[0][1]["speed"] == "realtime" and w.close_code == 1000
    assert elapsed >= duration - 0.1
    assert w.of("partial") == []
    check_results(w.results, w.messages[0][1]["session_id"])
    original = " ".join(f["text"] for f in res.finals if f["text"])
    assert wer(reference("ds_ldc93s1"), w.text) <= wer(reference("ds_ldc93s1"), original) + 0.02


def test_replay_with_another_language_and_a_model_nobody_serves(
        short: tuple[str, np.ndarray, StreamResult], stack: Stack) -> None:
    from websockets.asyncio.client import connect
    from websockets.exceptions import InvalidStatus

    sid = short[0]

    async def refused() -> InvalidStatus:  # allowed for replays, but no worker serves it
        with pytest.raises(InvalidStatus) as exc:
            async with connect(f"{stack.ws_url}/v1/sessions/{sid}/replay?model=no-such-model"):
                pass
        return exc.value

    exc = asyncio.run(refused())
    assert exc.response.status_code == 503
    assert json.loads(exc.response.body)["code"] == "model_unavailable"
    w = asyncio.run(watch(f"{stack.ws_url}/v1/sessions/{sid}/replay?language=de"
                          "&interim_results=false"))
    first = w.messages[0][1]
    assert first["model"] == "tiny.en" and first["language"] == "de"
    assert w.of("warning") == [] and w.results[-1]["type"] == "closed" and w.close_code == 1000
    meta = stack.redis.client().hgetall(f"stt:{{{first['session_id']}}}:meta")
    assert meta[b"model"] == b"tiny.en" and meta[b"language"] == b"de"
    assert meta[b"replay_of"] == sid.encode()


def test_replay_of_a_session_still_recording_is_refused(stack: Stack) -> None:
    from websockets.asyncio.client import connect

    async def run() -> Watched:
        async with connect(listen_url(stack.ws_url)) as ws:
            sid = json.loads(await ws.recv())["session_id"]
            await ws.send(np.zeros(8000, "<i2").tobytes())
            w = await watch(f"{stack.ws_url}/v1/sessions/{sid}/replay")
            await ws.send(json.dumps({"type": "close"}))
            async for _ in ws:
                pass
            return w

    w = asyncio.run(run())
    assert [m["code"] for _, m in w.messages] == ["session_active"]
    assert w.close_code == 1008


# --------------------------------------------------------------------------- command line


def stt(*args: str, url: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "STT_URL": url, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "fanout.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_lists_shows_exports_watches_and_replays(
        live: Live, stack: Stack, tmp_path: Path) -> None:
    url = stack.http_url
    out = stt("sessions", url=url)
    assert out.returncode == 0, out.stderr
    assert live.sid in out.stdout and "closed" in out.stdout
    out = stt("show", live.sid, url=url)
    assert out.returncode == 0 and "tiny.en" in out.stdout
    srt_file = tmp_path / "jfk.srt"
    out = stt("export", live.sid, "--format", "srt", "-o", str(srt_file), "--url", url,
              url="http://127.0.0.1:1")  # --url after the subcommand wins over STT_URL
    assert out.returncode == 0, out.stderr
    assert len(pysrt.open(str(srt_file))) >= 3
    wav_file = tmp_path / "jfk.wav"
    assert stt("export", live.sid, "-f", "wav", "-o", str(wav_file), url=url).returncode == 0
    assert wav_file.read_bytes()[44:] == live.pcm.tobytes()
    out = stt("results", live.sid, url=url)
    assert out.returncode == 0 and "Americans" in out.stdout
    assert "closed" in out.stderr
    out = stt("replay", live.sid, "--speed", "max", "--json", url=url)
    assert out.returncode == 0, out.stderr
    msgs = [json.loads(line) for line in out.stdout.splitlines()]
    assert msgs[0]["replay_of"] == live.sid and msgs[-1]["type"] == "closed"
    out = stt("show", "0" * 32, url=url)
    assert out.returncode == 1 and "no such session" in out.stderr


def test_cli_streams_a_file_printing_partials_and_finals(stack: Stack, tmp_path: Path) -> None:
    clip = tmp_path / "clip.wav"
    clip.write_bytes(wav16(with_tail(load_pcm16("ds_ldc93s1"), 1.0)))
    out = stt("stream", str(clip), url=stack.http_url)
    assert out.returncode == 0, out.stderr
    finals = [line for line in out.stdout.splitlines() if line.startswith("[")]
    assert finals and wer(reference("ds_ldc93s1"), " ".join(
        line.split("] ", 1)[1] for line in finals)) <= 0.25, out.stdout
    assert "closed" in out.stderr
    out = stt("stream", "--mic", url=stack.http_url)  # no sounddevice / audio device here
    assert out.returncode == 1
    assert "microphone" in out.stderr or "input device" in out.stderr
