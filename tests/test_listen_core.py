"""The listen session's I/O-free core (ingest/listen_core.py) and its limits
(ingest/limits.py): messages and times in, audio entries and errors out."""

from __future__ import annotations

import base64
import json
from urllib.parse import parse_qs

import numpy as np
import pytest

from common.audio import TARGET_RATE
from common.errors import (
    BadRequest,
    IdleTimeout,
    InvalidMessage,
    MessageTooBig,
    SessionTooLong,
    TooFast,
    TooManyMessages,
)
from common.messages import AudioFrame, AudioMarker, Final, Partial, Word
from common.session_meta import ENDPOINTING_DEFAULT, ENDPOINTING_OFF
from ingest.limits import AudioRate, SessionClock
from ingest.listen_core import ListenCore, ListenLimits, ListenParams

LIMITS = ListenLimits(max_frame_seconds=2.0, max_audio_speed=2.0, audio_burst_s=5.0,
                      max_message_bytes=1 << 20, max_messages_per_s=0.0, messages_burst=0.0,
                      max_control_bytes=4096, max_session_s=60.0, client_idle_timeout_s=5.0)


def params(query: str = "") -> ListenParams:
    return ListenParams(parse_qs(query, keep_blank_values=True))


def pcm(seconds: float, rate: int = TARGET_RATE) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    return (np.sin(2 * np.pi * 220 * t) * 8000).astype("<i2").tobytes()


def test_audio_becomes_numbered_frames_at_running_offsets() -> None:
    core = ListenCore(params(), LIMITS, now=0.0)
    first = core.receive(pcm(0.5), 0.5)
    second = core.receive(pcm(0.25), 0.75)
    frames = first.entries + second.entries
    assert [(f.seq, f.offset) for f in frames] == [(1, 0), (2, 8000)]
    assert all(isinstance(f, AudioFrame) for f in frames)
    assert core.samples_sent == 12000 and first.seconds == 0.5 and not first.closed


def test_finalize_and_close_are_markers_after_the_audio() -> None:
    core = ListenCore(params(), LIMITS, now=0.0)
    core.receive(pcm(0.5), 0.5)
    fin = core.receive(json.dumps({"type": "finalize"}), 0.6)
    assert fin.entries == [AudioMarker("finalize", 2, 8000)] and not fin.closed
    end = core.receive(json.dumps({"type": "close"}), 0.7)
    assert end.closed and end.entries[-1] == AudioMarker("close", 3, 8000)
    assert core.ended and core.end(0.8) == []  # the end is written once


def test_resampled_audio_is_flushed_before_the_close_marker() -> None:
    core = ListenCore(params("sample_rate=44100"), LIMITS, now=0.0)
    got = core.receive(pcm(1.0, 44100), 1.0).entries
    end = core.end(1.1)
    total = sum(f.samples for f in got + end if isinstance(f, AudioFrame))
    assert abs(total - TARGET_RATE) <= 2  # the resampler's tail is not lost
    assert isinstance(end[-1], AudioMarker) and end[-1].offset == core.samples_sent


def test_base64_text_is_audio_too() -> None:
    core = ListenCore(params(), LIMITS, now=0.0)
    got = core.receive(base64.b64encode(pcm(0.1)).decode(), 0.1)
    assert len(got.entries) == 1 and core.samples_sent == 1600


def test_a_resumed_core_continues_the_stored_stream() -> None:
    core = ListenCore(params("session=" + "a" * 32 + "&after=3"), LIMITS, now=0.0)
    core.resume(samples=32000, entry_seq=7, ended=False)
    frame = core.receive(pcm(0.1), 0.1).entries[0]
    assert (frame.seq, frame.offset) == (8, 32000)
    started = core.started("a" * 32, "tiny.en", resumed=True)
    assert started.resumed and started.stored_samples == 33600
    def partial(seq: int) -> Partial:
        return Partial(session_id="s", utterance=0, seq=seq, text="x", stable_text="",
                       start=0.0, end=1.0)

    assert not core.wants(partial(3)) and core.wants(partial(4))


def test_refusals_are_the_errors_clients_get() -> None:
    core = ListenCore(params(), LIMITS, now=0.0)
    with pytest.raises(MessageTooBig):
        core.receive(pcm(2.5), 0.0)  # over max_frame_seconds
    with pytest.raises(InvalidMessage):
        core.receive("{not json", 0.0)
    fast = ListenCore(params(), LIMITS, now=0.0)
    with pytest.raises(TooFast):
        for i in range(100):  # 1.5 s of audio every 0.1 s
            fast.receive(pcm(1.5), i * 0.1)
    flood = ListenCore(params(), ListenLimits(**{**LIMITS.__dict__, "max_messages_per_s": 10.0,
                                                  "messages_burst": 5.0}), now=0.0)
    with pytest.raises(TooManyMessages):
        for _ in range(20):
            flood.receive(b"", 0.0)


def test_the_clock_names_the_limit_that_ended_the_session() -> None:
    core = ListenCore(params(), LIMITS, now=0.0)
    core.set_deadline(20.0)
    assert core.wake_at() == 5.0  # idle first
    core.receive(pcm(0.1), 4.0)
    assert core.wake_at() == 9.0  # a message moves the idle limit
    assert isinstance(core.expired(9.0), IdleTimeout)
    assert isinstance(core.expired(20.0), SessionTooLong)


def test_time_to_final_is_measured_from_the_arrival_of_its_last_word() -> None:
    core = ListenCore(params(), LIMITS, now=0.0)
    core.receive(pcm(1.0), 1.0)
    core.receive(pcm(1.0), 2.0)
    final = Final(session_id="s", utterance=0, seq=1, text="hello", start=0.2, end=1.5,
                  words=[Word("hello", 0.2, 1.5, 0.9)])
    assert core.final_delay(final, 2.75) == pytest.approx(0.75)  # its audio came at 2.0
    silent = Final(session_id="s", utterance=1, seq=2, text="", start=0.0, end=0.1, words=[])
    assert core.final_delay(silent, 3.0) is None


def test_endpointing_is_milliseconds_of_silence_or_false() -> None:
    assert params().endpointing == ENDPOINTING_DEFAULT  # the worker's own endpoints
    assert params("endpointing=800").endpointing == 800
    assert params("endpointing=false").endpointing == ENDPOINTING_OFF
    assert params("endpointing=0").endpointing == ENDPOINTING_OFF


def test_query_errors_are_bad_requests() -> None:
    for query in ("after=3", "session=xyz", "session=" + "a" * 32 + "&after=-1",
                  "interim_results=maybe", "language=" + "x" * 9, "endpointing=soon",
                  "endpointing=5", "endpointing=60001", "endpointing=-300"):
        with pytest.raises(BadRequest):
            params(query)


def test_audio_rate_allows_the_burst_then_the_speed() -> None:
    rate = AudioRate(speed=2.0, burst_s=3.0, now=0.0)
    rate.take(3.0, 0.0)  # the whole burst at once
    with pytest.raises(TooFast):
        rate.take(0.5, 0.1)  # 0.2 s of credit back, 0.5 asked
    rate = AudioRate(speed=2.0, burst_s=3.0, now=0.0)
    for i in range(1, 600):  # real time for a minute: never refused
        rate.take(0.1, i * 0.1)
    flood = AudioRate(speed=2.0, burst_s=3.0, now=0.0)
    with pytest.raises(TooFast):
        for i in range(1, 100):  # 10x real time
            flood.take(1.0, i * 0.1)
    AudioRate(speed=0.0, burst_s=0.0, now=0.0).take(1e6, 0.0)  # 0 = no limit


def test_session_clock_reports_which_limit_ended_it() -> None:
    clock = SessionClock(deadline=100.0, idle_s=5.0, now=0.0)
    assert clock.wake_at() == 5.0
    clock.touch(98.0)
    assert clock.wake_at() == 100.0
    assert isinstance(clock.expired(100.0), SessionTooLong)
    assert isinstance(clock.expired(50.0), IdleTimeout)


