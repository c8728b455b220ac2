"""Speaker labels in the exports and the CLI (fanout/formats.py, fanout/cli.py): no server."""

from __future__ import annotations

import io
import json

import pysrt
import webvtt

from common.messages import Final, Word, result_from_dict, result_to_dict, to_json
from fanout import formats
from fanout.cli import Printer


def said(speaker: int, text: str, start: float) -> list[Word]:
    return [Word(f" {w}", round(start + i * 0.4, 3), round(start + i * 0.4 + 0.3, 3), 0.9,
                 speaker) for i, w in enumerate(text.split())]


def final(utterance: int, words: list[Word], speaker: int) -> Final:
    return Final("s", utterance, "".join(w.word for w in words).strip(), words[0].start,
                 words[-1].end, tuple(words), seq=utterance + 1, speaker=speaker)


# the second utterance changes speaker in its middle
FINALS = [final(0, said(0, "good morning everyone", 0.5), 0),
          final(1, said(1, "morning how are you", 2.5) + said(0, "fine thanks", 4.1), 1),
          final(2, said(1, "shall we begin", 6.0), 1)]


def test_speaker_is_on_finals_and_words_and_round_trips() -> None:
    body = json.loads(to_json(FINALS[1]))
    assert body["speaker"] == 1
    assert [w["speaker"] for w in body["words"]] == [1, 1, 1, 1, 0, 0]
    assert result_from_dict(result_to_dict(FINALS[1])) == FINALS[1]


def test_without_speakers_the_field_is_left_out() -> None:
    plain = Final("s", 0, "hi", 0.0, 0.5, (Word(" hi", 0.0, 0.5, 0.9),))
    body = json.loads(to_json(plain))
    assert "speaker" not in body and "speaker" not in body["words"][0]
    assert "speaker" not in result_to_dict(plain)


def test_vtt_cues_are_voice_spans_split_where_the_speaker_changes() -> None:
    captions = webvtt.from_string(formats.to_vtt(FINALS))
    got = [(c.voice, " ".join(c.text.split())) for c in captions]
    assert got == [("Speaker 1", "good morning everyone"),
                   ("Speaker 2", "morning how are you"),
                   ("Speaker 1", "fine thanks"),
                   ("Speaker 2", "shall we begin")]
    assert "<v Speaker 2>morning how are you" in formats.to_vtt(FINALS)


def test_srt_and_text_are_prefixed_with_the_speaker() -> None:
    subs = [s.text for s in pysrt.from_string(formats.to_srt(FINALS))]
    assert subs == ["Speaker 1: good morning everyone", "Speaker 2: morning how are you",
                    "Speaker 1: fine thanks", "Speaker 2: shall we begin"]
    assert formats.to_text(FINALS).splitlines() == subs


def test_json_export_carries_the_speakers() -> None:
    body = json.loads(formats.to_json(FINALS, {"state": "closed"}))
    assert [u["speaker"] for u in body["utterances"]] == [0, 1, 1]
    assert [w["speaker"] for w in body["utterances"][1]["words"]] == [1, 1, 1, 1, 0, 0]


def test_exports_without_speakers_are_unchanged() -> None:
    plain = [Final("s", 0, "hello there", 0.5, 1.2,
                   (Word(" hello", 0.5, 0.8, 0.9), Word(" there", 0.9, 1.2, 0.9)))]
    assert formats.to_text(plain) == "hello there\n"
    assert "<v " not in formats.to_vtt(plain)
    assert "speaker" not in formats.to_json(plain, {})


def test_the_cli_shows_who_spoke() -> None:
    out = io.StringIO()
    printer = Printer(out=out)
    printer(json.loads(to_json(FINALS[1])))
    printer(json.loads(to_json(FINALS[2])))
    lines = out.getvalue().splitlines()
    assert lines[0].endswith("] Speaker 2: morning how are you Speaker 1: fine thanks")
    assert lines[1].endswith("] Speaker 2: shall we begin")


def test_the_deepgram_dialect_asks_for_speakers_and_puts_them_on_each_word() -> None:
    from ingest.dialects.deepgram import DeepgramOptions, DeepgramWire, deepgram_params

    params, _ = deepgram_params({"diarize": ["true"], "encoding": ["linear16"],
                                 "sample_rate": ["16000"]})
    assert params.diarize
    assert not deepgram_params({"encoding": ["linear16"]})[0].diarize
    wire = DeepgramWire(DeepgramOptions(), "tiny.en")
    (results,) = [json.loads(m) for m in wire.results(FINALS[1])]
    words = results["channel"]["alternatives"][0]["words"]
    assert [w["speaker"] for w in words] == [1, 1, 1, 1, 0, 0]
    plain = Final("s", 0, "hi", 0.0, 0.5, (Word(" hi", 0.0, 0.5, 0.9),))
    (results,) = [json.loads(m) for m in wire.results(plain)]
    assert "speaker" not in results["channel"]["alternatives"][0]["words"][0]
