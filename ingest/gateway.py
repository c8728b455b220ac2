"""The WebSocket gateway: /v1/listen sessions, result delivery to the socket, the page.

Per connection: validate the query, create the session in Redis, announce it
on the work queue, then two tasks run side by side: the receive loop
normalises audio and appends it to the session's audio stream, and the
delivery task follows the results stream back to the socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import logging
import mimetypes
import time
import uuid
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, urlsplit

import redis.asyncio as aioredis
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from common import errors, keys
from common.audio import TARGET_RATE, AudioNormalizer, StreamFormat, parse_stream_format
from common.errors import BadRequest, MessageTooBig, SttError
from common.messages import (
    AudioEntry,
    AudioFrame,
    AudioMarker,
    Closed,
    ErrorMessage,
    SessionStarted,
    pack_audio_entry,
    parse_control,
    to_json,
)
from common.redis_client import make_redis
from common.settings import GatewaySettings
from fanout.follow import follow_results

log = logging.getLogger(__name__)

LISTEN_PATH = "/v1/listen"


def _bool_param(value: str | None, default: bool) -> bool:
    if value is None:
        return default
    low = value.lower()
    if low in ("true", "1", "yes"):
        return True
    if low in ("false", "0", "no"):
        return False
    raise BadRequest("interim_results must be true or false")


class ListenParams:
    """The validated query string of /v1/listen."""

    def __init__(self, path: str) -> None:
        query = parse_qs(urlsplit(path).query, keep_blank_values=True)

        def one(name: str) -> str | None:
            values = query.get(name)
            return values[-1] if values else None

        self.format: StreamFormat = parse_stream_format(
            one("encoding"), one("sample_rate"), one("channels"))
        language = one("language") or ""
        if len(language) > 8 or not all(c.isalpha() or c == "-" for c in language):
            raise BadRequest("language must be an ISO code or 'auto'")
        self.language = language
        self.interim_results = _bool_param(one("interim_results"), True)


class Gateway:
    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.redis = make_redis(settings)
        self.blocking = make_redis(settings, blocking=True)
        self._server: Server | None = None

    # ------------------------------------------------------------------ HTTP side

    def process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        path = urlsplit(request.path).path
        if path == LISTEN_PATH:
            return None  # upgrade; validation errors go to the client as error messages
        if path == "/healthz":
            return connection.respond(http.HTTPStatus.OK, "ok\n")
        return self._static(connection, path)

    def _static(self, connection: ServerConnection, path: str) -> Response:
        name = "index.html" if path in ("/", "") else path.lstrip("/")
        if "/" in name or name.startswith(".") or not name:
            return connection.respond(http.HTTPStatus.NOT_FOUND, "not found\n")
        try:
            body = resources.files("ingest").joinpath("static", name).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return connection.respond(http.HTTPStatus.NOT_FOUND, "not found\n")
        ctype = mimetypes.guess_type(name)[0] or "application/octet-stream"
        if ctype.startswith("text/") or ctype.endswith("javascript"):
            ctype += "; charset=utf-8"
        headers = Headers([("Content-Type", ctype), ("Content-Length", str(len(body))),
                           ("Cache-Control", "no-cache")])
        return Response(200, "OK", headers, body)

    # ------------------------------------------------------------------ WebSocket side

    async def handler(self, ws: ServerConnection) -> None:
        assert ws.request is not None
        try:
            params = ListenParams(ws.request.path)
        except SttError as exc:
            await _fail(ws, exc)
            return
        await ListenSession(self, ws, params).run()

    async def start(self) -> Server:
        s = self.settings
        self._server = await serve(
            self.handler, s.host, s.port,
            process_request=self.process_request,
            max_size=s.max_message_bytes,
            max_queue=s.max_queue,
            compression=None,
            ping_interval=20,
            ping_timeout=20,
        )
        return self._server

    async def close(self) -> None:
        if self._server is not None:
            self._server.close(close_connections=True)
            await self._server.wait_closed()
        await self.redis.aclose()
        await self.blocking.aclose()


async def _fail(ws: ServerConnection, exc: SttError) -> None:
    """Tell the client what went wrong (no internals), then close with the matching code."""
    with contextlib.suppress(ConnectionClosed):
        await ws.send(to_json(ErrorMessage(exc.code, exc.message)))
        await ws.close(exc.close_code, exc.code)


class ListenSession:
    """One /v1/listen connection."""

    def __init__(self, gateway: Gateway, ws: ServerConnection, params: ListenParams) -> None:
        self.gateway = gateway
        self.settings = gateway.settings
        self.redis: aioredis.Redis = gateway.redis
        self.ws = ws
        self.params = params
        self.sid = uuid.uuid4().hex
        self.normalizer = AudioNormalizer(params.format)
        self.samples_sent = 0
        self.entry_seq = 0
        self._ended = False
        self._max_samples = int(self.settings.max_frame_seconds * TARGET_RATE)

    async def run(self) -> None:
        await self._create()
        await self.ws.send(to_json(SessionStarted(
            session_id=self.sid,
            model=self.settings.model_name,
            sample_rate=self.params.format.sample_rate,
            encoding=self.params.format.encoding,
            channels=self.params.format.channels,
            language=self.params.language or "en",
            interim_results=self.params.interim_results,
        )))
        log.info("session %s: opened (%s %d Hz x%d)", self.sid, self.params.format.encoding,
                 self.params.format.sample_rate, self.params.format.channels)
        delivery = asyncio.create_task(self._deliver(), name=f"deliver-{self.sid}")
        try:
            closing = await self._receive()
            if closing:
                await self._drain(delivery)
        except SttError as exc:
            log.info("session %s: client error %s", self.sid, exc.code)
            await self._end_stream()
            await _fail(self.ws, exc)
        except ConnectionClosed:
            pass
        except Exception:
            log.exception("session %s: internal error", self.sid)
            await _fail(self.ws, SttError("internal error"))
        finally:
            if not self._ended:
                # The client vanished without 'close': end the stream so the session drains.
                with contextlib.suppress(Exception):
                    await self._end_stream()
            delivery.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await delivery
            log.info("session %s: socket done (%d samples)", self.sid, self.samples_sent)

    async def _create(self) -> None:
        fmt = self.params.format
        now = time.time()
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(keys.meta(self.sid), mapping={
            "state": "active",
            "created": f"{now:.3f}",
            "encoding": fmt.encoding,
            "sample_rate": fmt.sample_rate,
            "channels": fmt.channels,
            "language": self.params.language,
            "interim": "1" if self.params.interim_results else "0",
            "model": self.settings.model_name,
            "epoch": 0,
            "seq": 0,
            "commit_sample": 0,
            "next_utterance": 0,
        })
        pipe.xadd(keys.SESSIONS, {"sid": self.sid})
        await pipe.execute()

    async def _append(self, entry: AudioEntry) -> None:
        await self.redis.xadd(keys.audio(self.sid), pack_audio_entry(entry))

    async def _append_samples(self, pcm: Any) -> None:
        if len(pcm) == 0:
            return
        if len(pcm) > self._max_samples:
            raise MessageTooBig(
                f"one message may carry at most {self.settings.max_frame_seconds:g} s of audio")
        self.entry_seq += 1
        await self._append(AudioFrame(self.entry_seq, self.samples_sent, pcm.tobytes()))
        self.samples_sent += len(pcm)

    async def _marker(self, kind: str) -> None:
        self.entry_seq += 1
        await self._append(AudioMarker(kind, self.entry_seq, self.samples_sent))  # type: ignore[arg-type]

    async def _end_stream(self) -> None:
        if self._ended:
            return
        self._ended = True
        await self._append_samples(self.normalizer.flush())
        await self._marker("close")

    async def _receive(self) -> bool:
        """Audio and control messages until 'close' (True) or the socket ends (False)."""
        async for message in self.ws:
            if isinstance(message, bytes):
                await self._append_samples(self.normalizer.feed(message))
                continue
            if message.lstrip().startswith("{"):
                control = parse_control(message)
                if control.type == "finalize":
                    await self._marker("finalize")
                elif control.type == "close":
                    await self._end_stream()
                    return True
                continue
            await self._append_samples(self.normalizer.feed_text(message))
        return False

    async def _drain(self, delivery: asyncio.Task[None]) -> None:
        """After 'close': wait until every final and 'closed' went out, then close 1000."""
        try:
            await asyncio.wait_for(asyncio.shield(delivery), self.settings.close_drain_timeout_s)
        except TimeoutError:
            log.warning("session %s: drain timed out", self.sid)
            await _fail(self.ws, SttError("transcription did not finish in time"))
            return
        await self.ws.close(errors.NORMAL, "closed")

    async def _deliver(self) -> None:
        async for _id, result in follow_results(
                self.gateway.blocking, self.sid, "0-0", self.settings.redis_block_ms):
            await self.ws.send(to_json(result))
            if isinstance(result, Closed):
                return
