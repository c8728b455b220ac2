"""Twilio Media Streams at ``/v1/twilio``: a call's audio, as Twilio's ``<Stream>`` sends it,
transcribed as an ordinary listen session.

Twilio sends JSON text events: ``connected``, ``start`` (``streamSid``, ``callSid``,
``tracks``, ``customParameters``, ``mediaFormat``: μ-law 8 kHz mono), ``media`` (base64
μ-law, one ``track``), ``mark``, ``dtmf``, ``stop``. The gateway reads ``connected`` and
``start`` itself (``read_start``): a ``<Stream>`` URL takes no query string, so the
credential may come in ``customParameters`` (``token``), and admission waits for it. The
session's id is derived from ``streamSid`` (``TwilioStart.session_id``), so the application
that started the stream can find its transcript (``/v1/sessions/{id}``).

Then ``TwilioWire`` unwraps each event into what ``ListenCore`` reads: the inbound track's
``media`` payload is audio (the caller: the outbound track, what the caller hears, is not
transcribed: channels are not transcribed apart yet, and mixed they would blur each other),
``stop`` is ``close``, everything else a keepalive. Twilio takes nothing back from a
transcriber: results go to viewers and the sessions API; an error is a close code.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import time
import uuid
from collections.abc import Mapping
from typing import Any

from common.audio import StreamFormat
from common.errors import (
    BadRequest,
    InvalidAudio,
    InvalidMessage,
    MessageTooBig,
    SttError,
    UnsupportedAudio,
)
from common.messages import Control, Result, SessionStarted
from common.ratelimit import MessageLimits
from common.web import Socket, language_param
from ingest.listen_core import ListenParams, Received, native_control

PATH = "/v1/twilio"
#: Messages a socket may send before ``start`` (Twilio sends one: ``connected``).
MAX_BEFORE_START = 4
#: ``customParameters`` kept (Twilio allows a few; more is not Twilio).
MAX_PARAMETERS = 32
#: Twilio's one media format.
MULAW_8K = ("audio/x-mulaw", 8000, 1)
KEEPALIVE = '{"type":"keepalive"}'
CLOSE = '{"type":"close"}'
#: The namespace of the session ids derived from stream SIDs.
NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "stt:twilio-media-stream")


def session_for(stream_sid: str) -> str:
    """The session id of a Twilio stream (32 hex digits, as every session id)."""
    return uuid.uuid5(NAMESPACE, stream_sid).hex


@dataclasses.dataclass(frozen=True)
class TwilioStart:
    """What Twilio's ``start`` event says about the stream."""

    stream_sid: str
    call_sid: str
    account_sid: str
    tracks: tuple[str, ...]
    custom_parameters: Mapping[str, str]

    @property
    def session_id(self) -> str:
        return session_for(self.stream_sid)

    @property
    def token(self) -> str | None:
        """A credential passed as the ``token`` custom parameter."""
        return self.custom_parameters.get("token") or None


def parse_event(text: str | bytes, max_bytes: int) -> dict[str, Any]:
    """One Twilio message: a JSON object with an ``event``."""
    if isinstance(text, bytes):
        raise InvalidMessage("Twilio sends JSON text messages, not binary ones")
    if max_bytes > 0 and len(text) > max_bytes:
        raise MessageTooBig(f"messages may be at most {max_bytes} bytes")
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):
        raise InvalidMessage("messages must be Twilio's JSON events") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("event"), str):
        raise InvalidMessage("messages must be Twilio's JSON events (with an 'event')")
    return obj


def _text(obj: Mapping[str, Any], name: str, required: bool = True) -> str:
    value = obj.get(name)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or not value or len(value) > 64:
        raise BadRequest(f"start.{name} must be a string of 1-64 characters")
    return value


def parse_start(obj: Mapping[str, Any]) -> TwilioStart:
    start = obj.get("start")
    if not isinstance(start, dict):
        raise BadRequest("a 'start' event carries a 'start' object")
    fmt = start.get("mediaFormat") or {}
    if not isinstance(fmt, dict) or (fmt.get("encoding"), fmt.get("sampleRate"),
                                     fmt.get("channels")) != MULAW_8K:
        raise UnsupportedAudio("mediaFormat must be audio/x-mulaw, 8000 Hz, 1 channel")
    tracks = start.get("tracks", ["inbound"])
    if not isinstance(tracks, list) or not tracks or \
            not all(t in ("inbound", "outbound") for t in tracks):
        raise BadRequest("start.tracks must list 'inbound' and/or 'outbound'")
    params = start.get("customParameters") or {}
    if not isinstance(params, dict) or len(params) > MAX_PARAMETERS or \
            not all(isinstance(k, str) and isinstance(v, str) for k, v in params.items()):
        raise BadRequest("start.customParameters must be an object of strings")
    return TwilioStart(_text(start, "streamSid"), _text(start, "callSid", False),
                       _text(start, "accountSid", False), tuple(tracks), dict(params))


async def read_start(ws: Socket, max_bytes: int) -> TwilioStart:
    """Read Twilio's first events up to ``start`` (the caller bounds the wait)."""
    for _ in range(MAX_BEFORE_START):
        event = parse_event(await ws.recv(), max_bytes)
        if event["event"] == "start":
            return parse_start(event)
        if event["event"] != "connected":
            raise BadRequest("a Twilio stream begins with 'connected' and 'start'")
    raise BadRequest("no 'start' event")


def twilio_params(start: TwilioStart) -> ListenParams:
    """The session's parameters: μ-law 8 kHz mono; ``language`` and ``interim_results``
    may come as custom parameters."""
    query = {name: [start.custom_parameters[name]] for name in ("language", "interim_results")
             if name in start.custom_parameters}
    language_param(query)
    params = ListenParams(query)
    params.format = StreamFormat("mulaw", 8000, 1)
    return params


class TwilioWire:
    """One Twilio stream's events, unwrapped for the listen session."""

    def __init__(self, start: TwilioStart | None, ignored: MessageLimits | None = None
                 ) -> None:
        self.start = start
        #: The outbound track's media is read and dropped: those messages (as many as the
        #: inbound ones) are counted here, apart from the session's own message rate.
        self.ignored = ignored

    def inbound(self, message: str | bytes) -> str | bytes | None:
        event = parse_event(message, 0)  # the socket's message bound applies
        kind = event["event"]
        if kind == "media":
            media = event.get("media")
            if not isinstance(media, dict) or not isinstance(media.get("payload"), str):
                raise InvalidMessage("a 'media' event carries media.payload")
            if media.get("track", "inbound") != "inbound":
                if self.ignored is not None:  # what the caller hears is not transcribed
                    self.ignored.check(message, time.monotonic())
                return None
            try:
                return base64.b64decode(media["payload"], validate=True)
            except (binascii.Error, ValueError):
                raise InvalidAudio("media.payload must be base64 μ-law") from None
        if kind == "stop":
            return CLOSE
        if kind in ("connected", "start", "mark", "dtmf"):
            return KEEPALIVE
        raise InvalidMessage("unknown Twilio event; expected media, mark, dtmf or stop")

    def control(self, text: str, max_bytes: int) -> Control | None:
        return native_control(text, max_bytes)

    def opening(self, started: SessionStarted) -> list[str | bytes]:
        return []

    def received(self, message: str | bytes, received: Received) -> None:
        pass

    def results(self, result: Result) -> list[str | bytes]:
        return []  # Twilio takes no transcripts: viewers and the sessions API do

    def error(self, err: SttError) -> tuple[list[str | bytes], int, str]:
        return [], err.close_code, err.code
