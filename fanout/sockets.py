"""Small WebSocket helpers shared by the viewer and replay endpoints."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

from common.errors import BadRequest, SttError
from common.messages import ErrorMessage, parse_control, to_json
from common.ratelimit import MessageLimits


async def send_error(ws: ServerConnection, exc: SttError) -> None:
    """Tell the client what went wrong (no internals), then close with the matching code."""
    with contextlib.suppress(ConnectionClosed):
        await ws.send(to_json(ErrorMessage(exc.code, exc.message)))
        await ws.close(exc.close_code, exc.code)


async def drop(ws: ServerConnection, exc: SttError, grace_s: float) -> None:
    """Disconnect a client that may not be reading: error and close if it takes them in
    ``grace_s``, else cut the TCP connection so its buffers are freed at once."""
    try:
        async with asyncio.timeout(grace_s):
            await send_error(ws, exc)
    except TimeoutError:
        pass
    if ws.state is not State.CLOSED:
        ws.transport.abort()


async def read_controls(ws: ServerConnection, on_close: asyncio.Event | None = None,
                        limits: MessageLimits | None = None) -> None:
    """Read (and mostly ignore) what a client sends until the socket closes.

    Reading keeps pings and the close handshake flowing. ``{"type": "close"}``
    sets ``on_close`` where the endpoint supports ending early. A message over the
    ``limits`` (too large, too many) gets its error and the close, and ends the reading.
    """
    with contextlib.suppress(ConnectionClosed):
        async for message in ws:
            if limits is not None:
                try:
                    limits.check(message, time.monotonic())
                except SttError as exc:
                    await send_error(ws, exc)
                    return
            if on_close is None or not isinstance(message, str):
                continue
            with contextlib.suppress(SttError):
                if parse_control(message).type == "close":
                    on_close.set()


def one(query: Mapping[str, list[str]], name: str) -> str | None:
    values = query.get(name)
    return values[-1] if values else None


def bool_param(query: Mapping[str, list[str]], name: str, default: bool) -> bool:
    value = one(query, name)
    if value is None or value == "":
        return default
    low = value.lower()
    if low in ("true", "1", "yes"):
        return True
    if low in ("false", "0", "no"):
        return False
    raise BadRequest(f"{name} must be true or false")


def float_param(query: Mapping[str, list[str]], name: str, default: float | None,
                low: float, high: float) -> float | None:
    value = one(query, name)
    if value is None or value == "":
        return default
    try:
        number = float(value)
    except ValueError:
        raise BadRequest(f"{name} must be a number") from None
    if not low <= number <= high:
        raise BadRequest(f"{name} must be between {low:g} and {high:g}")
    return number


def int_param(query: Mapping[str, list[str]], name: str, default: int,
              low: int, high: int) -> int:
    value = one(query, name)
    if value is None or value == "":
        return default
    try:
        number = int(value)
    except ValueError:
        raise BadRequest(f"{name} must be an integer") from None
    if not low <= number <= high:
        raise BadRequest(f"{name} must be between {low} and {high}")
    return number
