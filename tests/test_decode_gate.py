"""The decode gate: lanes by urgency, then by fair share of recent decode time."""

from __future__ import annotations

import threading
import time

from transcriber.gate import DecodeGate


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
