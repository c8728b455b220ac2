"""A streaming client for /v1/listen: used by the tests, the benchmarks and the CLI.

It sends audio messages at a chosen pace, records every server message with
its arrival time, and records when each sample was sent, so time-to-final
can be computed as (final received) - (its last word's audio was sent).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlencode

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed


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
    return f"{base.rstrip('/')}/v1/listen" + (f"?{urlencode(query)}" if query else "")


async def stream(
    url: str,
    messages: Sequence[tuple[bytes | str, float]],
    *,
    pace: float | None = 1.0,
    close: bool = True,
    on_message: Callable[[dict[str, Any]], None] | None = None,
    read_timeout: float = 300.0,
    headers: dict[str, str] | None = None,
) -> StreamResult:
    """Send (payload, audio seconds it carries) pairs; ``pace`` 1.0 = real time, None = at once.

    With ``close`` it sends ``{"type": "close"}`` after the audio and reads until the
    server closes the socket.
    """
    received: list[Received] = []
    sent_at: list[tuple[float, float]] = []
    async with connect(url, max_size=None, compression=None,
                       additional_headers=headers or {}) as ws:

        async def reader() -> None:
            try:
                async for raw in ws:
                    msg = json.loads(raw)
                    received.append(Received(time.monotonic(), msg))
                    if on_message is not None:
                        on_message(msg)
            except ConnectionClosed:
                pass  # an error close: the code is read below

        read_task = asyncio.create_task(reader())
        started = time.monotonic()
        audio_seconds = 0.0
        try:
            try:
                for payload, seconds in messages:
                    if pace:
                        delay = started + audio_seconds / pace - time.monotonic()
                        if delay > 0:
                            await asyncio.sleep(delay)
                    await ws.send(payload)
                    audio_seconds += seconds
                    sent_at.append((audio_seconds, time.monotonic()))
                if close:
                    await ws.send(json.dumps({"type": "close"}))
            except ConnectionClosed:
                pass  # the server ended the session early; read what it said
            await asyncio.wait_for(read_task, read_timeout)
        except Exception:
            read_task.cancel()
            raise
        return StreamResult(received, started, sent_at, ws.close_code, ws.close_reason or "",
                            time.time() - time.monotonic())
