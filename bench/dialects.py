"""python -m bench.dialects: the same clip, at real time, through /v1/listen and each dialect
and encoding, in one run: time to final per utterance and WER; then the dialect layer's
own cost per message (the wires' translation, measured in-process).

Time to final: from the moment the audio up to a final's last word was sent to the moment
the final arrived. Twilio sends no results back: its finals are read from a viewer socket
(``/v1/sessions/{id}/results``) opened with the stream.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import av
import numpy as np
import websockets

from bench.sessions import save_report
from common.messages import Final, Partial, SessionStarted, Word
from ingest.dialects.deepgram import DeepgramOptions, DeepgramWire
from ingest.dialects.twilio import TwilioWire, parse_start, session_for
from ingest.listen_core import Received
from tests.audio_refs import encode, load_pcm16, mulaw, reference, wer
from tests.procs import Cluster

Sent = list[tuple[float, float]]  # (audio seconds sent so far, monotonic time)
Finals = list[tuple[float, float, str]]  # (received at, last word's end, text)


def chunks(data: bytes, seconds: float, step_s: float) -> list[tuple[bytes, float]]:
    """``data`` (``seconds`` long) in pieces of about ``step_s``, cut at arbitrary bytes."""
    count = max(1, round(seconds / step_s))
    size = -(-len(data) // count)
    return [(data[i:i + size], seconds * min(size, len(data) - i) / len(data))
            for i in range(0, len(data), size)]


def packet_chunks(data: bytes, step_s: float) -> list[tuple[bytes, float]]:
    """A container stream in messages of ``step_s`` of audio by its packets' timestamps
    (cut where a packet starts): Opus is variable bitrate, and a cut by byte share would
    send speech late and silence early."""
    starts: list[tuple[float, int]] = []
    with av.open(io.BytesIO(data), "r") as box:
        for packet in box.demux(audio=0):
            if packet.pts is not None and packet.pos is not None and packet.pos >= 0 and \
                    packet.time_base is not None:
                starts.append((float(packet.pts * packet.time_base), packet.pos))
    out: list[tuple[bytes, float]] = []
    prev, k = 0, 1
    for at, pos in starts:
        if at >= k * step_s and pos > prev:
            out.append((data[prev:pos], step_s))
            prev, k = pos, k + 1
    out.append((data[prev:], step_s))
    return out


async def pace(ws: Any, messages: list[tuple[str | bytes, float]], sent: Sent) -> None:
    loop = asyncio.get_running_loop()
    began, total = loop.time(), 0.0
    for payload, seconds in messages:
        await asyncio.sleep(max(0.0, began + total - loop.time()))
        await ws.send(payload)
        total += seconds
        sent.append((total, time.monotonic()))


async def run_native(url: str, messages: list[tuple[bytes, float]]
                     ) -> tuple[Sent, Finals]:
    sent: Sent = []
    finals: Finals = []
    async with websockets.connect(url, max_size=None) as ws:
        async def read() -> None:
            async for raw in ws:
                m = json.loads(raw)
                if m["type"] == "final" and m["words"]:
                    finals.append((time.monotonic(), m["words"][-1]["end"], m["text"]))
        reader = asyncio.create_task(read())
        await pace(ws, list(messages), sent)
        await ws.send('{"type":"close"}')
        await reader
    return sent, finals


async def run_deepgram(url: str, messages: list[tuple[bytes, float]]
                       ) -> tuple[Sent, Finals]:
    sent: Sent = []
    finals: Finals = []
    async with websockets.connect(url, max_size=None,
                                  additional_headers={"Authorization": "Token x"}) as ws:
        async def read() -> None:
            async for raw in ws:
                m = json.loads(raw)
                alt = m.get("channel", {}).get("alternatives", [{}])[0] \
                    if m["type"] == "Results" else {}
                if m["type"] == "Results" and m["is_final"] and alt.get("words"):
                    finals.append((time.monotonic(), alt["words"][-1]["end"],
                                   alt["transcript"]))
        reader = asyncio.create_task(read())
        await pace(ws, list(messages), sent)
        await ws.send('{"type":"CloseStream"}')
        await reader
    return sent, finals


async def run_twilio(base: str, audio: bytes) -> tuple[Sent, Finals]:
    stream_sid = "MZ" + uuid.uuid4().hex
    sid = session_for(stream_sid)
    sent: Sent = []
    finals: Finals = []
    start = {"event": "start", "streamSid": stream_sid, "start": {
        "streamSid": stream_sid, "callSid": "CA" + "0" * 32, "tracks": ["inbound"],
        "customParameters": {},
        "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}}}
    messages: list[tuple[str | bytes, float]] = [
        (json.dumps({"event": "media", "streamSid": stream_sid, "media": {
            "track": "inbound", "chunk": str(i), "timestamp": str(20 * i),
            "payload": base64.b64encode(audio[pos:pos + 160]).decode()}}),
         len(audio[pos:pos + 160]) / 8000)
        for i, pos in enumerate(range(0, len(audio), 160))]
    async with websockets.connect(f"{base}/v1/twilio") as ws:
        await ws.send(json.dumps({"event": "connected", "protocol": "Call"}))
        await ws.send(json.dumps(start))
        await asyncio.sleep(0.2)  # the session exists once admitted: then view it
        async with websockets.connect(f"{base}/v1/sessions/{sid}/results") as viewer:
            async def read() -> None:
                async for raw in viewer:
                    m = json.loads(raw)
                    if m["type"] == "final" and m["words"]:
                        finals.append((time.monotonic(), m["words"][-1]["end"], m["text"]))
                    if m["type"] == "closed":
                        return
            reader = asyncio.create_task(read())
            await pace(ws, messages, sent)
            await ws.send(json.dumps({"event": "stop", "streamSid": stream_sid}))
            await reader
    return sent, finals


def ttfs(sent: Sent, finals: Finals) -> list[float]:
    out = []
    for received, end, _ in finals:
        at = next((t for seconds, t in sent if seconds >= end - 1e-6), sent[-1][1])
        out.append(received - at)
    return out


def wire_costs(repeat: int = 2000) -> dict[str, float]:
    """Microseconds per message of each wire's own work."""
    sid = uuid.uuid4().hex
    started = SessionStarted(sid, "tiny.en", 16000, "pcm_s16le", 1, "en", True)
    words = tuple(Word(f" w{i}", i * 0.3, i * 0.3 + 0.25, 0.9) for i in range(12))
    final = Final(sid, 3, " ".join(w.word for w in words), 0.0, 3.6, words, seq=9)
    partial = Partial(sid, 3, "w0 w1 w2", "w0", 0.0, 1.0, seq=8)
    dg = DeepgramWire(DeepgramOptions(True, True, 1000), "tiny.en")
    dg.opening(started)
    audio = bytes(3200)
    tw = TwilioWire(parse_start({"start": {
        "streamSid": "MZ1", "tracks": ["inbound"],
        "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}}}))
    media = json.dumps({"event": "media", "media": {
        "track": "inbound", "payload": base64.b64encode(bytes(160)).decode()}})

    def per(call: Callable[[], Any]) -> float:
        began = time.perf_counter()
        for _ in range(repeat):
            call()
        return (time.perf_counter() - began) / repeat * 1e6

    return {
        "deepgram_final_us": per(lambda: dg.results(final)),
        "deepgram_partial_us": per(lambda: dg.results(partial)),
        "deepgram_audio_in_us": per(lambda: dg.received(audio, Received())),
        "twilio_media_in_us": per(lambda: tw.inbound(media)),
    }


async def main_async(clip: str, step_s: float) -> dict[str, Any]:
    pcm = np.concatenate([load_pcm16(clip), np.zeros(32000, np.int16)])
    seconds = len(pcm) / 16000
    webm = encode(pcm, "webm", "libopus", 48000, {"live": "1"})
    law = mulaw(pcm)
    cluster = Cluster(workers=1)
    base = cluster.ws_url
    variants: dict[str, Callable[[], Awaitable[tuple[Sent, Finals]]]] = {
        "native pcm_s16le 16k": lambda: run_native(
            f"{base}/v1/listen", chunks(pcm.tobytes(), seconds, step_s)),
        "deepgram linear16 16k": lambda: run_deepgram(
            f"{base}/deepgram/v1/listen?encoding=linear16&sample_rate=16000&model=nova-3",
            chunks(pcm.tobytes(), seconds, step_s)),
        "native opus webm": lambda: run_native(
            f"{base}/v1/listen?encoding=opus", packet_chunks(webm, step_s)),
        "deepgram opus webm (no encoding)": lambda: run_deepgram(
            f"{base}/deepgram/v1/listen?model=nova-3", packet_chunks(webm, step_s)),
        "native mulaw 8k": lambda: run_native(
            f"{base}/v1/listen?encoding=mulaw", chunks(law, seconds, step_s)),
        "native mulaw 8k, 20 ms messages": lambda: run_native(
            f"{base}/v1/listen?encoding=mulaw", chunks(law, seconds, 0.02)),
        "twilio mulaw 8k (20 ms events)": lambda: run_twilio(base, law),
    }
    report: dict[str, Any] = {"clip": clip, "audio_s": seconds, "message_s": step_s,
                              "variants": {}}
    try:
        for name, run in variants.items():
            sent, finals = await run()
            text = " ".join(t for _, _, t in finals)
            times = ttfs(sent, finals)
            row = {"wer": round(wer(reference(clip), text), 3),
                   "ttf_median_s": round(statistics.median(times), 3) if times else None,
                   "ttf_mean_s": round(statistics.fmean(times), 3) if times else None,
                   "ttf_s": [round(t, 3) for t in times], "text": text}
            report["variants"][name] = row
            print(f"{name:34s} WER {row['wer']:.3f}  ttf median {row['ttf_median_s']} s  "
                  f"mean {row['ttf_mean_s']} s  {row['ttf_s']}", flush=True)
    finally:
        cluster.close()
    report["wire_costs_us"] = {k: round(v, 1) for k, v in wire_costs().items()}
    print("wire costs (µs per message):", report["wire_costs_us"])
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clip", default="fw_jfk")
    parser.add_argument("--message-s", type=float, default=0.1,
                        help="seconds of audio per message (Twilio: always 20 ms)")
    args = parser.parse_args()
    save_report("dialects", asyncio.run(main_async(args.clip, args.message_s)))


if __name__ == "__main__":
    main()
