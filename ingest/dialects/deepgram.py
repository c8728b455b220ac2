"""Deepgram's live transcription protocol (``/v1/listen`` of ``api.deepgram.com``), served at
``/deepgram/v1/listen``: a Deepgram SDK whose base URL is ``ws://HOST:PORT/deepgram`` works
unchanged.

The session is an ordinary listen session (``ingest/listen.py``); ``DeepgramWire`` only
spells it Deepgram's way:

* the query string (``deepgram_params``): ``encoding``/``sample_rate``/``channels`` name the
  audio (no ``encoding``: containerised audio, told apart by its first bytes), ``language``,
  ``interim_results`` (default false, as Deepgram's), ``vad_events``, ``utterance_end_ms``,
  ``diarize`` (``speaker`` on each word, as Deepgram's);
  ``keyterm`` (repeatable) leans decoding toward those words as the native ``keyterm=``;
  ``model``, ``endpointing``, ``punctuate``, ``smart_format`` and Deepgram's other options
  are accepted and ignored; ``multichannel=true`` (with an ``encoding`` and
  ``channels``) transcribes each channel apart, its results carrying ``channel_index``
  ``[i, channels]`` as Deepgram's do.
* client text: ``KeepAlive``, ``Finalize`` (ends the utterance now; the stream goes on),
  ``CloseStream`` (finish, then ``Metadata`` and close 1000); ``Configure`` is accepted and
  ignored.
* server messages: a partial is ``Results`` with ``is_final`` false; a final is ``Results``
  with ``is_final`` true, ``from_finalize`` true when a ``Finalize`` ended it and
  ``speech_final`` true when a pause or the stream's end did (the final's ``ended_by``); a
  final cut at the utterance length cap has neither;
  ``SpeechStarted`` before an utterance's first result (``vad_events``); ``UtteranceEnd``
  after a final with words (``utterance_end_ms``); ``Metadata`` at the end.
* errors: an ``Error`` message (``variant`` is the native error code) and the native close
  code; refusals before the upgrade are HTTP errors with Deepgram's ``err_code``/``err_msg``
  body.

``request_id`` is the session id as a UUID (the native id is its 32 hex digits): viewers,
exports and the sessions API find the session by it.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import math
import uuid
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from common.audio import AUTO, StreamFormat, parse_stream_format
from common.errors import InvalidMessage, MessageTooBig, SttError, UnsupportedAudio
from common.messages import (
    Closed,
    Control,
    Final,
    Partial,
    Result,
    SessionStarted,
    Word,
)
from common.web import bool_param, client_error, error_response, int_param, one
from ingest.listen import Wire
from ingest.listen_core import ListenParams, Received

PREFIX = "/deepgram"
LISTEN_PATH = PREFIX + "/v1/listen"

#: Deepgram's ``encoding`` values and the native encodings they are.
ENCODINGS: dict[str, str] = {
    "linear16": "pcm_s16le",
    "mulaw": "mulaw",
    "alaw": "alaw",
    "opus": "opus",
    "ogg-opus": "opus",
    "flac": "flac",
}
#: Deepgram's client messages and the native controls they are (``Configure`` changes
#: nothing here: it is read as a keepalive).
CONTROLS: dict[str, str] = {
    "KeepAlive": "keepalive",
    "Finalize": "finalize",
    "CloseStream": "close",
    "Configure": "keepalive",
}
#: The close reasons Deepgram gives for errors of these kinds (others: the native code).
CLOSE_REASONS = {
    "invalid_audio": "DATA-0000",
    "unsupported_audio": "DATA-0000",
    "idle_timeout": "NET-0001",
}
#: A final of an utterance that began before a ``Finalize`` and whose last word ended less
#: than this before it was ended by that ``Finalize``: a pause (the transcriber's
#: ``min_silence_s``) would have needed more silence than this to end it first. A heuristic:
#: finals do not say what ended them.
FINALIZE_WINDOW_S = 0.5
#: ``Finalize`` positions remembered at once (older ones are forgotten).
FINALIZES_KEPT = 64


@dataclasses.dataclass(frozen=True)
class DeepgramOptions:
    """What the query asked of the Deepgram wire (the rest is in ``ListenParams``)."""

    interim_results: bool = False
    vad_events: bool = False
    utterance_end_ms: int | None = None
    channels: int = 1
    multichannel: bool = False  # each channel transcribed apart: ``channel_index`` [i, N]


def _int(query: Mapping[str, list[str]], name: str, low: int, high: int) -> int | None:
    value = one(query, name)
    if value is None or value == "" or value.lower() == "false":
        return None  # Deepgram's "off"
    return int_param(query, name, 0, low, high)  # present: the default is never used


def deepgram_params(query: Mapping[str, list[str]]) -> tuple[ListenParams, DeepgramOptions]:
    """Deepgram's query string → the session's ``ListenParams`` and the wire's options."""
    multichannel = bool_param(query, "multichannel", False)
    encoding = one(query, "encoding") or None
    if encoding is None and multichannel:
        raise UnsupportedAudio("multichannel=true needs encoding (linear16, mulaw or alaw), "
                               "sample_rate and channels")
    if encoding is None:
        fmt = StreamFormat(AUTO, 16000, 1)  # the container's header says
    elif encoding in ENCODINGS:
        fmt = parse_stream_format(ENCODINGS[encoding], one(query, "sample_rate"),
                                  one(query, "channels"), multichannel)
    else:
        raise UnsupportedAudio(f"encoding must be one of {', '.join(ENCODINGS)}, or absent "
                               "for containerised audio (WAV, Ogg, WebM, FLAC)")
    language = one(query, "language") or ""
    if language.lower() == "multi":
        language = "auto"
    elif language:
        language = language.split("-")[0].lower()  # en-US → en: the model's language
    interim = bool_param(query, "interim_results", False)
    vad_events = bool_param(query, "vad_events", False)
    diarize = bool_param(query, "diarize", False)
    for name in ("punctuate", "smart_format", "numerals", "profanity_filter",
                 "filler_words", "dictation", "mip_opt_out"):
        bool_param(query, name, False)  # accepted (validated), not applied
    utterance_end_ms = _int(query, "utterance_end_ms", 0, 60_000)
    native: dict[str, list[str]] = {
        # partials drive SpeechStarted too; the wire drops them when interim_results is off
        "interim_results": ["true" if interim or vad_events else "false"],
    }
    if language:
        native["language"] = [language]
    if query.get("keyterm"):  # Deepgram's keyterm prompting: the native keyterm=
        native["keyterm"] = list(query["keyterm"])
    if diarize:
        native["diarize"] = ["true"]
    if query.get("endpointing"):  # ms of silence, or false: the native endpointing=
        native["endpointing"] = list(query["endpointing"])[:1]
    params = ListenParams(native)
    params.format = fmt
    return params, DeepgramOptions(interim, vad_events, utterance_end_ms, fmt.channels,
                                   fmt.multichannel)


def http_error(exc: BaseException) -> web.Response:
    """A refusal before the upgrade, in Deepgram's words: the native status and headers,
    ``{"err_code", "err_msg", "request_id"}``."""
    err = client_error(exc)
    response = error_response(err)
    response.body = json.dumps({"err_code": err.code, "err_msg": err.message,
                                "request_id": str(uuid.uuid4())}).encode()
    return response


def _plain(word: str) -> str:
    """Deepgram's ``word``: lower case, no punctuation around it."""
    return word.strip().strip(".,!?;:\"()[]{}…¿¡").lower()


def _round(value: float) -> float:
    return round(value, 3)


def _word(w: Word) -> dict[str, Any]:
    """One word as Deepgram spells it; with ``diarize``, its ``speaker`` (0, 1, ...)."""
    out: dict[str, Any] = {"word": _plain(w.word), "start": _round(w.start),
                           "end": _round(w.end), "confidence": _round(w.probability),
                           "punctuated_word": w.word.strip()}
    if w.speaker is not None:
        out["speaker"] = w.speaker
    return out


class DeepgramWire:
    """One Deepgram-protocol connection's words (see the module's docstring)."""

    def __init__(self, options: DeepgramOptions, model: str) -> None:
        self.options = options
        self.model = model
        self.request_id = ""
        self.created = datetime.datetime.now(datetime.UTC).isoformat(
            timespec="milliseconds").replace("+00:00", "Z")
        self._sha = hashlib.sha256()
        #: seconds of audio before each Finalize, per channel
        self._finalizes: dict[int, list[float]] = {}
        #: the utterance SpeechStarted was sent for, on each channel
        self._speaking: dict[int, int] = {}

    # ------------------------------------------------------------------ client → server

    def inbound(self, message: str | bytes) -> str | bytes | None:
        return message

    def control(self, text: str, max_bytes: int) -> Control | None:
        """Every text message is a JSON control (Deepgram sends audio only as binary)."""
        if max_bytes > 0 and len(text.encode("utf-8", "surrogatepass")) > max_bytes:
            raise MessageTooBig(f"control messages may be at most {max_bytes} bytes")
        try:
            obj = json.loads(text)
        except (ValueError, RecursionError):
            raise InvalidMessage("text messages must be JSON: KeepAlive, Finalize or "
                                 "CloseStream") from None
        kind = obj.get("type") if isinstance(obj, dict) else None
        if not isinstance(kind, str) or kind not in CONTROLS:
            raise InvalidMessage("unknown message type; expected KeepAlive, Finalize or "
                                 "CloseStream")
        return Control(CONTROLS[kind])  # type: ignore[arg-type]

    def received(self, message: str | bytes, received: Received) -> None:
        if isinstance(message, bytes):
            self._sha.update(message)
        for entry in received.entries:
            if getattr(entry, "kind", None) == "finalize":
                for channel in range(self.options.channels if self.options.multichannel
                                     else 1):
                    finalizes = self._finalizes.setdefault(channel, [])
                    finalizes.append(entry.offset / 16000)
                    del finalizes[:-FINALIZES_KEPT]

    # ------------------------------------------------------------------ server → client

    def opening(self, started: SessionStarted) -> list[str | bytes]:
        """Deepgram says nothing when a stream opens."""
        self.request_id = str(uuid.UUID(hex=started.session_id))
        return []

    def results(self, result: Result) -> list[str | bytes]:
        out: list[dict[str, Any]] = []
        if isinstance(result, Partial):
            self._speech_started(result.channel, result.utterance, result.start, out)
            if self.options.interim_results:
                out.append(self._results(result.text, (), result.start, result.end,
                                         is_final=False, channel=result.channel))
        elif isinstance(result, Final):
            if result.text:
                self._speech_started(result.channel, result.utterance, result.start, out)
            inferred = self._from_finalize(result.channel or 0, result.start, result.end)
            if result.ended_by is None:  # a final stored before finals said what ended them
                from_finalize, speech_final = inferred, not inferred
            else:
                from_finalize = result.ended_by == "finalize"
                # the speaker paused, or the stream ended; not a Finalize, not a length cut
                speech_final = result.ended_by in ("pause", "end")
            out.append(self._results(result.text, result.words, result.start, result.end,
                                     is_final=True, speech_final=speech_final,
                                     from_finalize=from_finalize, channel=result.channel))
            if self.options.utterance_end_ms is not None and result.words:
                out.append({"type": "UtteranceEnd", "channel": self._channel(result.channel),
                            "last_word_end": _round(result.words[-1].end)})
        elif isinstance(result, Closed):
            out.append(self._metadata(result.duration))
        # native warnings (queueing, lag) have no Deepgram message
        return [json.dumps(m, separators=(",", ":"), ensure_ascii=False) for m in out]

    def error(self, err: SttError) -> tuple[list[str | bytes], int, str]:
        body = {"type": "Error", "variant": err.code, "description": err.message,
                "message": err.message}
        return [json.dumps(body, ensure_ascii=False)], err.close_code, \
            CLOSE_REASONS.get(err.code, err.code)

    # ------------------------------------------------------------------ pieces

    def _channel(self, channel: int | None = None) -> list[int]:
        """Deepgram's ``channel_index``: [channel, channels] of a multichannel stream;
        channel 0 of 1 otherwise (the mixed stream)."""
        if channel is None or not self.options.multichannel:
            return [0, 1]
        return [channel, self.options.channels]

    def _speech_started(self, channel: int | None, utterance: int, start: float,
                        out: list[dict[str, Any]]) -> None:
        key = channel or 0
        if not self.options.vad_events or self._speaking.get(key) == utterance:
            return
        self._speaking[key] = utterance
        out.append({"type": "SpeechStarted", "channel": self._channel(channel),
                    "timestamp": _round(start)})

    def _from_finalize(self, channel: int, start: float, end: float) -> bool:
        """Whether a ``Finalize`` ended the utterance from ``start`` to ``end`` (its last
        word): it began before the oldest pending Finalize and ended just before it. A final
        of an utterance that began after a Finalize retires it (that Finalize found nothing
        open, or its final has gone by). A Finalize ends every channel's open utterance:
        each channel keeps its own list."""
        finalizes = self._finalizes.get(channel, [])
        while finalizes:
            at = finalizes[0]
            if start >= at - 0.001:
                finalizes.pop(0)
                continue
            if at - end <= FINALIZE_WINDOW_S:
                finalizes.pop(0)
                return True
            return False  # an earlier utterance a pause ended: the Finalize's is to come
        return False

    def _results(self, text: str, words: tuple[Word, ...], start: float, end: float, *,
                 is_final: bool, speech_final: bool = False,
                 from_finalize: bool = False, channel: int | None = None) -> dict[str, Any]:
        confidence = sum(w.probability for w in words) / len(words) if words else \
            (1.0 if text and is_final else 0.0)
        return {
            "type": "Results",
            "channel_index": self._channel(channel),
            "duration": _round(max(0.0, end - start)),
            "start": _round(start),
            "is_final": is_final,
            "speech_final": speech_final,
            "from_finalize": from_finalize,
            "channel": {"alternatives": [{
                "transcript": text.strip(),
                "confidence": _round(confidence),
                "words": [_word(w) for w in words],
            }]},
            "metadata": {"request_id": self.request_id, "model_uuid": self._model_uuid(),
                         "model_info": {"name": self.model, "version": "", "arch": "whisper"}},
        }

    def _metadata(self, duration: float) -> dict[str, Any]:
        model_uuid = self._model_uuid()
        return {
            "type": "Metadata",
            "transaction_key": "deprecated",
            "request_id": self.request_id,
            "sha256": self._sha.hexdigest(),
            "created": self.created,
            "duration": _round(duration) if math.isfinite(duration) else 0.0,
            "channels": self.options.channels,
            "models": [model_uuid],
            "model_info": {model_uuid: {"name": self.model, "version": "", "arch": "whisper"}},
        }

    def _model_uuid(self) -> str:
        return str(uuid.uuid5(uuid.NAMESPACE_URL, "stt-model:" + self.model))


class DeepgramDialect:
    """``/deepgram/v1/listen`` for the gateway: no resume (Deepgram has none)."""

    path = LISTEN_PATH
    resumes = False
    models = False  # Deepgram's model names are not ours: the workers' default transcribes

    def __init__(self, model: str) -> None:
        self.model = model

    def read(self, query: Mapping[str, list[str]]) -> tuple[ListenParams, Wire]:
        params, options = deepgram_params(query)
        return params, DeepgramWire(options, self.model)

    def plain_wire(self) -> Wire:
        """The wire that refuses a query it could not read."""
        return DeepgramWire(DeepgramOptions(), self.model)

    def refused(self, exc: BaseException) -> web.Response:
        return http_error(exc)
