"""OpenAI's transcription APIs, served so that the official ``openai`` SDK with ``base_url``
``http://HOST:PORT/v1`` works unchanged:

* ``/v1/realtime?intent=transcription``: the Realtime API's transcription sessions
  (WebSocket, JSON events). The gateway answers the upgrade with ``session.created``, then
  reads the client's ``session.update`` events (``read_config``) until its first other
  event: only then is the session created, so the ``language`` asked for is the
  session's. From there it is an ordinary listen session (``ingest/listen.py``) whose
  ``Wire`` is ``RealtimeWire``: ``input_audio_buffer.append`` is base64 audio,
  ``.commit`` the native ``finalize``, and the session's results are spelled as
  ``input_audio_buffer.speech_started``/``speech_stopped``/``committed`` and
  ``conversation.item.input_audio_transcription.delta``/``completed`` events, one item per
  utterance.
* ``POST /v1/audio/transcriptions``: a multipart file upload, decoded (PyAV: WAV, FLAC, Ogg,
  MP3, WebM, M4A...), written into a new session's audio stream at once (as a ``max``-speed
  replay is) and answered, once the session has closed, in the ``response_format`` asked
  for (``json``, ``text``, ``srt``, ``vtt``, ``verbose_json`` with ``words``/``segments``).

Both make ordinary sessions: listed, viewable, exportable by their id (the realtime
``session.id``; the upload's ``X-Session-Id`` response header), counted in the caps and rate
limits of the key in ``Authorization: Bearer``. Errors are OpenAI's shapes: an ``error``
event then the native close code on the socket; ``{"error": {...}}`` with the native
status over HTTP. docs/protocol.md has the details and the deviations.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import itertools
import json
import logging
import math
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
from aiohttp import BodyPartReader, web

from common.audio import TARGET_RATE, StreamFormat
from common.errors import (
    BadRequest,
    IdleTimeout,
    InvalidAudio,
    InvalidMessage,
    MessageTooBig,
    Overloaded,
    QuotaExceeded,
    SttError,
    UnsupportedAudio,
)
from common.messages import (
    AudioEntry,
    AudioFrame,
    AudioMarker,
    Closed,
    Control,
    Final,
    Partial,
    Result,
    SessionStarted,
)
from common.tenants import (
    RECEIVED,
    AudioQuota,
    Quotas,
    Usage,
    seconds_to_midnight,
    tenant_quotas,
)
from common.web import (
    PROMPT_MAX_CHARS,
    Socket,
    SocketClosed,
    client_error,
    error_response,
    language_param,
    one,
)
from fanout.formats import to_srt, to_vtt
from ingest.listen import ListenDeps, ListenSession, send_wire_error
from ingest.listen_core import ListenParams, Received, native_control

log = logging.getLogger(__name__)

REALTIME_PATH = "/v1/realtime"
TRANSCRIPTIONS_PATH = "/v1/audio/transcriptions"
INTENT = "transcription"

#: OpenAI's input audio formats (GA ``type``s, and the beta API's names) and the native
#: encoding and rate each is.
FORMATS: dict[str, tuple[str, int]] = {
    "audio/pcm": ("pcm_s16le", 24000),
    "audio/pcmu": ("mulaw", 8000),
    "audio/pcma": ("alaw", 8000),
}
BETA_FORMATS = {"pcm16": "audio/pcm", "g711_ulaw": "audio/pcmu", "g711_alaw": "audio/pcma"}
TURN_DETECTIONS = ("server_vad", "semantic_vad")
#: Client events a session may send before its first audio (``session.update`` and the
#: beta ``transcription_session.update``); past this it is a bad_request.
MAX_BEFORE_AUDIO = 16
UPDATES = ("session.update", "transcription_session.update")
#: The transcription model named in events when the client names none.
DEFAULT_MODEL = "whisper-1"
#: Text fields of an upload (``model``, ``language``, ...) are at most this long.
MAX_FIELD_BYTES = 4096
#: Parts of an upload's form read at most (the SDK sends a handful).
MAX_PARTS = 64
#: Seconds of audio in each entry an upload is written as.
UPLOAD_FRAME_S = 1.0
#: Entries per append when writing an upload.
UPLOAD_BATCH = 64
RESPONSE_FORMATS = ("json", "text", "srt", "vtt", "verbose_json")
KEEPALIVE = '{"type":"keepalive"}'


def _dumps(body: dict[str, Any]) -> str:
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False)


def error_body(err: SttError, event_id: str | None = None) -> dict[str, Any]:
    """OpenAI's error object for ``err`` (``code`` is the native error code)."""
    return {"type": "invalid_request_error" if err.http_status < 500 else "server_error",
            "code": err.code, "message": err.message, "param": None, "event_id": event_id}


def http_error(exc: BaseException) -> web.Response:
    """A refusal over HTTP in OpenAI's words: the native status and headers,
    ``{"error": {"message", "type", "param", "code"}}``."""
    err = client_error(exc)
    response = error_response(err)
    body = error_body(err)
    del body["event_id"]
    response.body = json.dumps({"error": body}, ensure_ascii=False).encode()
    return response


def check_intent(query: Mapping[str, list[str]]) -> None:
    """The realtime endpoint serves transcription sessions only."""
    intent = one(query, "intent")
    if intent != INTENT:
        raise BadRequest("only transcription sessions are served here: connect with "
                         "?intent=transcription")


# --------------------------------------------------------------------------- session config


@dataclasses.dataclass(frozen=True)
class RealtimeConfig:
    """A transcription session's configuration, as ``session.update`` sets it."""

    format: str = "audio/pcm"
    model: str = DEFAULT_MODEL
    language: str | None = None
    prompt: str = ""
    #: None: manual turns (``input_audio_buffer.commit``); else the ``turn_detection`` object
    turn_detection: dict[str, Any] | None = dataclasses.field(default_factory=lambda: {
        "type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300,
        "silence_duration_ms": 500})
    noise_reduction: dict[str, Any] | None = None
    include: tuple[str, ...] = ()

    @property
    def server_vad(self) -> bool:
        return self.turn_detection is not None

    def stream_format(self) -> StreamFormat:
        encoding, rate = FORMATS[self.format]
        return StreamFormat(encoding, rate, 1)

    def listen_params(self) -> ListenParams:
        """The native session's parameters: partials on (they make the deltas and
        ``speech_started``), the language asked for."""
        query: dict[str, list[str]] = {"interim_results": ["true"]}
        if self.language:
            query["language"] = [self.language]
        if self.prompt:  # the transcription prompt: the native prompt=
            query["prompt"] = [self.prompt[:PROMPT_MAX_CHARS]]
        params = ListenParams(query)
        params.format = self.stream_format()
        return params

    def session(self, sid: str) -> dict[str, Any]:
        """The ``session`` object of ``session.created``/``session.updated``."""
        fmt: dict[str, Any] = {"type": self.format}
        if self.format == "audio/pcm":
            fmt["rate"] = 24000
        return {
            "type": "transcription",
            "object": "realtime.transcription_session",
            "id": sid,
            "audio": {"input": {
                "format": fmt,
                "transcription": {"model": self.model, "language": self.language,
                                  "prompt": self.prompt},
                "turn_detection": self.turn_detection,
                "noise_reduction": self.noise_reduction,
            }},
            "include": list(self.include),
        }


def _object(value: Any, name: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BadRequest(f"{name} must be an object")
    return value


def _format_type(value: Any) -> str:
    if isinstance(value, str):  # the beta API: "pcm16", "g711_ulaw", "g711_alaw"
        name = BETA_FORMATS.get(value, value)
    else:
        fmt = _object(value, "audio.input.format")
        name = fmt.get("type", "audio/pcm")
        rate = fmt.get("rate")
        if name == "audio/pcm" and rate not in (None, 24000):
            raise UnsupportedAudio("audio/pcm is 24000 Hz")
    if name not in FORMATS:
        raise UnsupportedAudio(f"audio format must be one of {', '.join(FORMATS)}")
    return str(name)


def _turn_detection(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    turn = _object(value, "turn_detection")
    if turn.get("type") not in TURN_DETECTIONS:
        raise BadRequest(f"turn_detection.type must be one of {', '.join(TURN_DETECTIONS)}, "
                         "or turn_detection null")
    for name in ("silence_duration_ms", "prefix_padding_ms", "idle_timeout_ms"):
        number = turn.get(name)
        if number is not None and (not isinstance(number, int) or isinstance(number, bool)
                                   or not 0 <= number <= 60_000):
            raise BadRequest(f"turn_detection.{name} must be an integer of 0 to 60000")
    threshold = turn.get("threshold")
    if threshold is not None and (not isinstance(threshold, int | float)
                                  or not 0.0 <= threshold <= 1.0):
        raise BadRequest("turn_detection.threshold must be a number from 0 to 1")
    return dict(turn)


def _text(value: Any, name: str, limit: int = MAX_FIELD_BYTES) -> str:
    if value is None:
        return ""
    if not isinstance(value, str) or len(value) > limit:
        raise BadRequest(f"{name} must be a string of at most {limit} characters")
    return value


def _language(value: Any) -> str | None:
    text = _text(value, "language", 16)
    if not text:
        return None
    language_param({"language": [text]})  # validated as /v1/listen's
    return text.split("-")[0].lower()


def updated(config: RealtimeConfig, event: dict[str, Any]) -> RealtimeConfig:
    """``config`` with a ``session.update`` (GA: ``session.audio.input``) or a beta
    ``transcription_session.update`` (flat ``input_audio_format``...) applied; fields it
    leaves out keep their values. Bad values are ``SttError``."""
    session = _object(event.get("session", {}), "session")
    kind = session.get("type", "transcription")
    if kind != "transcription":
        raise BadRequest("only transcription sessions are served here (session.type "
                         "must be 'transcription')")
    if "audio" in session:  # GA shape
        audio = _object(session["audio"] or {}, "session.audio")
        section = _object(audio.get("input") or {}, "session.audio.input")
        fmt, transcription = section.get("format"), section.get("transcription")
    else:  # beta shape
        section = session
        fmt, transcription = session.get("input_audio_format"), \
            session.get("input_audio_transcription")
    changes: dict[str, Any] = {}
    if fmt is not None:
        changes["format"] = _format_type(fmt)
    if transcription is not None:
        transcription = _object(transcription, "transcription")
        if "model" in transcription:
            changes["model"] = _text(transcription["model"], "transcription.model", 200) \
                or DEFAULT_MODEL
        if "language" in transcription:
            changes["language"] = _language(transcription["language"])
        if "prompt" in transcription:
            changes["prompt"] = _text(transcription["prompt"], "transcription.prompt")
    if "turn_detection" in section:
        changes["turn_detection"] = _turn_detection(section["turn_detection"])
    if "noise_reduction" in section:
        nr = section["noise_reduction"]
        changes["noise_reduction"] = None if nr is None else _object(nr, "noise_reduction")
    if "include" in session:
        include = session["include"] or []
        if not isinstance(include, list) or not all(isinstance(i, str) for i in include):
            raise BadRequest("include must be a list of strings")
        changes["include"] = tuple(include[:8])
    return dataclasses.replace(config, **changes)


def parse_event(message: str | bytes) -> dict[str, Any]:
    """A client event: a JSON object with a string ``type``."""
    if isinstance(message, bytes):
        raise InvalidMessage("send JSON events as text messages")
    try:
        event = json.loads(message)
    except (ValueError, RecursionError):
        raise InvalidMessage("messages must be JSON events") from None
    if not isinstance(event, dict) or not isinstance(event.get("type"), str):
        raise InvalidMessage("an event is a JSON object with a string 'type'")
    return event


def _client_event_id(event: dict[str, Any]) -> str | None:
    """The client's ``event_id``, echoed in an error about its event."""
    value = event.get("event_id")
    return value[:64] if isinstance(value, str) else None


# --------------------------------------------------------------------------- the wire


class RealtimeWire:
    """One realtime transcription connection's words (see the module's docstring).

    Items are utterances: ``item_id`` is derived from the session id and the utterance's
    number. A partial's new stable text is a ``delta`` (deltas never revise: text a partial
    may still change is not sent until it is stable, or the final has it); the final is
    ``speech_stopped`` (server VAD), ``committed``, a last ``delta`` with what the deltas
    lacked, and ``completed``.
    """

    def __init__(self, sid: str, config: RealtimeConfig | None = None) -> None:
        self.sid = sid
        self.config = config or RealtimeConfig()
        self._events = itertools.count(1)
        self._replies: list[str | bytes] = []
        self._audio_started = False
        self._uncommitted = 0  # base64 characters appended since the last commit/clear
        self._open: int | None = None  # the utterance deltas were sent for
        self._sent = ""  # its text sent as deltas so far
        self._previous: str | None = None  # the item committed last

    # ------------------------------------------------------------------ ids

    def event_id(self) -> str:
        return f"event_{self.sid[:12]}{next(self._events):06d}"

    def item_id(self, utterance: int) -> str:
        return f"item_{self.sid[:16]}{utterance:06d}"

    def event(self, kind: str, **fields: Any) -> str:
        return _dumps({"type": kind, "event_id": self.event_id(), **fields})

    def session_event(self, kind: str) -> str:
        return self.event(kind, session=self.config.session(self.sid))

    # ------------------------------------------------------------------ client → server

    def update(self, event: dict[str, Any]) -> list[str | bytes]:
        """A ``session.update``: the new configuration, answered with ``session.updated``.
        Once audio has come, the format and language are the session's (an ``error`` event
        says so; the rest still applies)."""
        config = updated(self.config, event)
        if self._audio_started and (config.format, config.language) != \
                (self.config.format, self.config.language):
            config = dataclasses.replace(config, format=self.config.format,
                                         language=self.config.language)
            self._replies.append(self.event("error", error=error_body(BadRequest(
                "the audio format and language cannot change once audio has been sent"),
                _client_event_id(event))))
        self.config = config
        return [self.session_event("session.updated")]

    def inbound(self, message: str | bytes) -> str | bytes | None:
        """The event as a native message: audio (base64 text), ``finalize``, or a keepalive
        for the events answered here (so every event counts in the session's message rate
        and idle clock)."""
        event = parse_event(message)
        kind = event["type"]
        if kind == "input_audio_buffer.append":
            audio = event.get("audio")
            if not isinstance(audio, str):
                raise InvalidMessage("input_audio_buffer.append needs 'audio' (base64)")
            if not audio:
                return KEEPALIVE
            if audio.lstrip()[:1] == "{":
                raise InvalidAudio("'audio' must be base64")
            self._audio_started = True
            self._uncommitted += len(audio)
            return audio  # the native reads base64 text as audio
        if kind == "input_audio_buffer.commit":
            if self._uncommitted == 0:
                self._replies.append(self.event("error", error={
                    **error_body(BadRequest("the input audio buffer is empty: append audio "
                                            "before committing"), _client_event_id(event)),
                    "code": "input_audio_buffer_commit_empty"}))
                return KEEPALIVE
            self._uncommitted = 0
            return '{"type":"finalize"}'
        if kind == "input_audio_buffer.clear":
            self._uncommitted = 0
            self._replies.append(self.event("input_audio_buffer.cleared"))
            return KEEPALIVE
        if kind in UPDATES:
            self._replies.extend(self.update(event))
            return KEEPALIVE
        self._replies.append(self.event("error", error=error_body(BadRequest(
            f"{kind[:64]!r} is not an event of a transcription session"),
            _client_event_id(event))))
        return KEEPALIVE

    def replies(self) -> list[str | bytes]:
        """What answers the client's last event (``session.updated``, ``cleared``, a
        non-fatal ``error``), taken once."""
        out, self._replies = self._replies, []
        return out

    def control(self, text: str, max_bytes: int) -> Control | None:
        return native_control(text, max_bytes)  # what ``inbound`` made of the event

    def received(self, message: str | bytes, received: Received) -> None:
        pass

    # ------------------------------------------------------------------ server → client

    def opening(self, started: SessionStarted) -> list[str | bytes]:
        """``session.created`` went out before the session was created."""
        self.sid = started.session_id
        return []

    def results(self, result: Result) -> list[str | bytes]:
        out: list[str | bytes] = []
        if isinstance(result, Partial):
            self._start(result.utterance, result.start, out)
            stable = result.stable_text.lstrip()
            if stable.startswith(self._sent) and len(stable) > len(self._sent):
                out.append(self._delta(result.utterance, stable[len(self._sent):]))
                self._sent = stable
        elif isinstance(result, Final):
            text = result.text.strip()
            if not text and self._open != result.utterance:
                return out  # silence that ended no item
            self._start(result.utterance, result.start, out)
            item = self.item_id(result.utterance)
            if self.config.server_vad:
                out.append(self.event("input_audio_buffer.speech_stopped", item_id=item,
                                      audio_end_ms=round(result.end * 1000)))
            out.append(self.event("input_audio_buffer.committed", item_id=item,
                                  previous_item_id=self._previous))
            if text.startswith(self._sent) and len(text) > len(self._sent):
                out.append(self._delta(result.utterance, text[len(self._sent):]))
            out.append(self.event(
                "conversation.item.input_audio_transcription.completed", item_id=item,
                content_index=0, transcript=text,
                usage={"type": "duration", "seconds": round(max(0.0, result.end
                                                                - result.start), 3)}))
            self._previous = item
            self._open, self._sent = None, ""
        # closed (the socket's end), warnings: no OpenAI event
        return out

    def error(self, err: SttError) -> tuple[list[str | bytes], int, str]:
        return [self.event("error", error=error_body(err))], err.close_code, err.code

    def _start(self, utterance: int, start: float, out: list[str | bytes]) -> None:
        if self._open == utterance:
            return
        self._open, self._sent = utterance, ""
        if self.config.server_vad:
            out.append(self.event("input_audio_buffer.speech_started",
                                  item_id=self.item_id(utterance),
                                  audio_start_ms=round(start * 1000)))

    def _delta(self, utterance: int, text: str) -> str:
        return self.event("conversation.item.input_audio_transcription.delta",
                          item_id=self.item_id(utterance), content_index=0, delta=text)


class PrimedSocket(Socket):
    """``ws`` that yields ``pending`` (messages already read) before reading on."""

    __slots__ = ("_pending",)

    def __init__(self, ws: Socket, pending: list[str | bytes]) -> None:
        super().__init__(ws.request, ws.ws)
        self._pending = list(pending)

    async def recv(self) -> str | bytes:
        if self._pending:
            return self._pending.pop(0)
        return await super().recv()


async def read_config(ws: Socket, wire: RealtimeWire, idle_s: float) -> str | bytes:
    """Answer ``session.update`` events until the first other event (returned), each
    within ``idle_s``: the session is created with what they set. At most
    ``MAX_BEFORE_AUDIO`` updates."""
    for _ in range(MAX_BEFORE_AUDIO):
        async with asyncio.timeout(idle_s):
            message = await ws.recv()
        event = parse_event(message)
        if event["type"] not in UPDATES:
            return message
        for reply in wire.update(event):
            await ws.send(reply)
    raise BadRequest(f"at most {MAX_BEFORE_AUDIO} session updates before audio")


async def serve_realtime(ws: Socket, deps: ListenDeps, principal: Any, lease: str | None,
                         sid: str) -> None:
    """One ``/v1/realtime?intent=transcription`` socket, admitted (``lease``: its cap lease,
    counting ``sid``), upgraded: ``session.created``, the configuration, then the session."""
    wire = RealtimeWire(sid)
    try:
        await ws.send(wire.session_event("session.created"))
        first = await read_config(ws, wire, deps.settings.client_idle_timeout_s)
        params = wire.config.listen_params()
    except (SttError, TimeoutError) as exc:
        if lease is not None:
            await deps.guard.release(lease)
        err = exc if isinstance(exc, SttError) else IdleTimeout(
            "no event within client_idle_timeout_s")
        deps.metrics.rejections.labels(err.code).inc()
        await send_wire_error(ws, wire, err)
        return
    except SocketClosed:
        if lease is not None:
            await deps.guard.release(lease)
        return
    session = ListenSession(deps, PrimedSocket(ws, [first]), params, principal, lease, wire,
                            resumable=False)
    try:
        await session.run()
    finally:
        if session.lease is not None:
            deps.guard.forget(session.lease)


# --------------------------------------------------------------------------- file uploads


@dataclasses.dataclass
class Upload:
    """A ``POST /v1/audio/transcriptions`` request's fields."""

    file: bytes = b""
    filename: str = ""
    model: str = ""
    language: str | None = None
    prompt: str = ""
    response_format: str = "json"
    granularities: tuple[str, ...] = ()


async def read_upload(request: web.BaseRequest, max_bytes: int) -> Upload:
    """The multipart form, every part bounded: the file by ``max_bytes`` (413 past it), the
    text fields by ``MAX_FIELD_BYTES``."""
    if not request.content_type.startswith("multipart/form-data"):
        raise BadRequest("send the audio as multipart/form-data with a 'file' part")
    if request.content_length is not None and request.content_length > max_bytes + 65536:
        raise MessageTooBig(f"the file may be at most {max_bytes} bytes")
    upload = Upload()
    granularities: list[str] = []
    seen_file = False
    try:
        reader = await request.multipart()
        parts = 0
        async for part in reader:
            parts += 1
            if parts > MAX_PARTS:
                raise BadRequest(f"the form may have at most {MAX_PARTS} parts")
            if not isinstance(part, BodyPartReader):
                raise BadRequest("nested multipart bodies are not read")
            name = part.name
            limit = max_bytes if name == "file" else MAX_FIELD_BYTES
            chunks: list[bytes] = []
            size = 0
            while chunk := await part.read_chunk(65536):
                size += len(chunk)
                if size > limit:
                    raise MessageTooBig(f"the file may be at most {max_bytes} bytes"
                                        if name == "file" else
                                        f"form field {name!r} is too long")
                chunks.append(chunk)
            data = b"".join(chunks)
            if name == "file":
                seen_file = True
                upload.file = data
                upload.filename = part.filename or ""
                continue
            try:
                value = data.decode()
            except UnicodeDecodeError:
                raise BadRequest(f"form field {name!r} must be UTF-8") from None
            if name == "model":
                upload.model = value
            elif name == "language":
                upload.language = _language(value)
            elif name == "prompt":
                upload.prompt = value
            elif name == "response_format":
                upload.response_format = value
            elif name in ("timestamp_granularities[]", "timestamp_granularities"):
                granularities.append(value)
            elif name == "stream" and value.lower() == "true":
                raise BadRequest("stream=true is not supported: use /v1/realtime for "
                                 "streaming transcription")
            # temperature, include[], chunking_strategy, known_speaker_*: accepted, ignored
    except (ValueError, AssertionError) as exc:  # aiohttp's multipart parser
        raise BadRequest(f"malformed multipart body ({exc.__class__.__name__})") from None
    if not seen_file or not upload.file:
        raise BadRequest("the form needs a non-empty 'file' part")
    if upload.response_format not in RESPONSE_FORMATS:
        raise BadRequest(f"response_format must be one of {', '.join(RESPONSE_FORMATS)}")
    bad = [g for g in granularities if g not in ("word", "segment")]
    if bad:
        raise BadRequest("timestamp_granularities[] must be word or segment")
    upload.granularities = tuple(granularities)
    return upload


def decode_file(data: bytes, max_seconds: float) -> np.ndarray:
    """An uploaded file's audio as 16 kHz mono int16 (any container and codec libav reads);
    at most ``max_seconds`` of it (more is a bad_request)."""
    import av  # PyAV: the gateway's compressed-audio decoder already

    limit = int(max_seconds * TARGET_RATE)
    out: list[np.ndarray] = []
    total = 0
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.audio:
                raise InvalidAudio("the file has no audio stream")
            resampler = av.AudioResampler(format="s16", layout="mono", rate=TARGET_RATE)
            for frame in itertools.chain(container.decode(container.streams.audio[0]), [None]):
                for chunk in resampler.resample(frame):
                    pcm = chunk.to_ndarray().reshape(-1).astype(np.int16, copy=False)
                    total += len(pcm)
                    if total > limit:
                        raise BadRequest(f"the audio may be at most {max_seconds:g} s long")
                    out.append(pcm)
    except av.FFmpegError as exc:
        raise InvalidAudio(f"the file could not be decoded ({exc.__class__.__name__})") \
            from None
    if not out:
        raise InvalidAudio("the file holds no audio samples")
    return np.concatenate(out)


def upload_entries(pcm: np.ndarray) -> list[AudioEntry]:
    """The session's audio stream: ``UPLOAD_FRAME_S`` frames, then its close marker."""
    step = int(UPLOAD_FRAME_S * TARGET_RATE)
    entries: list[AudioEntry] = [AudioFrame(i // step + 1, i, pcm[i:i + step].tobytes())
                                 for i in range(0, len(pcm), step)]
    entries.append(AudioMarker("close", len(entries) + 1, len(pcm)))
    return entries


async def take_upload_quota(deps: ListenDeps, tenant: str, samples: int) -> None:
    """An upload takes its whole length from its tenant's audio for the day at once
    (QuotaExceeded, 429, when that does not fit: nothing is transcribed)."""
    s = deps.settings
    quotas = await tenant_quotas(deps.store.redis, tenant, Quotas(
        s.tenant_max_sessions, s.tenant_audio_hours_per_day))
    if quotas.audio_hours_per_day <= 0:
        return
    quota = AudioQuota(deps.store.redis, tenant,
                       round(quotas.audio_hours_per_day * 3600 * TARGET_RATE), samples)
    if not await quota.take(samples):
        await quota.give_back()  # what it could take of a file that does not fit
        raise QuotaExceeded("this upload does not fit in this tenant's audio for the day",
                            seconds_to_midnight(time.time()))


async def transcribe_upload(deps: ListenDeps, upload: Upload, principal: Any, sid: str,
                            address: str) -> tuple[list[Final], float]:
    """Decode ``upload``, write it as session ``sid``'s whole audio stream, and wait for the
    session's finals (its ``closed``)."""
    from common.streams import follow_results

    s = deps.settings
    longest = s.max_session_s if principal.max_session_s is None \
        else min(s.max_session_s, principal.max_session_s)
    pcm = await asyncio.to_thread(decode_file, upload.file, min(longest, s.upload_max_s))
    duration = len(pcm) / TARGET_RATE
    if await deps.store.backlog(s.model_name) >= s.max_backlog:
        raise Overloaded("all transcribers are busy; try again later")
    await take_upload_quota(deps, principal.tenant, len(pcm))
    await deps.store.create(sid, {
        "encoding": "pcm_s16le", "sample_rate": TARGET_RATE, "channels": 1,
        "language": upload.language or "", "interim": "0", "model": s.model_name,
        "user_prompt": upload.prompt[:PROMPT_MAX_CHARS],
        "principal": principal.owner, "account": principal.account, "address": address,
        "tenant": principal.tenant,
        "deadline": f"{time.time() + longest:.3f}",
    })
    entries = upload_entries(pcm)
    for i in range(0, len(entries), UPLOAD_BATCH):
        await deps.store.append(sid, 1, entries[i:i + UPLOAD_BATCH])
    deps.metrics.audio_seconds.inc(duration)
    added = await Usage(deps.store.redis, s.usage_retention_days).report(
        principal.tenant, sid, RECEIVED, s.model_name, len(pcm))
    if added:
        deps.metrics.usage_seconds.labels(principal.tenant, s.model_name, RECEIVED).inc(
            added / TARGET_RATE)
    finals: list[Final] = []
    async with asyncio.timeout(s.close_drain_timeout_s + duration):
        async for _id, result in follow_results(deps.blocking, sid, "0-0",
                                                s.results_block_ms):
            if isinstance(result, Final):
                finals.append(result)
            elif isinstance(result, Closed):
                break
    return finals, duration


def _spoken(finals: list[Final]) -> list[Final]:
    return [f for f in finals if f.text.strip()]


def _text_of(finals: list[Final]) -> str:
    return " ".join(f.text.strip() for f in _spoken(finals))


def _avg_logprob(final: Final) -> float:
    if not final.words:
        return 0.0
    return round(sum(math.log(max(w.probability, 1e-6)) for w in final.words)
                 / len(final.words), 4)


def transcription_response(upload: Upload, finals: list[Final], duration: float,
                           sid: str) -> web.Response:
    """The answer in ``upload.response_format``."""
    fmt = upload.response_format
    headers = {"X-Session-Id": sid, "Cache-Control": "no-store"}
    usage = {"type": "duration", "seconds": math.ceil(duration)}
    text = _text_of(finals)
    if fmt == "text":
        return web.Response(text=text + "\n", content_type="text/plain", headers=headers)
    if fmt == "srt":
        return web.Response(text=to_srt(finals), content_type="text/plain", headers=headers)
    if fmt == "vtt":
        return web.Response(text=to_vtt(finals), content_type="text/vtt", headers=headers)
    body: dict[str, Any]
    if fmt == "json":
        body = {"text": text, "usage": usage}
    else:
        body = {"task": "transcribe", "language": upload.language or "en",
                "duration": round(duration, 3), "text": text, "usage": usage}
        if "word" in upload.granularities:
            body["words"] = [{"word": w.word.strip(), "start": round(w.start, 3),
                              "end": round(w.end, 3)}
                             for f in _spoken(finals) for w in f.words if w.word.strip()]
        if "segment" in upload.granularities or not upload.granularities:
            body["segments"] = [
                {"id": i, "seek": 0, "start": round(f.start, 3), "end": round(f.end, 3),
                 "text": f.text.strip(), "tokens": [], "temperature": 0.0,
                 "avg_logprob": _avg_logprob(f), "compression_ratio": 1.0,
                 "no_speech_prob": 0.0}
                for i, f in enumerate(_spoken(finals))]
    return web.Response(text=_dumps(body), content_type="application/json", headers=headers)


class RealtimeDialect:
    """``/v1/realtime`` for the gateway's admission (``Gateway._admit_listen``): no resume
    (OpenAI has none), and its model names are not ours (the workers' default
    transcribes)."""

    path = REALTIME_PATH
    resumes = False
    models = False

    def read(self, query: Mapping[str, list[str]]) -> tuple[ListenParams, RealtimeWire]:
        check_intent(query)
        config = RealtimeConfig()
        return config.listen_params(), RealtimeWire("", config)

    def plain_wire(self) -> RealtimeWire:
        return RealtimeWire("")

    def refused(self, exc: BaseException) -> web.Response:
        return http_error(exc)
