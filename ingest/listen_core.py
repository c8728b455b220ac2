"""The decisions of one /v1/listen session, without I/O.

``ListenCore`` is fed what happens (a client message, the time, a result read from the
session's results stream) and answers with what to do: the audio entries to append, the
stream's end, the error that ends the session. It never reads a socket, Redis or the
clock; ``listen.py`` is the asyncio adapter that does. A client protocol dialect (another
wire format for the same sessions) is a different adapter over this core.

Every refusal is an ``SttError`` raised from the event that caused it; the adapter turns
it into the client's ``error`` message and close code (``common/web.py``).
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable
from typing import Any

from common.audio import TARGET_RATE, AudioNormalizer, StreamFormat, parse_stream_format
from common.codecs import CodecLimits, DecoderSlots
from common.errors import BadRequest, MessageTooBig, SttError
from common.messages import (
    AudioEntry,
    AudioFrame,
    AudioMarker,
    Control,
    Final,
    Result,
    SessionStarted,
    parse_control,
)
from common.models import check_model_name
from common.ratelimit import MessageLimits
from common.web import bias_params, bool_param, endpointing_param, language_param, one
from ingest.limits import AudioRate, SessionClock

#: Audio arrival times kept for the time-to-final metric (the newest ones).
ARRIVALS_KEPT = 4096


#: How a client protocol reads a text message: its control (``finalize``, ``close``,
#: ``keepalive``), or None when the text is audio (base64); ``max_bytes`` bounds a control.
ControlReader = Callable[[str, int], "Control | None"]


def native_control(text: str, max_bytes: int) -> Control | None:
    """/v1/listen: a JSON object is a control message; any other text is base64 audio."""
    if text[:1] == "{" or text.lstrip().startswith("{"):
        return parse_control(text, max_bytes)
    return None


def session_id_ok(value: str) -> bool:
    return len(value) == 32 and all(c in "0123456789abcdef" for c in value)


def resume_target(query: dict[str, list[str]]) -> str | None:
    """For admission, before the upgrade: the session a /v1/listen query resumes (None: it
    opens a new one), read as ``ListenParams`` reads it (parsed with blank values kept). A
    malformed id is refused after the upgrade; it is still a resume, never a new session."""
    return one(query, "session")


class ListenParams:
    """The validated query string of /v1/listen."""

    def __init__(self, query: dict[str, list[str]]) -> None:
        self.format: StreamFormat = parse_stream_format(
            one(query, "encoding"), one(query, "sample_rate"), one(query, "channels"),
            bool_param(query, "multichannel", False))
        self.language = language_param(query) or ""
        self.interim_results = bool_param(query, "interim_results", True)
        #: words decoding should expect (``keyterm=``, repeatable) and context (``prompt=``)
        self.keyterms, self.prompt = bias_params(query)
        #: speaker labels on finals and words (``speaker``); a resumed session keeps its own
        self.diarize = bool_param(query, "diarize", False)
        #: ms of silence that end an utterance, ENDPOINTING_OFF, or ENDPOINTING_DEFAULT
        #: (``endpointing=``); a resumed session keeps its own
        self.endpointing = endpointing_param(query)
        model = one(query, "model")
        #: the model asked for (None: the default); a resumed session keeps its own
        self.model = check_model_name(model) if model else None
        self.session = resume_target(query)
        if self.session is not None and not session_id_ok(self.session):
            raise BadRequest("session must be a session id from a 'session' message")
        after = one(query, "after")
        if after is not None and self.session is None:
            raise BadRequest("'after' needs 'session'")
        try:
            self.after = int(after) if after is not None else 0
        except ValueError:
            raise BadRequest("after must be an integer seq") from None
        if self.after < 0:
            raise BadRequest("after must be an integer seq")


@dataclasses.dataclass(frozen=True)
class ListenLimits:
    """What one client may send (see the settings of the same names)."""

    max_frame_seconds: float
    max_audio_speed: float
    audio_burst_s: float
    max_message_bytes: int
    max_messages_per_s: float
    messages_burst: float
    max_control_bytes: int
    max_session_s: float
    client_idle_timeout_s: float
    codec_pending_bytes: int = CodecLimits.max_pending_bytes
    codec_wait_s: float = CodecLimits.wait_s
    codec_undecoded_bytes: int = CodecLimits.max_undecoded_bytes

    @property
    def codec(self) -> CodecLimits:
        return CodecLimits(self.codec_pending_bytes, self.codec_wait_s,
                           self.codec_undecoded_bytes)

    @classmethod
    def from_settings(cls, settings: Any) -> ListenLimits:
        return cls(**{f.name: getattr(settings, f.name) for f in dataclasses.fields(cls)})


@dataclasses.dataclass
class Received:
    """What one client message asks for: ``entries`` to append in order, and whether the
    client ended the stream (``close``)."""

    entries: list[AudioEntry] = dataclasses.field(default_factory=list)
    closed: bool = False
    seconds: float = 0.0  # of audio in ``entries``


class ListenCore:
    """One session's client side: limits, normalisation, entry numbering, the end.

    ``samples_sent`` and ``entry_seq`` continue a resumed session's stream (``resume``);
    every entry is numbered one above the last.
    """

    def __init__(self, params: ListenParams, limits: ListenLimits, now: float,
                 read_control: ControlReader = native_control,
                 decoders: DecoderSlots | None = None) -> None:
        self.params = params
        self.limits = limits
        self.read_control = read_control
        self.normalizer = AudioNormalizer(params.format, limits.codec, decoders)
        self.samples_sent = 0
        self.entry_seq = 0
        self.ended = False  # the close marker is queued
        #: Why the stream's last audio could not be decoded (a compressed stream cut short
        #: or corrupt at its end): the session still ends, and the client gets this error
        #: after its finals instead of a normal close.
        self.end_error: SttError | None = None
        self._max_samples = int(limits.max_frame_seconds * TARGET_RATE)
        #: channels interleaved in the normalised audio (1 unless multichannel)
        self._width = params.format.width
        self._arrivals: collections.deque[tuple[int, float]] = collections.deque(
            maxlen=ARRIVALS_KEPT)
        self.rate = AudioRate(limits.max_audio_speed, limits.audio_burst_s, now)
        self.inbound = MessageLimits(limits.max_message_bytes, limits.max_messages_per_s,
                                     limits.messages_burst, now)
        self.clock = SessionClock(now + limits.max_session_s, limits.client_idle_timeout_s,
                                  now)

    # ------------------------------------------------------------------ opening

    def resume(self, samples: int, entry_seq: int, ended: bool) -> None:
        """Continue the stored stream of a resumed session."""
        self.samples_sent = samples
        self.entry_seq = entry_seq
        self.ended = ended

    def set_deadline(self, deadline: float) -> None:
        """The session must end at ``deadline`` (on the caller's clock)."""
        self.clock.deadline = deadline

    def started(self, sid: str, model: str, resumed: bool) -> SessionStarted:
        fmt = self.params.format
        return SessionStarted(
            session_id=sid, model=model, sample_rate=fmt.sample_rate,
            encoding=fmt.encoding, channels=fmt.channels,
            language=self.params.language or "en",
            interim_results=self.params.interim_results, resumed=resumed,
            stored_samples=self.samples_sent,  # the client resends from here what never arrived
            multichannel=True if fmt.multichannel else None,
        )

    # ------------------------------------------------------------------ audio in

    def receive(self, message: str | bytes, now: float) -> Received:
        """One client message: audio (binary, or base64 text), or a control message."""
        self.inbound.check(message, now)
        self.clock.touch(now)
        before = self.samples_sent
        out = Received()
        if isinstance(message, bytes):
            self._audio(self.normalizer.feed(message), now, out)
        elif (control := self.read_control(message, self.limits.max_control_bytes)) is not None:
            if control.type == "finalize":
                out.entries.append(self._marker("finalize"))
            elif control.type == "close":
                out.entries.extend(self.end(now))
                out.closed = True
        else:
            self._audio(self.normalizer.feed_text(message), now, out)
        out.seconds = (self.samples_sent - before) / TARGET_RATE
        return out

    def end(self, now: float) -> list[AudioEntry]:
        """The stream's last entries (what the normaliser still holds, then ``close``);
        nothing when it has already ended."""
        if self.ended:
            return []
        self.ended = True
        out: list[AudioEntry] = []
        try:
            frame = self._frame(self.normalizer.flush(), now)
        except SttError as exc:  # the stream's end is broken: what came before still counts
            self.end_error = exc
            frame = None
        if frame is not None:
            out.append(frame)
        out.append(self._marker("close"))
        return out

    def close(self) -> None:
        """The connection is done: free the audio decoder (its thread, for containers)."""
        self.normalizer.close()

    def _audio(self, pcm: Any, now: float, out: Received) -> None:
        self._check_size(pcm)
        self.rate.take(len(pcm) / self._width / TARGET_RATE, now)
        frame = self._frame(pcm, now)
        if frame is not None:
            out.entries.append(frame)

    def _check_size(self, pcm: Any) -> None:
        if len(pcm) > self._max_samples * self._width:
            raise MessageTooBig(f"one message may carry at most "
                                f"{self.limits.max_frame_seconds:g} s of audio")

    def _frame(self, pcm: Any, now: float) -> AudioFrame | None:
        if len(pcm) == 0:
            return None
        self._check_size(pcm)
        self.entry_seq += 1
        frame = AudioFrame(self.entry_seq, self.samples_sent, pcm.tobytes(), self._width)
        self.samples_sent += frame.samples
        self._arrivals.append((self.samples_sent, now))
        return frame

    def _marker(self, kind: str) -> AudioMarker:
        self.entry_seq += 1
        return AudioMarker(kind, self.entry_seq, self.samples_sent)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ time

    def wake_at(self) -> float:
        """When ``expired`` must be asked next (the deadline or the idle limit)."""
        return self.clock.wake_at()

    def expired(self, now: float) -> SttError:
        """The limit that ended the session at ``now`` (past ``wake_at``)."""
        return self.clock.expired(now)

    # ------------------------------------------------------------------ results out

    def wants(self, result: Result) -> bool:
        """Whether the client gets ``result`` (a resume skips what it already has)."""
        return result.seq > self.params.after

    def final_delay(self, result: Result, now: float) -> float | None:
        """For a final with words: seconds since the audio of its last word arrived."""
        if not isinstance(result, Final) or not result.text:
            return None
        end = int(result.end * TARGET_RATE)
        for received, at in self._arrivals:
            if received >= end:
                return now - at
        return None
