"""Settings → the worker's configuration: the documented sentinel values are read once, as
named values, and "auto" resolves by device (transcriber/config.py)."""

from __future__ import annotations

import pytest

from common.settings import TranscriberSettings, load
from transcriber.config import (
    AUTO,
    AUTO_FINAL_TAIL_FRAMES,
    AUTO_LANES_CPU,
    AUTO_TAIL_FRAMES_CPU,
    WorkerConfig,
    resolve_tails,
    setting_count,
    setting_tail,
    stream_config,
)
from transcriber.model import FULL_WINDOW
from transcriber.streaming import RATE


def settings(*flags: str, **env: str) -> TranscriberSettings:
    return load(TranscriberSettings, list(flags), environ=env)


def test_the_documented_sentinels_become_named_values() -> None:
    assert setting_tail(-2) is AUTO
    assert setting_tail(-7) is AUTO  # anything below -1, as before
    assert setting_tail(-1) == FULL_WINDOW
    assert setting_tail(0) == 0 and setting_tail(600) == 600
    assert setting_count(0) is AUTO
    assert setting_count(3) == 3


def test_automatic_encoder_tails_are_short_on_a_cpu_and_the_full_window_on_cuda() -> None:
    auto = settings()
    assert resolve_tails(auto, cuda=False) == (AUTO_TAIL_FRAMES_CPU, AUTO_FINAL_TAIL_FRAMES)
    assert resolve_tails(auto, cuda=False) == (600, 1000)  # (partials, finals)
    assert resolve_tails(auto, cuda=True) == (FULL_WINDOW, FULL_WINDOW) == (-1, -1)
    full = settings("--final-encoder-tail-frames=-1")
    assert resolve_tails(full, cuda=False) == (600, -1)
    long = settings("--encoder-tail-frames=1500")
    assert resolve_tails(long, cuda=False) == (1500, 1500)
    window = settings("--encoder-tail-frames=-1")
    assert resolve_tails(window, cuda=False) == (-1, -1)


def test_env_values_are_read_as_documented() -> None:
    s = settings(ENCODER_TAIL_FRAMES="-1", FINAL_ENCODER_TAIL_FRAMES="-2", BATCH_SIZE="0",
                 INFERENCE_THREADS="0")
    assert WorkerConfig.resolve(s, cuda=False) == WorkerConfig(
        cuda=False, batch_size=1, lanes=AUTO_LANES_CPU, tail_frames=FULL_WINDOW,
        final_tail_frames=FULL_WINDOW)


@pytest.mark.parametrize(("flags", "cuda", "batch", "lanes"), [
    ((), False, 1, 2),  # CPU: no batching, two lanes
    ((), True, 8, 8),  # CUDA: batches of 8, whose rows are the lanes
    (("--inference-threads=1",), False, 1, 1),
    (("--inference-threads=3",), True, 8, 8),  # batching: the rows run at once instead
    (("--batch-size=1",), True, 1, 1),
    (("--batch-size=4",), False, 4, 4),
])
def test_batching_and_lanes_resolve_by_device(flags: tuple[str, ...], cuda: bool, batch: int,
                                              lanes: int) -> None:
    config = WorkerConfig.resolve(settings(*flags), cuda=cuda)
    assert (config.batch_size, config.lanes) == (batch, lanes)


def test_the_load_policy_and_stream_config_carry_their_settings() -> None:
    s = settings("--partial-max-queue=5", "--short-finals-queue=0", "--min-silence-s=0.3",
                 "--speech-pad-s=0.1")
    policy = WorkerConfig.resolve(s, cuda=False).load_policy(s)
    assert (policy.lanes, policy.partial_max_queue, policy.short_finals_queue) == (2, 5, 0)
    config = stream_config(s, interim=True)
    assert config.endpoint.min_silence_samples == int(0.3 * RATE)
    assert config.pad_samples == int(0.1 * RATE)
    assert config.interim_results
    assert not stream_config(s, interim=False).interim_results
    assert not stream_config(settings("--interim-results=false"), interim=True).interim_results
