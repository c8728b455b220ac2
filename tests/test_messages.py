"""Wire and stream messages: one encode, one decode, and strict control parsing."""

from __future__ import annotations

import json

import pytest

from common.errors import InvalidMessage
from common.messages import (
    AudioFrame,
    AudioMarker,
    Closed,
    Final,
    Partial,
    Warning,
    Word,
    pack_audio_entry,
    pack_result,
    parse_control,
    to_json,
    unpack_audio_entry,
    unpack_result,
)


@pytest.mark.parametrize("result", [
    Partial("s1", 2, "hello wor", "hello", 1.0, 2.5),
    Final("s1", 2, "hello world", 1.0, 2.4, (Word(" hello", 1.0, 1.5, 0.9),
                                              Word(" world", 1.6, 2.4, 0.8))),
    Closed("s1", 3, 12.5),
    Warning("s1", "queued", "waiting for a transcriber"),
])
def test_results_round_trip_through_a_stream_entry(result) -> None:  # type: ignore[no-untyped-def]
    fields = {b"m": pack_result(result), b"seq": b"7"}
    back = unpack_result(fields)
    assert back == type(result)(**{**result.__dict__, "seq": 7})


def test_final_json_has_the_protocol_fields() -> None:
    final = Final("s1", 0, "hi", 0.1, 0.4, (Word(" hi", 0.1, 0.4, 0.95),), seq=3)
    obj = json.loads(to_json(final))
    assert obj == {"type": "final", "session_id": "s1", "utterance": 0, "text": "hi",
                   "start": 0.1, "end": 0.4, "seq": 3,
                   "words": [{"word": " hi", "start": 0.1, "end": 0.4, "probability": 0.95}]}


def test_audio_entries_round_trip() -> None:
    for entry in (AudioFrame(1, 0, b"\x01\x02" * 10), AudioMarker("finalize", 2, 10),
                  AudioMarker("close", 3, 10)):
        fields = {k.encode(): v for k, v in pack_audio_entry(entry).items()}
        assert unpack_audio_entry(fields) == entry


@pytest.mark.parametrize("text", [
    "{", "[]", '"close"', '{"type": "shout"}', '{"kind": "close"}', "[" * 100000 + "]" * 100000,
    '{"type": 5}',
])
def test_bad_control_messages_are_invalid(text: str) -> None:
    with pytest.raises(InvalidMessage):
        parse_control(text)


def test_control_messages_parse() -> None:
    assert parse_control('{"type":"close"}').type == "close"
    assert parse_control('{"type":"finalize","extra":1}').type == "finalize"
    assert parse_control('{"type":"keepalive"}').type == "keepalive"
