"""Every message on the wire and in Redis: frozen dataclasses with one encode and one decode.

Clients get JSON (``to_json``); Redis stream entries hold msgpack (``pack``).
Results are written by the transcriber without ``seq``: the commit script in
Redis assigns ``seq`` atomically and stores it beside the packed body.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, ClassVar, Literal

import msgpack

from common.errors import InvalidMessage, MessageTooBig

# --------------------------------------------------------------------------- results


@dataclasses.dataclass(frozen=True)
class Word:
    word: str
    start: float
    end: float
    probability: float
    #: who said it (``diarize=true``): a session-stable speaker number; None: not diarized
    speaker: int | None = None

    @classmethod
    def from_obj(cls, obj: Any) -> Word:
        speaker = obj.get("speaker")
        return cls(str(obj["word"]), float(obj["start"]), float(obj["end"]),
                   float(obj["probability"]), None if speaker is None else int(speaker))


@dataclasses.dataclass(frozen=True)
class Partial:
    """Unstable text of the open utterance; ``stable_text`` is a prefix that will not change."""

    TYPE: ClassVar[str] = "partial"
    session_id: str
    utterance: int
    text: str
    stable_text: str
    start: float
    end: float
    seq: int = 0
    #: which channel of a ``multichannel`` session (0-based); None (omitted) otherwise
    channel: int | None = None
    #: ``diarize=true``: who seems to speak at the partial's end (provisional)
    speaker: int | None = None


@dataclasses.dataclass(frozen=True)
class Final:
    """The one and only text of an utterance."""

    TYPE: ClassVar[str] = "final"
    session_id: str
    utterance: int
    text: str
    start: float
    end: float
    words: tuple[Word, ...] = ()
    seq: int = 0
    #: which channel of a ``multichannel`` session (0-based); None (omitted) otherwise
    channel: int | None = None
    #: what ended the utterance: ``pause`` (the speaker paused: the endpoint), ``finalize``
    #: (the client asked), ``max_length`` (cut at the utterance length cap; the speech goes
    #: on in the next one), ``end`` (the stream closed); None for finals stored before it
    #: was recorded (left out of JSON then)
    ended_by: str | None = None
    #: ``diarize=true``: who said most of it (each word has its own ``speaker``)
    speaker: int | None = None


#: ``Final.ended_by`` values.
ENDED_BY = ("pause", "finalize", "max_length", "end")


@dataclasses.dataclass(frozen=True)
class Closed:
    """The stream was drained after ``close``: no result follows."""

    TYPE: ClassVar[str] = "closed"
    session_id: str
    utterances: int
    duration: float
    seq: int = 0


@dataclasses.dataclass(frozen=True)
class Warning:
    """Non-fatal notice: queueing, lag, degraded partials."""

    TYPE: ClassVar[str] = "warning"
    session_id: str
    code: str
    message: str
    seq: int = 0


Result = Partial | Final | Closed | Warning
_RESULT_TYPES: dict[str, type[Any]] = {c.TYPE: c for c in (Partial, Final, Closed, Warning)}

#: Optional fields left out of JSON and msgpack when None (a session without them reads as
#: before they existed), in a result and in its words.
OPTIONAL_FIELDS: tuple[str, ...] = ("channel", "multichannel", "ended_by", "speaker")


def _drop_unset(out: dict[str, Any]) -> dict[str, Any]:
    for name in OPTIONAL_FIELDS:
        if name in out and out[name] is None:
            del out[name]
    for word in out.get("words", ()):
        if isinstance(word, dict) and word.get("speaker", 0) is None:
            del word["speaker"]
    return out


def result_to_dict(result: Result) -> dict[str, Any]:
    """The result as JSON-ready fields; ``OPTIONAL_FIELDS`` that are None are left out."""
    out: dict[str, Any] = {"type": result.TYPE}
    out.update(dataclasses.asdict(result))
    return _drop_unset(out)


def result_from_dict(obj: dict[str, Any]) -> Result:
    cls = _RESULT_TYPES.get(obj.get("type", ""))
    if cls is None:
        raise ValueError(f"unknown result type {obj.get('type')!r}")
    kwargs = {f.name: obj[f.name] for f in dataclasses.fields(cls) if f.name in obj}
    if cls is Final:
        kwargs["words"] = tuple(Word.from_obj(w) for w in obj.get("words", ()))
    result: Result = cls(**kwargs)
    return result


def pack_result(result: Result) -> bytes:
    """Body of a results-stream entry (``seq`` is stored beside it by the commit script)."""
    body = result_to_dict(result)
    body.pop("seq", None)
    return msgpack.packb(body, use_bin_type=True)


def unpack_result(fields: dict[bytes, bytes]) -> Result:
    """Decode one results-stream entry (fields ``m`` and ``seq``)."""
    body = msgpack.unpackb(fields[b"m"], raw=False)
    body["seq"] = int(fields[b"seq"])
    return result_from_dict(body)


# --------------------------------------------------------------------------- server → client


@dataclasses.dataclass(frozen=True)
class SessionStarted:
    """First message on a socket."""

    TYPE: ClassVar[str] = "session"
    session_id: str
    model: str
    sample_rate: int
    encoding: str
    channels: int
    language: str
    interim_results: bool
    resumed: bool = False
    #: 16 kHz samples of audio the server has stored for this session: a resumed client sends
    #: its audio again from there (what a dropped socket or a dead gateway lost)
    stored_samples: int = 0
    #: True when each of ``channels`` is transcribed apart (``multichannel=true``)
    multichannel: bool | None = None


@dataclasses.dataclass(frozen=True)
class ReplayStarted:
    """First message on a replay socket: the new session that re-transcribes ``replay_of``."""

    TYPE: ClassVar[str] = "session"
    session_id: str
    replay_of: str
    model: str
    language: str
    interim_results: bool
    speed: str  # "realtime" or "max"
    duration: float  # seconds of audio being replayed
    sample_rate: int = 16000
    encoding: str = "pcm_s16le"
    channels: int = 1


@dataclasses.dataclass(frozen=True)
class ViewerStarted:
    """First message on a viewer socket: which session it follows and from where."""

    TYPE: ClassVar[str] = "session"
    session_id: str
    state: str  # "active" or "closed" when the viewer attached
    model: str
    language: str
    after: int
    partials: bool
    original_timing: bool
    replay_of: str | None = None
    viewer: bool = True


@dataclasses.dataclass(frozen=True)
class ErrorMessage:
    TYPE: ClassVar[str] = "error"
    code: str
    message: str


ServerMessage = Result | SessionStarted | ReplayStarted | ViewerStarted | ErrorMessage


def to_json(message: ServerMessage) -> str:
    out: dict[str, Any] = {"type": message.TYPE}
    out.update(dataclasses.asdict(message))
    return json.dumps(_drop_unset(out), separators=(",", ":"), ensure_ascii=False)


# --------------------------------------------------------------------------- client → server

ControlType = Literal["finalize", "close", "keepalive"]
CONTROL_TYPES: tuple[str, ...] = ("finalize", "close", "keepalive")


@dataclasses.dataclass(frozen=True)
class Control:
    type: ControlType


def parse_control(text: str, max_bytes: int = 0) -> Control:
    """Parse a client text message that is a JSON control object; ``max_bytes`` (0: no
    bound) is the largest one accepted (MessageTooBig beyond, before any parsing)."""
    if max_bytes > 0 and len(text) > max_bytes // 4 and (
            len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))
    ) > max_bytes:
        raise MessageTooBig(f"control messages may be at most {max_bytes} bytes")
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):
        raise InvalidMessage("text message is not valid JSON") from None
    if not isinstance(obj, dict):
        raise InvalidMessage("control message must be a JSON object")
    kind = obj.get("type")
    if kind not in CONTROL_TYPES:
        raise InvalidMessage(f"unknown message type; expected one of {', '.join(CONTROL_TYPES)}")
    return Control(kind)


# --------------------------------------------------------------------------- audio stream entries


@dataclasses.dataclass(frozen=True)
class AudioFrame:
    """Normalised audio: 16 kHz int16 little-endian, mono, or ``channels`` interleaved for a
    ``multichannel`` session; ``offset`` is its first sample (per channel: a position on the
    session's timeline)."""

    seq: int
    offset: int
    pcm: bytes
    channels: int = 1

    @property
    def samples(self) -> int:
        """Samples per channel (the frame's length on the timeline)."""
        return len(self.pcm) // (2 * self.channels)


@dataclasses.dataclass(frozen=True)
class AudioMarker:
    """In-band control: ``finalize`` ends the utterance, ``close`` ends the stream.

    ``offset`` is the number of samples sent before it.
    """

    kind: Literal["finalize", "close"]
    seq: int
    offset: int


AudioEntry = AudioFrame | AudioMarker


def pack_audio_entry(entry: AudioEntry) -> dict[str, bytes]:
    if isinstance(entry, AudioFrame):
        body = {"k": "audio", "seq": entry.seq, "off": entry.offset, "pcm": entry.pcm}
        if entry.channels != 1:
            body["ch"] = entry.channels
    else:
        body = {"k": entry.kind, "seq": entry.seq, "off": entry.offset}
    return {"m": msgpack.packb(body, use_bin_type=True)}


def unpack_audio_entry(fields: dict[bytes, bytes]) -> AudioEntry:
    body = msgpack.unpackb(fields[b"m"], raw=False)
    kind = body["k"]
    if kind == "audio":
        return AudioFrame(int(body["seq"]), int(body["off"]), bytes(body["pcm"]),
                          int(body.get("ch", 1)))
    if kind in ("finalize", "close"):
        return AudioMarker(kind, int(body["seq"]), int(body["off"]))
    raise ValueError(f"unknown audio entry kind {kind!r}")
