"""The decode gate: lanes by urgency, then by fair share of recent decode time; and the
worker's inference threads, on which only decodes wait for a lane."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator, Sequence

import pytest

from common.metrics import worker_metrics
from common.settings import TranscriberSettings, load
from transcriber.config import WorkerConfig
from transcriber.gate import DecodeGate
from transcriber.inference import Inference


def run_queued(gate: DecodeGate, waiting: list[tuple[str, int, str]]) -> list[str]:
    """Hold the only lane, queue ``waiting`` (name, rank, share) in order, release it: the
    order the lane went round in."""
    order: list[str] = []
    release = threading.Event()

    def decode(name: str, rank: int, share: str) -> None:
        with gate.lane(rank, share):
            order.append(name)
            if name == "running":
                release.wait(5.0)

    threads = [threading.Thread(target=decode, args=("running", DecodeGate.FINAL, "x"))]
    threads[0].start()
    while gate.active < 1:
        time.sleep(0.001)
    for i, item in enumerate(waiting):
        threads.append(threading.Thread(target=decode, args=item))
        threads[-1].start()
        while gate.active < i + 2:
            time.sleep(0.001)
    release.set()
    for t in threads:
        t.join(5.0)
    return order


def test_finals_go_first_then_speculative_finals_then_partials() -> None:
    gate = DecodeGate(1)
    order = run_queued(gate, [("partial", DecodeGate.PARTIAL, "a"),
                              ("spec", DecodeGate.SPECULATIVE, "a"),
                              ("final", DecodeGate.FINAL, "a"), ("final2", DecodeGate.FINAL, "a")])
    assert order == ["running", "final", "final2", "spec", "partial"]


def test_among_finals_the_share_that_decoded_least_lately_goes_first() -> None:
    """A client that asked for many decodes waits behind its own, not in front of others."""
    gate = DecodeGate(1)
    with gate.lane(DecodeGate.FINAL, "spammer"):
        time.sleep(0.05)  # the spammer used the lane a moment ago
    order = run_queued(gate, [("spam1", DecodeGate.FINAL, "spammer"),
                              ("spam2", DecodeGate.FINAL, "spammer"),
                              ("good", DecodeGate.FINAL, "good")])
    assert order == ["running", "good", "spam1", "spam2"]
    assert gate.used("spammer") > gate.used("good") > 0


def test_use_is_forgotten_with_the_half_life() -> None:
    gate = DecodeGate(1, half_life_s=0.05)
    with gate.lane(DecodeGate.FINAL, "a"):
        time.sleep(0.02)
    first = gate.used("a")
    time.sleep(0.1)
    assert gate.used("a") < first / 3


@pytest.fixture
def make_inference() -> Iterator[Callable[..., Inference]]:
    """``make(*flags)``: a CPU worker's inference threads and gate (no model is loaded)."""
    made: list[Inference] = []

    def make(*flags: str) -> Inference:
        s = load(TranscriberSettings, ["--device=cpu", *flags], environ={})
        made.append(Inference(s, WorkerConfig.from_settings(s), worker_metrics(),
                              model=object(), vad=object()))  # type: ignore[arg-type]
        return made[-1]

    yield make
    for inference in made:
        inference.executor.shutdown(wait=True)


async def test_a_cpu_worker_runs_two_decodes_at_once_and_one_when_told(
        make_inference: Callable[..., Inference]) -> None:
    """INFERENCE_THREADS auto = 2 lanes on a CPU: two sessions' decodes overlap (each waits
    at a barrier only the other can open); with one lane the second waits its turn."""

    async def overlapping(flags: Sequence[str]) -> bool:
        inference = make_inference(*flags)
        barrier = threading.Barrier(2, timeout=2.0)

        def meet() -> bool:
            with inference.gate.lane():
                try:
                    barrier.wait()
                    return True
                except threading.BrokenBarrierError:
                    return False

        return all(await asyncio.gather(inference.run(meet), inference.run(meet)))

    assert await overlapping([])
    assert not await overlapping(["--inference-threads=1"])


async def test_a_session_hears_its_audio_while_every_lane_decodes(
        make_inference: Callable[..., Inference]) -> None:
    """Only decodes wait for a lane: with the lane busy and decodes waiting, another
    session's core call that needs no decode (VAD, endpointing) runs at once; the lane then
    goes to the final somebody waits for, then the speculative final, then the partial."""
    inference = make_inference("--inference-threads=1")
    release = threading.Event()
    order: list[str] = []

    def decode(name: str, rank: int) -> None:
        with inference.gate.lane(rank):
            order.append(name)
            release.wait(5.0)

    async def busy(n: int) -> None:
        for _ in range(500):
            if inference.busy >= n:
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"{inference.busy} decodes in flight, expected {n}")

    try:
        calls = [asyncio.ensure_future(inference.run(decode, "running", DecodeGate.PARTIAL))]
        await busy(1)
        for name, rank in [("partial", DecodeGate.PARTIAL), ("spec", DecodeGate.SPECULATIVE),
                           ("final", DecodeGate.FINAL), ("final2", DecodeGate.FINAL)]:
            calls.append(asyncio.ensure_future(inference.run(decode, name, rank)))
            await busy(len(calls))
        assert order == ["running"]  # the others wait at the gate
        heard = await asyncio.wait_for(inference.run(lambda: ["vad"]), 1.0)
        assert heard == ["vad"]
        release.set()
        await asyncio.gather(*calls)
        assert order == ["running", "final", "final2", "spec", "partial"]
        assert inference.busy == 0
    finally:
        release.set()
