"""Export formats of the recorded-sessions API (fanout/formats.py): no server, no Redis."""

from __future__ import annotations

import io
import json
import wave

import numpy as np
import pysrt
import webvtt

from common.messages import Final, Word
from fanout import formats


def words_of(text: str, start: float, step: float = 0.4) -> tuple[Word, ...]:
    return tuple(Word(f" {w}", round(start + i * step, 3), round(start + i * step + 0.3, 3), 0.9)
                 for i, w in enumerate(text.split()))


def final(utterance: int, text: str, start: float, step: float = 0.4) -> Final:
    words = words_of(text, start, step)
    return Final("s", utterance, text, words[0].start, words[-1].end, words, seq=utterance + 1)


LONG = ("four score and seven years ago our fathers brought forth on this continent a new "
        "nation conceived in liberty and dedicated to the proposition that all men are "
        "created equal")
FINALS = [final(0, "Hello there, world & friends.", 0.5),
          Final("s", 1, "", 3.0, 3.5, (), seq=2),  # an empty final: no cue, no line
          final(2, LONG, 4.0)]


def parse_srt(text: str) -> list[tuple[float, float, str]]:
    return [(s.start.ordinal / 1000, s.end.ordinal / 1000, s.text)
            for s in pysrt.from_string(text)]


def parse_vtt(text: str) -> list[tuple[float, float, str]]:
    return [(vtt_seconds(c.start), vtt_seconds(c.end), c.text) for c in webvtt.from_string(text)]


def vtt_seconds(stamp: str) -> float:
    h, m, s = stamp.split(":")
    return int(h) * 3600 + int(m) * 60 + float(s)


def test_cues_are_readable_pieces_timed_by_their_words() -> None:
    cues = formats.cues(FINALS)
    assert len(cues) >= 3  # the long final is split
    all_words = [w for f in FINALS for w in f.words]
    pos = 0
    for cue in cues:
        assert len(cue.text) <= formats.CUE_CHARS
        assert cue.end - cue.start <= formats.CUE_SECONDS
        # A cue is a contiguous run of the words, timed by its first and last word.
        run = all_words[pos:pos + len(cue.words)]
        assert list(cue.words) == run
        assert (cue.start, cue.end) == (run[0].start, run[-1].end)
        pos += len(cue.words)
    assert pos == len(all_words)


def test_srt_parses_with_pysrt_and_matches_cues() -> None:
    srt = formats.to_srt(FINALS)
    parsed = parse_srt(srt)
    cues = formats.cues(FINALS)
    assert len(parsed) == len(cues)
    for (start, end, text), cue in zip(parsed, cues, strict=True):
        assert abs(start - cue.start) < 1e-3 and abs(end - cue.end) < 1e-3
        assert " ".join(text.split()) == cue.text
        assert all(len(line) <= formats.LINE_CHARS for line in text.splitlines())


def test_vtt_parses_with_webvtt_and_escapes_markup() -> None:
    vtt = formats.to_vtt(FINALS)
    assert vtt.startswith("WEBVTT\n")
    assert "&amp;" in vtt
    parsed = parse_vtt(vtt)
    cues = formats.cues(FINALS)
    assert len(parsed) == len(cues)
    for (start, end, text), cue in zip(parsed, cues, strict=True):
        assert abs(start - cue.start) < 1e-3 and abs(end - cue.end) < 1e-3
        assert " ".join(text.split()).replace("&amp;", "&") == cue.text


def test_timestamps_past_an_hour() -> None:
    late = [final(0, "late words here", 3725.25)]
    assert "01:02:05,250 -->" in formats.to_srt(late)
    assert "01:02:05.250 -->" in formats.to_vtt(late)


def test_text_and_json_skip_empty_finals_and_keep_words() -> None:
    assert formats.to_text(FINALS) == f"Hello there, world & friends.\n{LONG}\n"
    body = json.loads(formats.to_json(FINALS, {"session_id": "s", "state": "closed"}))
    assert body["complete"] is True
    assert [u["utterance"] for u in body["utterances"]] == [0, 2]
    assert body["utterances"][0]["words"][0] == {
        "word": " Hello", "start": 0.5, "end": 0.8, "probability": 0.9}
    assert body["text"].startswith("Hello there")


def test_final_without_word_timings_becomes_one_cue() -> None:
    bare = [Final("s", 0, "no timings", 1.0, 2.0, (), seq=1)]
    assert parse_srt(formats.to_srt(bare)) == [(1.0, 2.0, "no timings")]


def test_wav_header_is_read_back_by_the_stdlib() -> None:
    pcm = (np.arange(1000, dtype=np.int16) * 7).astype("<i2")
    data = formats.wav_header(len(pcm)) + pcm.tobytes()
    with wave.open(io.BytesIO(data)) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, 16000)
        assert np.array_equal(np.frombuffer(w.readframes(w.getnframes()), "<i2"), pcm)
