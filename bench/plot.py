"""One PNG summarising the JSON results of the suites that were run."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np


def _load(out: Path, name: str) -> dict | None:
    path = out / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def plot_all(out: Path) -> Path:
    latency, capacity, gateway = (_load(out, n) for n in ("latency", "capacity", "gateway"))
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    ax = axes[0]
    if latency:
        for name, v in latency["variants"].items():
            vals = np.sort(np.asarray(v["ttf_values"]))
            if len(vals):
                ax.step(vals, np.arange(1, len(vals) + 1) / len(vals), where="post",
                        label=f"{name} (p50 {np.median(vals):.2f} s)")
        ax.axvline(0.4, color="grey", ls=":", lw=1)
        ax.legend(fontsize=8)
    ax.set(title="Time to final, 1 stream (CDF)", xlabel="seconds after end of speech",
           ylabel="share of utterances")
    ax = axes[1]
    if capacity:
        for name, v in capacity["variants"].items():
            rows = v["rows"]
            ax.plot([r["streams"] for r in rows], [r["lag_p95"] for r in rows], "o-",
                    label=f"{name}: lag p95")
            ax.plot([r["streams"] for r in rows], [r["ttf"]["p95"] for r in rows], "s--",
                    label=f"{name}: time-to-final p95")
        ax.axhline(1.0, color="grey", ls=":", lw=1)
        ax.legend(fontsize=8)
    mix = (capacity or {}).get("mix", "same")
    ax.set(title=f"One worker: concurrent real-time streams ({mix} mix)", xlabel="streams",
           ylabel="seconds")
    ax = axes[2]
    if gateway:
        variants = gateway.get("variants") or {"default": {"rows": gateway["rows"]}}
        for name, v in variants.items():
            rows = v["rows"]
            ax.plot([r["sockets"] for r in rows], [r["frame_to_xadd_ms"]["p99"] for r in rows],
                    "o-", label=f"{name}: p99")
            ax.plot([r["sockets"] for r in rows], [r["frame_to_xadd_ms"]["p50"] for r in rows],
                    "s--", label=f"{name}: p50")
        ax.axhline(20, color="grey", ls=":", lw=1)
        ax.set_yscale("log")
        ax.legend(fontsize=8, loc="upper left")
    ax.set(title="Gateway load: frame→XADD (100 ms frames)", xlabel="sockets", ylabel="ms")
    fig.tight_layout()
    path = out / "bench.png"
    fig.savefig(path, dpi=110)
    return path
