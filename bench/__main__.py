"""python -m bench: latency, capacity and gateway-load benchmarks (run by hand: make bench).

Every suite starts its own redis-server, worker(s) and gateway on free ports,
streams real speech at real-time pace, and writes JSON (and a PNG plot) under
bench/results/. Timings on a shared 2-core machine are noisy: compare the
variants of one run, not runs of different days.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.sessions import (
    CLIPS,
    Conversation,
    breakdown,
    conversation,
    mix,
    partial_churn,
    pct,
    run_streams,
    streaming_wer,
    summary,
)
from tests.audio_refs import wer
from tests.procs import Cluster

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results"


#: Libraries whose versions move the results (a ctranslate2/faster-whisper update moved the
#: offline WER of the finals corpus by 0.4 points): recorded with every run.
LIBRARIES = ("ctranslate2", "faster-whisper", "onnxruntime", "numpy", "redis", "websockets")


def machine() -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    def ver(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"
    return {"cpus": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "when": time.strftime("%Y-%m-%d %H:%M:%S"),
            "libraries": {name: ver(name) for name in LIBRARIES}}


def offline_wer(conv: Conversation) -> float:
    from transcriber.model import WhisperDecoder, load_whisper

    model = load_whisper("", "auto", "auto", 0)
    words = WhisperDecoder(model, "en").decode(conv.pcm.astype(np.float32) / 32768.0, "", True)
    return wer(conv.reference, "".join(w.word for w in words))


def latency_suite(args: argparse.Namespace, conv: Conversation) -> dict[str, Any]:
    """One real-time stream per variant: time-to-final, its breakdown, partials, WER."""
    out: dict[str, Any] = {"offline_wer": offline_wer(conv), "reference": conv.reference,
                           "variants": {}}
    for name, worker_args in args.variants:
        code, wargs = _code(worker_args)
        cluster = Cluster(workers=1, worker_args=wargs, worker_cwd=code, gateway_cwd=code)
        try:
            (res,), _ = asyncio.run(run_streams(cluster, [conv]))
            min_sil = _arg(worker_args, "--min-silence-s", 0.5)
            rows = breakdown(res, cluster.redis.client(), min_sil)
        finally:
            cluster.close()
        parts = {k: summary([r[k] for r in rows]) for k in rows[0]} if rows else {}
        out["variants"][name] = {
            "worker_args": worker_args,
            "time_to_final": summary(res.time_to_final()),
            "breakdown": parts,
            "first_partial_s": res.first_partial_latency(),
            "partials": len(res.partials),
            "partial_churn": partial_churn(res),
            "finals": len(res.finals),
            "streaming_wer": streaming_wer(res, conv),
            "ttf_values": res.time_to_final(),
            "transcript": res.text,
        }
        v = out["variants"][name]
        print(f"[latency] {name}: ttf p50 {v['time_to_final']['p50']:.3f} "
              f"p95 {v['time_to_final']['p95']:.3f} s; first partial "
              f"{v['first_partial_s']:.2f} s; churn {v['partial_churn']:.2f}; "
              f"WER {v['streaming_wer']:.3f} (offline {out['offline_wer']:.3f})", flush=True)
    return out


def capacity_suite(args: argparse.Namespace, conv: Conversation) -> dict[str, Any]:
    """Concurrent real-time streams on one worker: lag p95 and time-to-final vs streams."""
    out: dict[str, Any] = {"mix": args.mix, "variants": {}}
    for name, worker_args in args.variants:
        rows = []
        for n in args.streams:
            code, wargs = _code(worker_args)
            # every stream comes from this one address: lift the per-address cap
            cluster = Cluster(workers=1, worker_args=["--capacity", str(max(n, 1)), *wargs],
                              gateway_args=["--max-sessions-per-ip", str(n + 10)],
                              worker_cwd=code, gateway_cwd=code)
            try:
                convs = mix(conv, n, args.mix)
                results, lags = asyncio.run(run_streams(cluster, convs))
                min_sil = _arg(worker_args, "--min-silence-s", 0.5)
                parts = [p for r in results
                         for p in breakdown(r, cluster.redis.client(), min_sil)]
            finally:
                cluster.close()
            ttf = [t for r in results for t in r.time_to_final()]
            row = {"streams": n, "lag_p95": pct(lags, 95), "lag_max": max(lags, default=None),
                   "ttf": summary(ttf),
                   "breakdown": {k: summary([p[k] for p in parts]) for k in parts[0]}
                   if parts else {},
                   "wer_mean": float(np.mean([streaming_wer(r, c)
                                              for r, c in zip(results, convs, strict=True)])),
                   "partials_per_stream": float(np.mean([len(r.partials) for r in results]))}
            row["sustained"] = row["lag_p95"] is not None and row["lag_p95"] < 1.0
            rows.append(row)
            print(f"[capacity] {name} {n} streams ({args.mix}): lag p95 {row['lag_p95']:.2f} s, "
                  f"ttf p50 {row['ttf']['p50']:.2f} p95 {row['ttf']['p95']:.2f} s, WER "
                  f"{row['wer_mean']:.3f}, partials/stream {row['partials_per_stream']:.0f}; "
                  + ", ".join(f"{k} p50/p95 {v['p50']:.2f}/{v['p95']:.2f}"
                              for k, v in row["breakdown"].items()
                              if k in ("endpoint_wait", "queueing", "compute")), flush=True)
            if not row["sustained"] and args.stop_at_failure:
                break
        sustained = [r["streams"] for r in rows if r["sustained"]]
        out["variants"][name] = {"worker_args": worker_args, "rows": rows,
                                 "max_sustained_streams": max(sustained, default=0)}
    return out


def _code(args: str) -> tuple[Path, list[str]]:
    """``--code DIR`` in a variant's worker args: the worker runs that checkout's code (a
    ``git worktree`` of an older revision), so a change is compared with the code before
    it in one run. The rest are the worker's arguments."""
    parts = shlex.split(args)
    if "--code" not in parts:
        return ROOT, parts
    i = parts.index("--code")
    return Path(parts[i + 1]).resolve(), parts[:i] + parts[i + 2:]


def _arg(args: str, flag: str, default: float) -> float:
    parts = shlex.split(args)
    return float(parts[parts.index(flag) + 1]) if flag in parts else default


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("suites", nargs="*", default=["latency", "capacity", "gateway"],
                   choices=["latency", "capacity", "gateway", "finals", "appends", "robustness"])
    p.add_argument("--variant", action="append", default=[], metavar="NAME=WORKER_ARGS",
                   help="a worker configuration to compare, e.g. 'fast=--min-silence-s 0.3'; "
                   "'old=--code DIR' runs the worker and the gateway from another checkout (a git "
                   "worktree of an older revision)")
    p.add_argument("--streams", type=lambda s: [int(x) for x in s.split(",")],
                   default=[1, 2, 4, 6, 8, 10, 12])
    p.add_argument("--clips", type=int, default=8, help="clips in the benchmark conversation")
    p.add_argument("--mix", choices=["same", "rotated"], default="same",
                   help="capacity: every stream says the same conversation a fraction of a "
                   "second apart (same: its utterances end together), or each starts at a "
                   "different clip (rotated: independent speakers)")
    p.add_argument("--sockets", type=lambda s: [int(x) for x in s.split(",")],
                   default=[100, 500, 1000])
    p.add_argument("--seconds", type=float, default=10.0, help="gateway load duration")
    p.add_argument("--settle", type=float, default=2.0,
                   help="gateway load: seconds between the last socket opening and the first "
                   "timed frame")
    p.add_argument("--stop-at-failure", action="store_true")
    p.add_argument("--gateway-variant", action="append", default=[], metavar="NAME=GATEWAY_ARGS",
                   help="a gateway configuration to compare, e.g. 'direct=--append-batch 1'; "
                   "'old=--code DIR' runs the gateway from another checkout (git worktree)")
    p.add_argument("--rounds", type=int, default=1,
                   help="gateway load: run the variants in turn this many times")
    p.add_argument("--conditions", type=lambda s: [x for x in s.split(",") if x], default=None,
                   help="robustness: conditions to run, comma-separated (default: all; see "
                   "bench/robustness.py); '' for none")
    p.add_argument("--nonspeech", type=lambda s: [x for x in s.split(",") if x], default=None,
                   help="robustness: non-speech kinds to run, comma-separated (default: all); "
                   "'' for none")
    p.add_argument("--nonspeech-seconds", type=float, default=60.0,
                   help="robustness: seconds of each non-speech kind")
    p.add_argument("--offsets-ms", type=lambda s: [int(x) for x in s.split(",")], default=[0],
                   help="robustness: stream (and decode offline) every session once per lead "
                   "offset, e.g. 0,30,70: that much silence first moves every chunk and VAD "
                   "window boundary, and the spread of the gap over offsets shows how much of "
                   "it is where the cuts fall")
    p.add_argument("--out", type=Path, default=None,
                   help="write the (single) suite's JSON here instead of bench/results/")
    args = p.parse_args()
    args.variants = [tuple(v.split("=", 1)) for v in args.variant] or [("default", "")]
    OUT.mkdir(exist_ok=True)
    conv = conversation(CLIPS[:args.clips])
    for suite in args.suites:
        if suite == "latency":
            data = latency_suite(args, conv)
        elif suite == "capacity":
            data = capacity_suite(args, conv)
        elif suite == "finals":
            from bench.finals import finals_suite

            data = finals_suite(args.variants)
        elif suite == "robustness":
            from bench.robustness import robustness_suite

            data = robustness_suite(args.variants, args.conditions, args.nonspeech,
                                    args.nonspeech_seconds, args.offsets_ms)
        elif suite == "appends":
            from bench.appends import appends_suite

            data = appends_suite()
        else:
            from bench.gateway_load import gateway_suite

            data = gateway_suite(args.sockets, args.seconds,
                                 [tuple(v.split("=", 1)) for v in args.gateway_variant],
                                 args.settle, args.rounds)
        data["machine"] = machine()
        data["audio_s"] = len(conv.pcm) / 16000
        path = args.out or OUT / f"{suite}.json"
        path.write_text(json.dumps(data, indent=1))
        print(f"wrote {path}")
    from bench.plot import plot_all

    print(f"wrote {plot_all(OUT)}")


if __name__ == "__main__":
    main()
