"""python -m bench.gpu: the capacity bench on an NVIDIA GPU, with and without batching.

One worker on one GPU takes 8, 16, 32, 64 and 128 concurrent real-time streams (each its own
gateway session, independent speakers: the capacity suite's ``rotated`` mix), once with
cross-session batching off (``--batch-size 1``) and once on (``--batch-size 8``, the CUDA
default), and reports lag p95, time to final and WER per point. The whole plan fits in
``--budget-s`` (default 450 s, so that ``make bench-gpu`` with its install stays under ten
minutes): the conversation each stream says is as many clips as fit.

    make bench-gpu                    # installs, checks the GPU, runs, writes bench/results/gpu.*
    python -m bench.gpu --plan        # prints the plan and its time estimate, runs nothing
    python -m bench.gpu --dry-run     # the same plan at tiny sizes on the CPU (about 2 min)

Before anything runs, the device is checked: ``nvidia-smi``, CTranslate2's CUDA device count,
and one decode of real speech with the bundled model on the GPU in a fresh process (which
finds out whether the CUDA libraries CTranslate2 loads, libcublas.so.12, are there: from the
system, or from the ``nvidia-cublas-cu12`` wheel the Makefile installs when the system has
none, whose directory is put on ``LD_LIBRARY_PATH`` for the workers).
Results: ``bench/results/gpu.json`` (every point, the device, the plan) and ``gpu.md`` (a
table), or under ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results"

STREAMS = (8, 16, 32, 64, 128)
#: (name, worker arguments): batching off, and on at the CUDA default of 8 rows.
GPU_VARIANTS = (("nobatch", "--device cuda --compute-type float16 --batch-size 1"),
                ("batch8", "--device cuda --compute-type float16 --batch-size 8"))
DRY_STREAMS = (1, 2)
DRY_VARIANTS = (("nobatch", "--device cpu --compute-type int8 --batch-size 1"),
                ("batch2", "--device cpu --compute-type int8 --batch-size 2"))
#: Seconds one point costs besides its audio: Redis, gateway and worker start (the model
#: load), the streams' start stagger (2 s), the last finals, the stop.
POINT_OVERHEAD_S = 15.0
#: Seconds around a conversation's clips (bench/sessions.py conversation(): lead, tail) and
#: between them.
LEAD_TAIL_S, PAUSE_S = 2.5, 1.5


@dataclasses.dataclass(frozen=True)
class Plan:
    streams: tuple[int, ...]
    variants: tuple[tuple[str, str], ...]
    clips: int
    audio_s: float  # one stream's conversation
    estimate_s: float  # the whole plan, every point run
    dry_run: bool

    def command(self) -> list[str]:
        """The same run as ``python -m bench capacity`` arguments (it would overwrite the
        committed bench/results/capacity.json, so this module calls the suite itself)."""
        args = ["python", "-m", "bench", "capacity", "--mix", "rotated", "--clips",
                str(self.clips), "--streams", ",".join(map(str, self.streams))]
        for name, worker_args in self.variants:
            args += ["--variant", f"{name}={worker_args}"]
        return args


def clip_seconds() -> list[float]:
    """Durations of the capacity bench's clips, in its order (shared/audio manifest)."""
    from bench.sessions import CLIPS
    from tests.audio_refs import load_pcm16

    return [len(load_pcm16(c)) / 16000 for c in CLIPS]


def make_plan(dry_run: bool, budget_s: float, durations: list[float] | None = None) -> Plan:
    """The most clips per conversation (at least one) whose plan fits ``budget_s``."""
    durations = clip_seconds() if durations is None else durations
    streams, variants = (DRY_STREAMS, DRY_VARIANTS) if dry_run else (STREAMS, GPU_VARIANTS)
    points = len(streams) * len(variants)
    best = None
    for clips in range(1, len(durations) + 1):
        audio = LEAD_TAIL_S + sum(d + PAUSE_S for d in durations[:clips])
        estimate = points * (audio + POINT_OVERHEAD_S)
        if best is None or estimate <= budget_s:
            best = Plan(streams, variants, clips, round(audio, 1), round(estimate), dry_run)
        if estimate > budget_s or dry_run:  # a dry run proves the pipeline: one clip
            break
    assert best is not None
    return best


# --------------------------------------------------------------------------- the device


def cuda_library_path() -> str | None:
    """Put the nvidia-cublas-cu12 wheel's libraries (if installed) on LD_LIBRARY_PATH for the
    processes this one starts (the probe, the workers); the directory, or None."""
    try:
        import nvidia.cublas
    except ImportError:
        return None
    lib = str(Path(next(iter(nvidia.cublas.__path__))) / "lib")
    paths = [p for p in os.environ.get("LD_LIBRARY_PATH", "").split(":") if p]
    if lib not in paths:
        os.environ["LD_LIBRARY_PATH"] = ":".join([lib, *paths])
    return lib


def check_device(dry_run: bool) -> dict[str, Any]:
    """What the run is on; raises SystemExit with the reason when no usable GPU is found."""
    import ctranslate2

    if not dry_run:
        cuda_library_path()

    info: dict[str, Any] = {"ctranslate2": ctranslate2.__version__,
                            "cuda_devices": ctranslate2.get_cuda_device_count(),
                            "ld_library_path": os.environ.get("LD_LIBRARY_PATH", "")}
    smi = shutil.which("nvidia-smi")
    if smi:
        out = subprocess.run([smi, "--query-gpu=name,memory.total,driver_version",
                              "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=30, check=False)
        info["nvidia_smi"] = (out.stdout or out.stderr).strip()
    if dry_run:
        info["device"] = "cpu (dry run)"
        return info
    if not smi:
        raise SystemExit("no nvidia-smi: this machine has no NVIDIA driver (use --dry-run)")
    if info["cuda_devices"] < 1:
        raise SystemExit(f"CTranslate2 {info['ctranslate2']} sees no CUDA device "
                         f"(nvidia-smi: {info.get('nvidia_smi')!r})")
    # One real decode on the GPU, in a fresh process: loading the CUDA libraries happens
    # there, as in the workers, with this environment.
    probe = subprocess.run(
        [sys.executable, "-c", DECODE_PROBE], cwd=ROOT, capture_output=True, text=True,
        timeout=300, check=False)
    if probe.returncode != 0:
        raise SystemExit("a decode on the GPU failed (CUDA libraries for CTranslate2 "
                         "missing? libcublas.so.12 must be on LD_LIBRARY_PATH):\n"
                         + probe.stdout[-2000:] + probe.stderr[-2000:])
    info.update(json.loads(probe.stdout.strip().splitlines()[-1]))
    info["device"] = "cuda"
    return info


DECODE_PROBE = """
import json, time
import numpy as np
from faster_whisper import WhisperModel
from tests.audio_refs import load_pcm16, reference, wer
from transcriber.model import resolve_model
t = time.monotonic()
model = WhisperModel(resolve_model(""), device="cuda", compute_type="float16")
loaded = time.monotonic() - t
pcm = load_pcm16("fw_jfk").astype(np.float32) / 32768.0
t = time.monotonic()
segments, _ = model.transcribe(pcm, language="en", beam_size=1)
text = " ".join(s.text for s in segments)
print(json.dumps({"probe_load_s": round(loaded, 2), "probe_decode_s":
                  round(time.monotonic() - t, 3), "probe_wer": wer(reference("fw_jfk"), text)}))
"""


# --------------------------------------------------------------------------- the run


def run(plan: Plan) -> dict[str, Any]:
    from bench.__main__ import capacity_suite
    from bench.sessions import CLIPS, conversation

    args = argparse.Namespace(mix="rotated", streams=list(plan.streams),
                              variants=list(plan.variants), stop_at_failure=True)
    return capacity_suite(args, conversation(CLIPS[:plan.clips]))


def table(result: dict[str, Any]) -> str:
    lines = ["| variant | streams | lag p95 (s) | ttf p50 (s) | ttf p95 (s) | WER | sustained |",
             "|---|---|---|---|---|---|---|"]
    for name, variant in result["variants"].items():
        for row in variant["rows"]:
            def f(v: Any) -> str:
                return "-" if v is None else f"{v:.2f}"
            lines.append(f"| {name} | {row['streams']} | {f(row['lag_p95'])} | "
                         f"{f(row['ttf'].get('p50'))} | {f(row['ttf'].get('p95'))} | "
                         f"{row['wer_mean']:.3f} | {'yes' if row['sustained'] else 'no'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plan", action="store_true", help="print the plan and exit")
    p.add_argument("--dry-run", action="store_true",
                   help="the same plan at tiny sizes on the CPU (no GPU needed)")
    p.add_argument("--budget-s", type=float, default=450.0,
                   help="seconds the whole run may take; sets the clips per stream")
    p.add_argument("--out", type=Path, default=OUT, help="where gpu.json and gpu.md go")
    args = p.parse_args(argv)

    plan = make_plan(args.dry_run, args.budget_s)
    print(f"plan: {len(plan.variants)} variants x streams {list(plan.streams)}, "
          f"{plan.clips} clip(s) = {plan.audio_s:.0f} s of speech per stream, "
          f"about {plan.estimate_s:.0f} s in all{' (dry run, CPU)' if plan.dry_run else ''}")
    for name, worker_args in plan.variants:
        print(f"  {name}: worker {worker_args}")
    print("  as: " + " ".join(f"'{a}'" if " " in a else a for a in plan.command()),
          flush=True)
    if args.plan:
        return
    device = check_device(args.dry_run)
    print(f"device: {json.dumps(device)}", flush=True)
    started = time.monotonic()
    result = run(plan)
    from bench.__main__ import machine

    result.update(plan=dataclasses.asdict(plan), device=device, machine=machine(),
                  wall_s=round(time.monotonic() - started, 1))
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "gpu-dry-run" if plan.dry_run else "gpu"
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    (args.out / f"{stem}.md").write_text(table(result))
    print(table(result))
    print(f"wrote {args.out / stem}.json and .md in {result['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
