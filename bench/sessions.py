"""Benchmark inputs and metrics: sessions of real clips joined by known pauses, and the
numbers computed from what a client received (latency, churn, WER)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import random
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import msgpack
import numpy as np
import redis

from common.client import StreamResult, listen_url, stream
from tests.audio_refs import frames, load_pcm16, normalize, reference, wer

if TYPE_CHECKING:
    from tests.procs import Cluster

# English clips whose references are reliable; joined into one long "conversation".
CLIPS = [
    "fw_jfk", "ls_6930-75918-0000", "ds_ldc93s1", "ps_librivox_0870", "leo_en",
    "ps_librivox_0880", "mfa_ls_61-70968-0000", "sr_english", "ps_librivox_0890",
    "mfa_thoughts", "ps_forever", "mfa_cold_corpus3",
]
RATE = 16000


@dataclasses.dataclass
class Conversation:
    pcm: np.ndarray
    reference: str
    clip_spans: list[tuple[str, float, float]]  # (clip, start s, end s) on the timeline


def conversation(clips: list[str] = CLIPS, pause_s: float = 1.5, lead_s: float = 0.5,
                 tail_s: float = 2.0) -> Conversation:
    parts = [np.zeros(int(lead_s * RATE), dtype=np.int16)]
    spans, t, refs = [], lead_s, []
    for clip in clips:
        pcm = load_pcm16(clip)
        spans.append((clip, t, t + len(pcm) / RATE))
        t += len(pcm) / RATE + pause_s
        parts += [pcm, np.zeros(int(pause_s * RATE), dtype=np.int16)]
        refs.append(reference(clip))
    parts.append(np.zeros(int(tail_s * RATE), dtype=np.int16))
    return Conversation(np.concatenate(parts), " ".join(refs), spans)


def mix(conv: Conversation, n: int, kind: str) -> list[Conversation]:
    """The conversation of each of ``n`` streams. "same": every stream says the same thing,
    started a fraction of a second apart, so all of them reach each utterance (and each
    one-word answer) together: a worst case for a shared worker. "rotated": stream i
    starts at a different clip (the clips in the same order, from clip ``i * clips // n``,
    wrapping), as independent speakers would: same audio, words and pauses per stream,
    utterances that end at different moments."""
    if kind == "same":
        return [conv] * n
    if kind != "rotated":
        raise ValueError(f"unknown mix {kind!r}: same or rotated")
    clips = [c for c, _, _ in conv.clip_spans]
    out = []
    for i in range(n):
        k = i * len(clips) // max(n, 1)
        out.append(conv if k == 0 else conversation(clips[k:] + clips[:k]))
    return out


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return float(np.percentile(np.asarray(values), q))


def summary(values: list[float]) -> dict[str, Any]:
    return {"n": len(values), "p50": pct(values, 50), "p95": pct(values, 95),
            "p99": pct(values, 99), "mean": statistics.fmean(values) if values else None}


def partial_churn(res: StreamResult) -> float:
    """Share of partial words (beyond the stable prefix) the final did not keep in place."""
    finals = {f["utterance"]: normalize(f["text"]).split() for f in res.finals}
    shown = revised = 0
    for p in res.partials:
        final = finals.get(p["utterance"], [])
        stable = len(normalize(p["stable_text"]).split())
        words = normalize(p["text"]).split()
        for i in range(stable, len(words)):
            shown += 1
            if i >= len(final) or final[i] != words[i]:
                revised += 1
    return revised / shown if shown else 0.0


def breakdown(res: StreamResult, r: redis.Redis, min_silence_s: float) -> list[dict[str, float]]:
    """Per final: where the time between end of speech and the final's arrival went."""
    sid = res.messages[0].message["session_id"]
    timing = {}
    for entry_id, fields in r.xrange(f"stt:{{{sid}}}:results"):
        if b"t" in fields:
            timing[int(fields[b"seq"])] = (int(entry_id.decode().split("-")[0]) / 1000.0,
                                           msgpack.unpackb(fields[b"t"]))
    rows = []
    for rec in res.messages:
        m = rec.message
        if m.get("type") != "final" or not m.get("text") or m["seq"] not in timing:
            continue
        commit, t = timing[m["seq"]]
        if not t:
            continue
        sent_end = res.sent_time(float(m["end"])) + res.wall_offset
        recv = rec.at + res.wall_offset
        rows.append({
            "ttf": recv - sent_end,
            "endpoint_wait": t["xadd"] - sent_end,
            "queueing": t["fed"] - t["xadd"],
            "compute": t["done"] - t["fed"],
            "decode": t["decode"],
            "publish": commit - t["done"],
            "redis_out": recv - commit,
            "min_silence": min_silence_s,
        })
    return rows


def streaming_wer(res: StreamResult, conv: Conversation) -> float:
    return wer(conv.reference, res.text)


#: Where the suites write their reports.
RESULTS = Path(__file__).parent / "results"


def save_report(name: str, report: dict[str, Any]) -> Path:
    """``report`` as ``bench/results/NAME.json``; its path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(report, indent=1, ensure_ascii=False, default=float))
    print("wrote", path)
    return path


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) process ``pid`` has used."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class HasAudio(Protocol):
    pcm: np.ndarray


async def run_streams(cluster: Cluster, convs: list[Any], stagger_s: float = 2.0,
                      jitter_s: float = 0.2, **params: Any,
                      ) -> tuple[list[StreamResult], list[float]]:
    """A concurrent real-time stream per conversation (anything with ``pcm``, 16 kHz int16),
    started ``stagger_s / n`` apart (plus up to ``jitter_s`` at random), with ``params`` in
    the listen URL; samples each session's lag every 0.5 s in its steady state."""
    n = len(convs)
    sids: list[str | None] = [None] * n
    starts: list[float | None] = [None] * n
    lags: list[float] = []
    done = asyncio.Event()
    url = listen_url(cluster.ws_url, **params)

    def watcher(i: int) -> Any:
        def on(msg: dict[str, Any]) -> None:
            if msg["type"] == "session":
                sids[i] = msg["session_id"]
                starts[i] = time.monotonic()
        return on

    async def one(i: int) -> StreamResult:
        await asyncio.sleep(i * stagger_s / max(n, 1) + random.random() * jitter_s)
        return await stream(url, frames(convs[i].pcm), pace=1.0, on_message=watcher(i),
                            read_timeout=600)

    async def sampler() -> None:
        r = cluster.redis.client()
        while not done.is_set():
            await asyncio.sleep(0.5)
            now = time.monotonic()
            for sid, started, conv in zip(sids, starts, convs, strict=True):
                duration = len(conv.pcm) / RATE
                if sid is None or started is None:
                    continue
                sent = min(now - started, duration)
                if sent < 2.0 or sent >= duration - 0.5:
                    continue  # steady state only
                processed = await asyncio.to_thread(
                    r.hget, f"stt:{{{sid}}}:meta", "processed_sample")
                lags.append(max(0.0, sent - int(processed or 0) / RATE))

    samp = asyncio.create_task(sampler())
    results = await asyncio.gather(*(one(i) for i in range(n)))
    done.set()
    await samp
    return list(results), lags
