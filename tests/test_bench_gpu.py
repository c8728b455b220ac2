"""bench/gpu.py (make bench-gpu): its plan, checks and report, without a GPU and without
running the bench (`make bench-gpu DRY_RUN=1` runs the same plan at tiny sizes on the CPU)."""

from __future__ import annotations

import shlex

import pytest

from bench import gpu
from common.settings import TranscriberSettings, load

#: Clip durations like the capacity bench's (fw_jfk 11 s, then shorter ones).
DURATIONS = [11.0, 3.5, 2.9, 7.1, 5.9, 3.0, 4.9, 2.7]


def test_plan_covers_8_to_128_streams_with_and_without_batching_in_budget() -> None:
    plan = gpu.make_plan(dry_run=False, budget_s=450, durations=DURATIONS)
    assert plan.streams == (8, 16, 32, 64, 128)
    batch = {name: load(TranscriberSettings, shlex.split(args), environ={}).batch_size
             for name, args in plan.variants}
    assert sorted(batch.values()) == [1, 8], "batching off, and on"
    for _, args in plan.variants:
        settings = load(TranscriberSettings, shlex.split(args), environ={})
        assert settings.device == "cuda" and settings.compute_type == "float16"
    assert plan.estimate_s <= 450
    longer = gpu.make_plan(dry_run=False, budget_s=10_000, durations=DURATIONS)
    assert longer.clips > plan.clips, "the budget chooses how much speech each point gets"
    one_more = len(plan.streams) * len(plan.variants) * (
        plan.audio_s + DURATIONS[plan.clips] + gpu.PAUSE_S + gpu.POINT_OVERHEAD_S)
    assert one_more > 450, "as many clips as fit"


def test_dry_run_is_the_same_plan_small_and_on_the_cpu() -> None:
    real = gpu.make_plan(dry_run=False, budget_s=450, durations=DURATIONS)
    dry = gpu.make_plan(dry_run=True, budget_s=450, durations=DURATIONS)
    assert len(dry.variants) == len(real.variants)
    assert max(dry.streams) <= 2 and dry.clips == 1
    sizes = []
    for _, args in dry.variants:
        settings = load(TranscriberSettings, shlex.split(args), environ={})
        assert settings.device == "cpu"
        sizes.append(settings.batch_size)
    assert sizes[0] == 1 and sizes[1] > 1
    cmd = dry.command()
    assert cmd[:4] == ["python", "-m", "bench", "capacity"]
    assert cmd[cmd.index("--streams") + 1] == "1,2"


def test_plan_prints_and_runs_nothing(capsys: pytest.CaptureFixture[str],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    def no(*_a: object, **_k: object) -> None:
        raise AssertionError("--plan must not run or check anything")

    monkeypatch.setattr(gpu, "run", no)
    monkeypatch.setattr(gpu, "check_device", no)
    gpu.main(["--plan"])
    out = capsys.readouterr().out
    assert "streams [8, 16, 32, 64, 128]" in out
    assert "--batch-size 1" in out and "--batch-size 8" in out


def test_without_a_driver_the_check_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gpu.shutil, "which", lambda _name: None)
    with pytest.raises(SystemExit, match="no nvidia-smi"):
        gpu.check_device(dry_run=False)
    info = gpu.check_device(dry_run=True)
    assert info["device"] == "cpu (dry run)" and "ctranslate2" in info


def test_report_table() -> None:
    row = {"streams": 8, "lag_p95": 0.41, "ttf": {"p50": 0.5, "p95": 0.9}, "wer_mean": 0.05,
           "sustained": True}
    text = gpu.table({"variants": {"batch8": {"rows": [row, {**row, "streams": 16,
                                                            "lag_p95": None,
                                                            "sustained": False}]}}})
    assert "| batch8 | 8 | 0.41 | 0.50 | 0.90 | 0.050 | yes |" in text
    assert "| batch8 | 16 | - |" in text and text.rstrip().endswith("| no |")
