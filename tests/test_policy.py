"""The worker's decisions around the core (transcriber/policy.py): load shedding, short
finals, finalize pacing, parking and the fair share of slots, as plain values."""

from __future__ import annotations

import numpy as np

from common.messages import Partial
from common.session_meta import SessionMeta
from tests.test_streaming_core import CFG, BurstDecoder, fake_vad, silence, texts, utterance
from transcriber.policy import (
    FinalizePacer,
    LoadPolicy,
    ParkTimer,
    SharePolicy,
    Slot,
    share_of,
)
from transcriber.streaming import RATE, Committed, PartialJob, StreamingTranscriber

POLICY = LoadPolicy(lanes=1, partial_max_queue=2, partial_max_age_s=1.0,
                    speculate_max_queue=3, short_finals_queue=1)


def test_only_decodes_beyond_the_lanes_count_as_queued() -> None:
    four = LoadPolicy(4, 2, 1.0, 3, 1)
    assert [four.queued(busy) for busy in (0, 3, 4, 6)] == [0, 0, 1, 3]
    assert [POLICY.queued(busy) for busy in (0, 1, 2)] == [0, 1, 2]


def test_partials_are_shed_first_then_speculation_as_decodes_queue() -> None:
    calm = POLICY.feed(busy=0, age_s=0.1, partial_running=False)
    assert (calm.shed, calm.partials, calm.speculate, calm.short_finals) == \
        (False, True, True, False)
    one = POLICY.feed(busy=1, age_s=0.1, partial_running=False)
    assert (one.shed, one.partials, one.speculate, one.short_finals) == \
        (False, True, True, True)  # finals go short-context first
    two = POLICY.feed(busy=2, age_s=0.1, partial_running=False)
    assert (two.shed, two.partials, two.speculate) == (True, False, True)
    three = POLICY.feed(busy=3, age_s=0.1, partial_running=False)
    assert (three.shed, three.partials, three.speculate) == (True, False, False)


def test_old_audio_sheds_partials_and_one_partial_runs_at_a_time() -> None:
    late = POLICY.feed(busy=0, age_s=1.0, partial_running=False)
    assert late.shed and not late.partials and late.speculate
    running = POLICY.feed(busy=0, age_s=0.0, partial_running=True)
    assert not running.shed and not running.partials  # not shed: just not two at once


def test_short_finals_never_when_turned_off() -> None:
    off = LoadPolicy(1, 2, 1.0, 3, short_finals_queue=0)
    assert not off.short_finals(busy=10)
    assert not off.feed(busy=10, age_s=0.0, partial_running=False).short_finals


def test_a_shed_feed_gives_the_core_no_partial_but_every_final() -> None:
    """The plan, fed with arrays through the core: under load no partial is decoded, and
    the final holds every word."""
    decoder = BurstDecoder()
    core = StreamingTranscriber("s", decoder, fake_vad, CFG)
    audio = np.concatenate([utterance(list(range(20, 28))), silence(1.0)])
    events = []
    plan = POLICY.feed(busy=3, age_s=0.0, partial_running=False)
    for i in range(0, len(audio), RATE // 10):
        events += core.feed(audio[i:i + RATE // 10], partials=plan.partials,
                            speculate=plan.speculate, detach=True)
    assert not [e for e in events if isinstance(e, Partial | PartialJob)]
    assert texts([e for e in events if isinstance(e, Committed)]) == [
        " ".join(f"w{i}" for i in range(20, 28))]
    assert [final for _n, final in decoder.calls] == [True]


def test_finalize_is_applied_at_most_once_per_interval_and_a_later_one_waits() -> None:
    pacer = FinalizePacer(1.0)
    assert not pacer.take(0.0)  # nothing asked
    pacer.ask()
    assert pacer.take(0.0)
    assert not pacer.take(0.1)  # applied: nothing due
    pacer.ask()
    pacer.ask()  # asking twice is one finalize
    assert not pacer.take(0.5)  # too soon: it waits
    assert pacer.take(1.0)
    assert not pacer.take(5.0)


def test_a_silent_session_parks_after_the_quiet_time_and_unparks_when_it_speaks() -> None:
    timer = ParkTimer(3.0)
    assert timer.step(0.0, speaking=False, parked=False) is None  # quiet from here
    assert timer.step(2.9, speaking=False, parked=False) is None
    assert timer.step(3.0, speaking=False, parked=False) is Slot.PARK
    assert timer.step(4.0, speaking=False, parked=True) is None  # parked already
    assert timer.step(5.0, speaking=True, parked=True) is Slot.UNPARK
    assert timer.step(6.0, speaking=True, parked=False) is None
    assert timer.step(7.0, speaking=False, parked=False) is None  # quiet starts again
    assert timer.step(9.9, speaking=False, parked=False) is None
    assert timer.step(10.0, speaking=False, parked=False) is Slot.PARK


def test_parking_off_never_parks() -> None:
    timer = ParkTimer(0)
    assert timer.step(0.0, speaking=False, parked=False) is None
    assert timer.step(100.0, speaking=False, parked=False) is None


def test_a_session_belongs_to_its_key_then_principal_then_address() -> None:
    assert share_of(SessionMeta(account="app", principal="token:n1", address="1.2.3.4")) == "app"
    assert share_of(SessionMeta(principal="key:app")) == "key:app"
    assert share_of(SessionMeta(address="1.2.3.4")) == "ip:1.2.3.4"
    assert share_of(SessionMeta()) == ""


def test_a_share_over_its_quota_gives_back_its_newest_slot() -> None:
    shares = SharePolicy(capacity=8, principal_share=0.5)
    assert shares.quota == 4 and shares.limited
    assert not shares.over(4) and shares.over(5)
    assert shares.may_take(3) and not shares.may_take(4)
    assert shares.most_over({"a": ["a1", "a2", "a3", "a4"], "b": ["b1"]}) == ()
    held = shares.most_over({"a": ["a1", "a2", "a3", "a4", "a5"],
                             "b": [f"b{i}" for i in range(1, 7)]})
    assert held[-1] == "b6"  # the share most over its quota, its newest session


def test_no_share_limit_at_zero_or_one_and_at_least_one_slot() -> None:
    assert SharePolicy(8, 0).quota == 8 and not SharePolicy(8, 0).limited
    assert SharePolicy(8, 1.0).quota == 8
    assert SharePolicy(1, 0.5).quota == 1
