"""A streaming client for /v1/listen: used by the tests, the benchmarks and the CLI.

It sends audio messages at a chosen pace, records every server message with
its arrival time, and records when each sample was sent, so time-to-final
can be computed as (final received) - (its last word's audio was sent).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import time
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake


@dataclasses.dataclass
class Received:
    at: float  # time.monotonic() on arrival
    message: dict[str, Any]


@dataclasses.dataclass
class StreamResult:
    messages: list[Received]
    started: float  # monotonic time the first audio message was sent
    sent_at: list[tuple[float, float]]  # (audio seconds sent so far, monotonic time)
    close_code: int | None
    close_reason: str
    wall_offset: float = 0.0  # time.time() - time.monotonic(), to compare with server clocks

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [r.message for r in self.messages if r.message.get("type") == kind]

    @property
    def finals(self) -> list[dict[str, Any]]:
        return self.of_type("final")

    @property
    def partials(self) -> list[dict[str, Any]]:
        return self.of_type("partial")

    @property
    def closed_duration(self) -> float | None:
        closed = self.of_type("closed")
        return float(closed[0]["duration"]) if closed else None

    @property
    def text(self) -> str:
        return " ".join(f["text"] for f in self.finals if f["text"]).strip()

    def sent_time(self, audio_seconds: float) -> float:
        """Monotonic time at which the audio up to ``audio_seconds`` had been sent."""
        for seconds, at in self.sent_at:
            if seconds >= audio_seconds:
                return at
        return self.sent_at[-1][1] if self.sent_at else self.started

    def time_to_final(self) -> list[float]:
        """Per final: arrival time minus the time its last word's audio was sent."""
        out = []
        for r in self.messages:
            m = r.message
            if m.get("type") == "final" and m.get("text"):
                out.append(r.at - self.sent_time(float(m["end"])))
        return out

    def first_partial_latency(self) -> float | None:
        """First partial's arrival minus the time the first audio was sent."""
        for r in self.messages:
            if r.message.get("type") == "partial":
                return r.at - self.started
        return None


def listen_url(base: str, **params: Any) -> str:
    query = {k: (str(v).lower() if isinstance(v, bool) else v)
             for k, v in params.items() if v is not None}
    # a list is a repeated parameter (keyterm=a&keyterm=b)
    return f"{base.rstrip('/')}/v1/listen" + \
        (f"?{urlencode(query, doseq=True)}" if query else "")


#: Close codes after which a dropped session is resumed (``reconnects``): the socket was
#: lost, the gateway restarted, or the server asks to try again.
RESUMABLE_CLOSE_CODES = {None, 1001, 1006, 1011, 1012, 1013}


def resume_url(url: str, sid: str, after: int, server: str | None = None) -> str:
    """``url`` resuming session ``sid`` after result ``after``; on ``server`` (another
    gateway's ``ws://host:port``) when given."""
    parts = urlsplit(url)
    if server:
        other = urlsplit(server)
        parts = parts._replace(scheme=other.scheme, netloc=other.netloc)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k not in ("session", "after")]
    query += [("session", sid), ("after", str(after))]
    return urlunsplit(parts._replace(query=urlencode(query)))


def resume_point(url: str, messages: Sequence[tuple[bytes | str, float]],
                 stored_samples: int) -> tuple[int, int]:
    """(message index, byte offset in it) where audio the server has not stored begins.

    ``stored_samples`` counts 16 kHz samples (the ``session`` message of a resumed session);
    raw PCM messages are cut at the sample, other messages are sent again whole."""
    query = dict(parse_qsl(urlsplit(url).query))
    width = {"pcm_s16le": 2, "pcm_f32le": 4}.get(query.get("encoding", "pcm_s16le"))
    frame = (width or 0) * int(query.get("channels", "1"))
    rate = int(query.get("sample_rate", "16000"))
    stored_s = stored_samples / 16000
    at = 0.0
    for i, (payload, seconds) in enumerate(messages):
        if at + seconds > stored_s + 1e-9:
            if frame and isinstance(payload, bytes):
                return i, min(len(payload), round((stored_s - at) * rate) * frame)
            return i, 0
        at += seconds
    return len(messages), 0


async def stream(
    url: str,
    messages: Sequence[tuple[bytes | str, float]],
    *,
    pace: float | None = 1.0,
    close: bool = True,
    on_message: Callable[[dict[str, Any]], None] | None = None,
    read_timeout: float = 300.0,
    headers: dict[str, str] | None = None,
    reconnects: int = 0,
    resume_urls: Sequence[str] = (),
    reconnect_delay_s: float = 0.25,
) -> StreamResult:
    """Send (payload, audio seconds it carries) pairs; ``pace`` 1.0 = real time, None = at once.

    With ``close`` it sends ``{"type": "close"}`` after the audio and reads until the
    server closes the socket. With ``reconnects``, a socket lost before the session closed
    is resumed (``session``/``after``, on ``url``'s server or the next of ``resume_urls``
    (other gateways, ``ws://host:port``) in turn) up to that many times, and the audio is
    sent again from what the server says it has stored (``stored_samples``): nothing a
    gateway lost in its buffer goes missing.
    """
    received: list[Received] = []
    sent_at: list[tuple[float, float]] = []
    run = _Run(messages, pace, on_message, received, sent_at)
    servers: list[str | None] = [None, *resume_urls]
    attempt = 0
    while True:
        target = url if run.sid is None else resume_url(
            url, run.sid, run.last_seq, servers[attempt % len(servers)])
        try:
            code, reason = await run.connection(target, close, read_timeout, headers)
        except (OSError, InvalidHandshake, TimeoutError) as exc:
            if run.sid is None or attempt >= reconnects:
                raise
            code, reason = None, str(exc)
        if run.done or run.sid is None or code not in RESUMABLE_CLOSE_CODES \
                or attempt >= reconnects:
            return StreamResult(received, run.started or time.monotonic(), sent_at, code,
                                reason, time.time() - time.monotonic())
        attempt += 1
        await asyncio.sleep(reconnect_delay_s)


class _Run:
    """One stream's state across the connections that carry it."""

    def __init__(self, messages: Sequence[tuple[bytes | str, float]], pace: float | None,
                 on_message: Callable[[dict[str, Any]], None] | None,
                 received: list[Received], sent_at: list[tuple[float, float]]) -> None:
        self.messages = messages
        self.pace = pace
        self.on_message = on_message
        self.received = received
        self.sent_at = sent_at
        self.sid: str | None = None
        self.last_seq = 0
        self.done = False  # the server sent 'closed'
        self.started: float | None = None
        self.starts = list(itertools.accumulate((s for _, s in messages), initial=0.0))

    async def connection(self, url: str, close: bool, read_timeout: float,
                         headers: dict[str, str] | None) -> tuple[int | None, str]:
        async with connect(url, max_size=None, compression=None,
                           additional_headers=headers or {}) as ws:
            first = asyncio.Event()
            position = (0, 0)

            async def reader() -> None:
                nonlocal position
                try:
                    async for raw in ws:
                        msg = json.loads(raw)
                        self.received.append(Received(time.monotonic(), msg))
                        if msg.get("type") == "session":
                            if self.sid is not None and msg.get("session_id") == self.sid:
                                position = resume_point(url, self.messages,
                                                        int(msg.get("stored_samples") or 0))
                            self.sid = msg.get("session_id")
                            first.set()
                        elif msg.get("type") == "closed":
                            self.done = True
                        if isinstance(msg.get("seq"), int):
                            self.last_seq = max(self.last_seq, msg["seq"])
                        if self.on_message is not None:
                            self.on_message(msg)
                except ConnectionClosed:
                    pass  # an error close: the code is read below
                finally:
                    first.set()

            read_task = asyncio.create_task(reader())
            try:
                try:
                    if self.sid is not None:  # a resume: send from what the server stored
                        await first.wait()
                    await self._send(ws, *position)
                    if close:
                        await ws.send(json.dumps({"type": "close"}))
                except ConnectionClosed:
                    pass  # the server ended the session early; read what it said
                await asyncio.wait_for(read_task, read_timeout)
            except BaseException:
                read_task.cancel()
                raise
            return ws.close_code, ws.close_reason or ""

    async def _send(self, ws: Any, index: int, offset: int) -> None:
        if self.started is None:
            self.started = time.monotonic()
        for i in range(index, len(self.messages)):
            payload, seconds = self.messages[i]
            if i == index and offset and isinstance(payload, bytes):
                payload = payload[offset:]
            if self.pace:
                delay = self.started + self.starts[i] / self.pace - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            await ws.send(payload)
            self.sent_at.append((self.starts[i] + seconds, time.monotonic()))
