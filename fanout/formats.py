"""Export formats for a recorded session: WAV audio, and the transcript as text, JSON, SRT, VTT.

Pure functions over finals and PCM; no I/O. Subtitles are written by hand:
both formats are a few lines of text, and a library would add a dependency
without saving any of the cue-splitting logic, which is ours either way.
"""

from __future__ import annotations

import dataclasses
import json
import struct
from collections.abc import Sequence
from typing import Any

from common.audio import TARGET_RATE
from common.messages import Final, Word

#: Subtitle conventions (BBC / Netflix style guides): two lines of at most 42 characters,
#: at most 7 seconds on screen.
LINE_CHARS = 42
CUE_CHARS = 2 * LINE_CHARS
CUE_SECONDS = 7.0

TRANSCRIPT_FORMATS = ("txt", "json", "srt", "vtt")
CONTENT_TYPES = {
    "txt": "text/plain; charset=utf-8",
    "json": "application/json",
    "srt": "application/x-subrip; charset=utf-8",
    "vtt": "text/vtt; charset=utf-8",
    "wav": "audio/wav",
}


def wav_header(samples: int, rate: int = TARGET_RATE, channels: int = 1) -> bytes:
    """A 44-byte RIFF header for ``samples`` (per channel) of 16-bit PCM."""
    frame = 2 * channels
    data = samples * frame
    return (b"RIFF" + struct.pack("<I", 36 + data) + b"WAVE"
            + b"fmt " + struct.pack("<IHHIIHH", 16, 1, channels, rate, rate * frame, frame, 16)
            + b"data" + struct.pack("<I", data))


@dataclasses.dataclass(frozen=True)
class Cue:
    start: float
    end: float
    words: tuple[Word, ...]
    channel: int | None = None  # of a multichannel session
    speaker: int | None = None  # with speaker labels: one speaker's words per cue

    @property
    def text(self) -> str:
        return " ".join("".join(w.word for w in self.words).split())


def channel_label(channel: int | None) -> str:
    """How text and SRT mark a multichannel session's channel (its ``channel`` number)."""
    return "" if channel is None else f"[channel {channel}] "


def speaker_name(speaker: int) -> str:
    """How exports name a speaker: ``speaker`` 0 is "Speaker 1"."""
    return f"Speaker {speaker + 1}"


def _said_by(speaker: int | None, text: str) -> str:
    return text if speaker is None else f"{speaker_name(speaker)}: {text}"


def turns(final: Final) -> list[tuple[int | None, str]]:
    """A final's text as (speaker, text) runs: one run unless its words change speaker."""
    words = [w for w in final.words if w.word.strip()]
    if not words or all(w.speaker == words[0].speaker for w in words):
        return [(final.speaker if not words else words[0].speaker, final.text.strip())]
    out: list[tuple[int | None, list[Word]]] = []
    for w in words:
        if out and out[-1][0] == w.speaker:
            out[-1][1].append(w)
        else:
            out.append((w.speaker, [w]))
    return [(speaker, "".join(w.word for w in run).strip()) for speaker, run in out]


def _spoken(finals: Sequence[Final]) -> list[Final]:
    return [f for f in finals if f.text.strip()]


def cues(finals: Sequence[Final]) -> list[Cue]:
    """Subtitle cues: each final split at word boundaries into readable pieces.

    A cue's times are its first word's start and its last word's end, so a
    cue is on screen exactly while its words are spoken.
    """
    out: list[Cue] = []
    for final in _spoken(finals):
        words = [w for w in final.words if w.word.strip()]
        if not words:  # no word timings: one cue for the whole utterance
            out.append(Cue(final.start, max(final.end, final.start),
                           (Word(final.text, final.start, final.end, 1.0),), final.channel,
                           final.speaker))
            continue
        group: list[Word] = []
        for word in words:
            if group:
                text = "".join(w.word for w in [*group, word]).strip()
                too_long = len(" ".join(text.split())) > CUE_CHARS
                too_slow = word.end - group[0].start > CUE_SECONDS
                other_speaker = word.speaker != group[0].speaker
                if too_long or too_slow or other_speaker:
                    out.append(_cue(group, final.channel))
                    group = []
            group.append(word)
        out.append(_cue(group, final.channel))
    if any(cue.channel is not None for cue in out):  # channels overlap: cues by start time
        out.sort(key=lambda cue: cue.start)
    return out


def _cue(words: list[Word], channel: int | None = None) -> Cue:
    start = words[0].start
    return Cue(start, max(words[-1].end, start), tuple(words), channel, words[0].speaker)


def wrap(text: str, width: int = LINE_CHARS) -> list[str]:
    """At most two lines: split at the space nearest the middle when the text is too long."""
    if len(text) <= width:
        return [text]
    spaces = [i for i, c in enumerate(text) if c == " "]
    if not spaces:
        return [text]
    middle = len(text) / 2
    cut = min(spaces, key=lambda i: abs(i - middle))
    return [text[:cut], text[cut + 1:]]


def _timestamp(seconds: float, sep: str) -> str:
    ms = max(0, round(seconds * 1000))
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs, ms = divmod(ms, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{sep}{ms:03d}"


def to_srt(finals: Sequence[Final]) -> str:
    blocks = []
    for i, cue in enumerate(cues(finals), 1):
        text = "\n".join(wrap(channel_label(cue.channel) +
                              _said_by(cue.speaker, cue.text.replace("-->", "->"))))
        blocks.append(f"{i}\n{_timestamp(cue.start, ',')} --> {_timestamp(cue.end, ',')}\n"
                      f"{text}\n")
    return "\n".join(blocks)


def _vtt_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def to_vtt(finals: Sequence[Final]) -> str:
    blocks = ["WEBVTT\n"]
    for cue in cues(finals):
        text = "\n".join(_vtt_escape(line) for line in wrap(cue.text))
        if cue.speaker is not None:  # a voice span: <v Speaker 1>text
            text = f"<v {speaker_name(cue.speaker)}>{text}"
        elif cue.channel is not None:  # a voice span names the channel
            text = f"<v Channel {cue.channel}>{text}"
        blocks.append(f"{_timestamp(cue.start, '.')} --> {_timestamp(cue.end, '.')}\n{text}\n")
    return "\n".join(blocks)


def to_text(finals: Sequence[Final]) -> str:
    """One line per utterance (with speaker labels: per speaker's run, prefixed with it;
    a multichannel session's lines with their channel)."""
    return "".join(f"{channel_label(f.channel)}{_said_by(speaker, text)}\n"
                   for f in _spoken(finals) for speaker, text in turns(f))


def _word_dict(w: Word) -> dict[str, Any]:
    out = dataclasses.asdict(w)
    if out.get("speaker") is None:
        out.pop("speaker", None)
    return out


def to_json(finals: Sequence[Final], info: dict[str, Any]) -> str:
    """The session's info, its full text, and every utterance with its words."""
    spoken = _spoken(finals)
    body = {
        **info,
        "complete": info.get("state") == "closed",
        "text": " ".join(f.text.strip() for f in spoken),
        "utterances": [
            {"utterance": f.utterance, "seq": f.seq, "start": f.start, "end": f.end,
             "text": f.text.strip(),
             **({"speaker": f.speaker} if f.speaker is not None else {}),
             "words": [_word_dict(w) for w in f.words],
             **({"channel": f.channel} if f.channel is not None else {})}
            for f in spoken
        ],
    }
    return json.dumps(body, ensure_ascii=False, indent=1)


def transcript(fmt: str, finals: Sequence[Final], info: dict[str, Any]) -> str:
    if fmt == "txt":
        return to_text(finals)
    if fmt == "json":
        return to_json(finals, info)
    if fmt == "srt":
        return to_srt(finals)
    if fmt == "vtt":
        return to_vtt(finals)
    raise ValueError(f"unknown transcript format {fmt!r}")
