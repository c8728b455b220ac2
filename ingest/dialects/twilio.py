"""Twilio Media Streams at ``/v1/twilio``: a call's audio, as Twilio's ``<Stream>`` sends it,
transcribed as an ordinary listen session.

Twilio sends JSON text events: ``connected``, ``start`` (``streamSid``, ``callSid``,
``tracks``, ``customParameters``, ``mediaFormat``: μ-law 8 kHz mono), ``media`` (base64
μ-law, one ``track``), ``mark``, ``dtmf``, ``stop``. The gateway reads ``connected`` and
``start`` itself (``read_start``): a ``<Stream>`` URL takes no query string, so the
credential may come in ``customParameters`` (``token``), and admission waits for it. The
session's id is derived from ``streamSid`` (``TwilioStart.session_id``), so the application
that started the stream can find its transcript (``/v1/sessions/{id}``).

Then ``TwilioWire`` unwraps each event into what ``ListenCore`` reads: ``media`` payloads are
audio, ``stop`` is ``close``, everything else a keepalive. A stream of one track (Twilio's
default: ``inbound``, the caller) is a mono session of that track. A stream of both tracks
(``<Stream track="both_tracks">``) is a ``multichannel`` session of two channels, inbound 0
and outbound 1 (what the caller hears: the agent), each transcribed apart: ``TrackAligner``
places each track's payloads on the stream's timeline by their ``timestamp``, fills gaps with
silence, and hands on the stereo frames both tracks have reached. Twilio takes nothing back from a
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
#: The channel of each track in a both-tracks stream.
TRACK_CHANNELS = {"inbound": 0, "outbound": 1}
#: Seconds one track may run ahead of the other before the other is taken as silent up to
#: there (Twilio sends both in real time; a track that stops sending is not waited for): the
#: bound of the aligner's buffers.
TRACK_SKEW_S = 2.0
#: The longest gap in one track's timestamps filled with silence; a longer jump is closed up
#: (the track's later audio moves earlier by the excess), so a wild timestamp cannot make
#: hours of silence.
TRACK_GAP_S = 2.0
#: μ-law silence.
MULAW_SILENCE = 0xFF
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

    @property
    def both_tracks(self) -> bool:
        """Both tracks come: each is a channel of a multichannel session."""
        return set(self.tracks) == set(TRACK_CHANNELS)


class TrackAligner:
    """Two tracks' μ-law (8 kHz, one byte a sample) on one timeline, as stereo frames
    (inbound, outbound interleaved) up to where both have arrived. Bounded: a track more
    than ``skew`` samples behind the other is filled with silence up to there (its late
    audio, if it comes, is dropped as a repeat)."""

    def __init__(self, skew: int = int(TRACK_SKEW_S * 8000),
                 gap: int = int(TRACK_GAP_S * 8000)) -> None:
        self.skew = skew
        self.gap = gap
        self.pending = [bytearray(), bytearray()]  # each track's samples from ``emitted``
        self.ends = [0, 0]  # timeline sample after each track's last one
        self.shift = [0, 0]  # samples each track's timestamps were moved back (gaps closed)
        self.emitted = 0

    def add(self, channel: int, payload: bytes, timestamp_ms: int | None) -> bytes:
        """One track's payload at its ``timestamp`` (ms from the stream's start; None: right
        after its last one) → the stereo frames it completes (possibly none)."""
        end = self.ends[channel]
        at = end if timestamp_ms is None else timestamp_ms * 8 - self.shift[channel]
        if at > end + self.gap:  # a jump: close it up to the longest gap filled
            self.shift[channel] += at - end - self.gap
            at = end + self.gap
        if at < end:  # overlaps what the track has (a repeat, or audio already given up on)
            payload = payload[end - at:]
            at = end
        if at > end:
            self._silence(channel, at - end)
        self.pending[channel] += payload
        self.ends[channel] += len(payload)
        lag = 1 - channel if self.ends[channel] > self.ends[1 - channel] else channel
        behind = max(self.ends) - self.skew - self.ends[lag]
        if behind > 0:
            self._silence(lag, behind)
        return self._frames(min(self.ends))

    def flush(self) -> bytes:
        """The stream's end: the shorter track filled with silence, every frame out."""
        longest = max(self.ends)
        for channel in (0, 1):
            self._silence(channel, longest - self.ends[channel])
        return self._frames(longest)

    def _silence(self, channel: int, samples: int) -> None:
        if samples > 0:
            self.pending[channel] += bytes([MULAW_SILENCE]) * samples
            self.ends[channel] += samples

    def _frames(self, upto: int) -> bytes:
        n = upto - self.emitted
        if n <= 0:
            return b""
        out = bytearray(2 * n)
        out[0::2] = self.pending[0][:n]
        out[1::2] = self.pending[1][:n]
        del self.pending[0][:n], self.pending[1][:n]
        self.emitted = upto
        return bytes(out)


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
    """The session's parameters: μ-law 8 kHz, mono, or two channels transcribed apart for a
    both-tracks stream; ``language`` and ``interim_results`` may come as custom
    parameters."""
    query = {name: [start.custom_parameters[name]] for name in ("language", "interim_results")
             if name in start.custom_parameters}
    language_param(query)
    params = ListenParams(query)
    params.format = StreamFormat("mulaw", 8000, 2, multichannel=True) if start.both_tracks \
        else StreamFormat("mulaw", 8000, 1)
    return params


def _timestamp(media: Mapping[str, Any]) -> int | None:
    """A media event's ``timestamp`` (ms, a string of digits in Twilio's events)."""
    value = media.get("timestamp")
    if isinstance(value, int) and not isinstance(value, bool):
        return value if 0 <= value < 1 << 40 else None
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) < 13:
        return int(value)
    return None


class TwilioWire:
    """One Twilio stream's events, unwrapped for the listen session."""

    def __init__(self, start: TwilioStart | None, ignored: MessageLimits | None = None
                 ) -> None:
        self.start = start
        #: Media events that give the session no audio (another track's, in a one-track
        #: stream; one a both-tracks stream holds until the other track reaches it) are
        #: counted here, apart from the session's own message rate.
        self.ignored = ignored
        #: both tracks: aligned into stereo frames
        self.aligner = TrackAligner() if start is not None and start.both_tracks else None
        self.track = start.tracks[0] if start is not None else "inbound"

    def _ignored(self, message: str | bytes) -> None:
        if self.ignored is not None:
            self.ignored.check(message, time.monotonic())

    def inbound(self, message: str | bytes) -> str | bytes | list[str | bytes] | None:
        event = parse_event(message, 0)  # the socket's message bound applies
        kind = event["event"]
        if kind == "media":
            media = event.get("media")
            if not isinstance(media, dict) or not isinstance(media.get("payload"), str):
                raise InvalidMessage("a 'media' event carries media.payload")
            track = media.get("track", "inbound")
            if self.aligner is None and track != self.track:
                self._ignored(message)  # a track the stream did not ask for
                return None
            try:
                payload = base64.b64decode(media["payload"], validate=True)
            except (binascii.Error, ValueError):
                raise InvalidAudio("media.payload must be base64 μ-law") from None
            if self.aligner is None:
                return payload
            if track not in TRACK_CHANNELS:
                raise InvalidMessage("media.track must be 'inbound' or 'outbound'")
            frames = self.aligner.add(TRACK_CHANNELS[track], payload, _timestamp(media))
            if not frames:
                self._ignored(message)
                return None
            return frames
        if kind == "stop":
            tail = self.aligner.flush() if self.aligner is not None else b""
            return [tail, CLOSE] if tail else CLOSE
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
