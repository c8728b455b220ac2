"""``GET /v1/sessions/{id}/replay``: re-transcribe a recorded session as a new, linked session.

The recorded audio entries are copied (renumbered) into a new session's
audio stream, at real-time pace or all at once, followed by a close marker;
the new session (meta ``replay_of`` = the original) is queued for the
transcribers like any other, optionally with another model or language.
The socket gets a ``session`` message, the new session's results, ``closed``
and a close 1000, exactly like ``/v1/listen``.

If the client goes away (or sends ``{"type": "close"}``) the copy stops and
the new session is closed at what was copied so far: its results stay
stored and viewable like any session's.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping

import redis.asyncio as aioredis

from common import errors
from common.audio import TARGET_RATE
from common.auth import ANONYMOUS, Principal
from common.backoff import until_up
from common.errors import (
    BadRequest,
    Overloaded,
    QuotaExceeded,
    SessionActive,
    StorageUnavailable,
    SttError,
)
from common.messages import AudioEntry, AudioFrame, AudioMarker, Closed, ReplayStarted, to_json
from common.ratelimit import MessageLimits
from common.redis_client import REDIS_DOWN
from common.sessions import Sessions, audio_end
from common.settings import GatewaySettings
from common.streams import follow_results
from common.tasks import stop_tasks
from common.tenants import AudioQuota, Quotas, seconds_to_midnight, tenant_quotas
from common.web import (
    Socket,
    SocketClosed,
    bias_params,
    bool_param,
    language_param,
    one,
    read_controls,
    send_error,
)

log = logging.getLogger(__name__)

SPEEDS = ("realtime", "max")
#: Audio entries per append when copying as fast as possible.
APPEND_BATCH = 128
#: How long Redis may be unreachable before a replay gives up, seconds.
OUTAGE_S = 30.0


def model_name_ok(name: str) -> bool:
    """A model name a replay may ask for: never a path (the transcriber loads a directory
    given as a model), so no separator, no drive, no leading dot or tilde."""
    return (0 < len(name) <= 200 and name.isprintable() and "/" not in name
            and "\\" not in name and name[:1] not in (".", "~") and ":" not in name)


def model_names(config: str) -> set[str]:
    """The names in a comma-separated allowlist (``REPLAY_MODELS``); entries that are not
    model names (paths) are left out."""
    return {m.strip() for m in config.split(",") if model_name_ok(m.strip())}


@dataclasses.dataclass(frozen=True)
class ReplayParams:
    speed: str = "max"
    model: str | None = None  # None: the original session's
    language: str | None = None
    interim_results: bool | None = None
    #: ``keyterm=``/``prompt=`` for the re-transcription; None: the original session's
    keyterms: tuple[str, ...] | None = None
    prompt: str | None = None
    diarize: bool | None = None  # None: as the original session asked

    @classmethod
    def parse(cls, query: Mapping[str, list[str]],
              allowed_models: str | None = None) -> ReplayParams:
        """``allowed_models``: the comma-separated names ``?model=`` may pick (none when
        empty); None accepts any model name. A path is refused either way."""
        speed = one(query, "speed") or "max"
        if speed not in SPEEDS:
            raise BadRequest("speed must be realtime or max")
        model = one(query, "model") or None
        if model is not None:
            if not model_name_ok(model):
                raise BadRequest("model must be a model name, not a path")
            if allowed_models is not None:
                allowed = model_names(allowed_models)
                if model not in allowed:
                    raise BadRequest(f"model must be one of {', '.join(sorted(allowed))}"
                                     if allowed else "this server replays with the "
                                     "session's own model only")
        language = language_param(query)
        interim = None
        if one(query, "interim_results"):
            interim = bool_param(query, "interim_results", True)
        terms, prompt = bias_params(query)
        diarize = bool_param(query, "diarize", False) if one(query, "diarize") else None
        return cls(speed, model, language, interim,
                   terms if "keyterm" in query else None,
                   prompt if "prompt" in query else None, diarize)


@dataclasses.dataclass(frozen=True)
class ReplayConfig:
    """The gateway settings a replay needs."""

    max_backlog: int
    heartbeat_s: float
    block_ms: int
    #: The model names a replay's ``?model=`` may pick (comma-separated); None: any name.
    allowed_models: str | None = None
    #: tenants' quotas where a tenant has none of its own: a replay's audio counts in the
    #: audio its tenant may have transcribed a day
    quotas: Quotas = dataclasses.field(default_factory=Quotas)

    @classmethod
    def for_gateway(cls, settings: GatewaySettings) -> ReplayConfig:
        return cls(max_backlog=settings.max_backlog, heartbeat_s=settings.heartbeat_s,
                   block_ms=settings.redis_block_ms,
                   allowed_models=replay_allowlist(settings),
                   quotas=Quotas(settings.tenant_max_sessions,
                                 settings.tenant_audio_hours_per_day))


def replay_allowlist(settings: GatewaySettings) -> str:
    """The model names a replay may ask for: ``REPLAY_MODELS``, or the deployment's own
    model when it names none. Entries that are paths never count."""
    configured = {m.strip() for m in settings.replay_models.split(",") if m.strip()}
    names = sorted(model_names(settings.replay_models))
    if len(names) < len(configured):
        log.warning("REPLAY_MODELS: ignoring entries that are not model names (paths are "
                    "never allowed)")
    if not names and model_name_ok(settings.model_name):
        names = [settings.model_name]
    return ",".join(names)  # empty: replays only with the recorded session's model


class Replay:
    """One replay socket."""

    def __init__(self, records: Sessions, blocking: aioredis.Redis, config: ReplayConfig,
                 ws: Socket, original: str, params: ReplayParams,
                 principal: Principal = ANONYMOUS, inbound: MessageLimits | None = None,
                 on_started: Callable[[str], Awaitable[None]] | None = None) -> None:
        """``on_started``: called with the new session's id once it exists (the audit
        trail)."""
        self.records = records
        self.on_started = on_started
        self.blocking = blocking
        self.config = config
        self.ws = ws
        self.original = original
        self.params = params
        self.principal = principal  # owns the new session
        self.inbound = inbound
        self.sid = uuid.uuid4().hex
        self.stop = asyncio.Event()

    async def run(self) -> None:
        try:
            started = await self._create()
        except (SttError, *REDIS_DOWN) as exc:
            await send_error(self.ws, exc)
            return
        log.info("session %s: replay of %s (%s, model %r)", self.sid, self.original,
                 self.params.speed, started.model)
        if self.on_started is not None:
            await self.on_started(self.sid)
        copy = asyncio.create_task(self._copy(), name=f"replay-copy-{self.sid}")
        deliver = asyncio.create_task(self._deliver(), name=f"replay-deliver-{self.sid}")
        incoming = asyncio.create_task(read_controls(self.ws, self.stop, self.inbound))
        failure: BaseException | None = None
        try:
            with contextlib.suppress(SocketClosed):
                await self.ws.send(to_json(started))
            waiting: set[asyncio.Task[None]] = {copy, deliver, incoming}
            while deliver in waiting and incoming in waiting:
                done, waiting = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                if copy in done and copy.exception() is not None:
                    failure = copy.exception()
                    break
        finally:
            # Whatever ended it (closed delivered, client gone, copy failed): stop copying;
            # the copy then closes the new session at what it has copied.
            self.stop.set()
            await stop_tasks(deliver, incoming)
            await asyncio.gather(copy, return_exceptions=True)
        if failure is not None:
            if not isinstance(failure, SttError):
                log.error("session %s: replay copy failed", self.sid, exc_info=failure)
            await send_error(self.ws, failure)
        elif deliver.done() and not deliver.cancelled() and deliver.exception() is None:
            with contextlib.suppress(SocketClosed):
                await self.ws.close(errors.NORMAL, "closed")

    async def _create(self) -> ReplayStarted:
        meta = await self.records.meta(self.original)
        if not meta.closed:
            raise SessionActive("the session is still being recorded; replay it once it has "
                                "closed")
        p = self.params
        model = p.model if p.model is not None else meta.model
        if await self.records.backlog(model) >= self.config.max_backlog:  # its model's queue
            raise Overloaded("all transcribers are busy; try again later")
        language = p.language if p.language is not None else meta.language
        interim = p.interim_results if p.interim_results is not None else meta.interim
        info = await self.records.info(self.original)
        await self._take_quota(await self.records.audio_samples(self.original))
        await self.records.create_replay(self.sid, self.original, {
            "encoding": "pcm_s16le", "sample_rate": TARGET_RATE,
            # a multichannel session's replay transcribes the same channels apart
            "channels": meta.channels if meta.multichannel else 1,
            "multichannel": "1" if meta.multichannel else "0",
            "language": language, "interim": "1" if interim else "0", "model": model,
            "keyterms": meta.keyterms if p.keyterms is None else json.dumps(list(p.keyterms)),
            "user_prompt": meta.user_prompt if p.prompt is None else p.prompt,
            "diarize": "1" if (meta.diarize if p.diarize is None else p.diarize) else "0",
            "replay_speed": p.speed,
            "principal": self.principal.owner, "account": self.principal.account,
            "tenant": self.principal.tenant,
        })
        return ReplayStarted(session_id=self.sid, replay_of=self.original, model=model,
                             language=language or "en", interim_results=interim,
                             speed=p.speed, duration=info.duration,
                             channels=meta.channels if meta.multichannel else 1)

    async def _take_quota(self, samples: int) -> None:
        """A replay takes the recording's whole length from its tenant's audio for the day
        at once: QuotaExceeded (nothing replayed) when it does not fit."""
        redis = self.records.redis
        quotas = await tenant_quotas(redis, self.principal.tenant, self.config.quotas)
        if quotas.audio_hours_per_day <= 0 or samples <= 0:
            return
        quota = AudioQuota(redis, self.principal.tenant,
                           round(quotas.audio_hours_per_day * 3600 * TARGET_RATE), samples)
        if not await quota.take(samples):
            await quota.give_back()
            raise QuotaExceeded("this recording does not fit in this tenant's audio for the "
                                "day", seconds_to_midnight(time.time()))

    async def _deliver(self) -> None:
        async for _id, result in follow_results(
                self.blocking, self.sid, "0-0", self.config.block_ms):
            await self.ws.send(to_json(result))
            if isinstance(result, Closed):
                return

    async def _copy(self) -> None:
        """Copy the recorded audio into the new session, then its close marker."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        last_beat = time.monotonic()
        realtime = self.params.speed == "realtime"
        seq = 0
        end = 0
        batch: list[AudioEntry] = []
        async for entry in self.records.audio(self.original):
            if self.stop.is_set():
                break
            if isinstance(entry, AudioMarker) and entry.kind == "close":
                continue  # the replay writes its own at the end
            if realtime and isinstance(entry, AudioFrame):
                # A live client sends a frame once its last sample was recorded.
                delay = started + audio_end(entry) / TARGET_RATE - loop.time()
                if delay > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.stop.wait(), delay)
                    if self.stop.is_set():
                        break
                if time.monotonic() - last_beat >= self.config.heartbeat_s:
                    await self.records.heartbeat(self.sid)
                    last_beat = time.monotonic()
            seq += 1
            batch.append(dataclasses.replace(entry, seq=seq))
            end = audio_end(entry)
            if realtime or len(batch) >= APPEND_BATCH:
                if not await self._append(batch):
                    return
                batch.clear()
        batch.append(AudioMarker("close", seq + 1, end))
        await self._append(batch)

    async def _append(self, entries: list[AudioEntry]) -> bool:
        """Append with retries through a Redis outage; False if a client took the session."""
        if not entries:
            return True
        try:
            ok = await until_up(lambda: self.records.append(self.sid, 1, entries),
                                f"session {self.sid}: replay append", deadline_s=OUTAGE_S)
        except REDIS_DOWN as exc:
            raise StorageUnavailable("storage unavailable; replay stopped") from exc
        if not ok:
            log.warning("session %s: a client attached to the replay; stopping the copy",
                        self.sid)
        return ok
