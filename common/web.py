"""The edge both servers share (the gateway and ``python -m fanout``): the one adapter from
an error to what a client gets, JSON responses, query parameters, and socket helpers.

An error becomes, over HTTP, its ``http_status`` with ``{"type": "error", "code",
"message"}``; over a WebSocket, that same ``error`` message and then a close with its
``close_code``. ``client_error`` decides what any exception is to a client: an
``SttError`` is itself, Redis being down is ``storage_unavailable``, anything else an
``internal_error`` whose details stay in the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import json
import math
import time
from collections.abc import Mapping
from typing import Any

from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Response
from websockets.protocol import State

from common.backoff import REDIS_DOWN
from common.errors import BadRequest, RateLimited, StorageUnavailable, SttError
from common.messages import ErrorMessage, parse_control, to_json
from common.ratelimit import MessageLimits

# --------------------------------------------------------------------------- errors


def client_error(exc: BaseException) -> SttError:
    """What ``exc`` is to a client (never its internals)."""
    if isinstance(exc, SttError):
        return exc
    if isinstance(exc, REDIS_DOWN):
        return StorageUnavailable()
    return SttError()


def json_response(status: http.HTTPStatus, body: Any) -> Response:
    data = json.dumps(body, ensure_ascii=False).encode()
    return Response(status.value, status.phrase, Headers([
        ("Content-Type", "application/json"), ("Content-Length", str(len(data))),
        ("Cache-Control", "no-store")]), data)


def error_response(exc: BaseException) -> Response:
    """The HTTP answer to ``exc``: its status and JSON body, with ``WWW-Authenticate`` on
    401 and ``Retry-After`` on a rate limit."""
    err = client_error(exc)
    response = json_response(http.HTTPStatus(err.http_status),
                             {"type": "error", "code": err.code, "message": err.message})
    if err.http_status == http.HTTPStatus.UNAUTHORIZED:
        response.headers["WWW-Authenticate"] = 'Bearer realm="stt"'
    if isinstance(err, RateLimited):
        response.headers["Retry-After"] = str(max(1, math.ceil(err.retry_after_s)))
    return response


async def send_error(ws: ServerConnection, exc: BaseException) -> None:
    """The WebSocket answer to ``exc``: its ``error`` message, then the close with its code."""
    err = client_error(exc)
    with contextlib.suppress(ConnectionClosed):
        await ws.send(to_json(ErrorMessage(err.code, err.message)))
        await ws.close(err.close_code, err.code)


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


# --------------------------------------------------------------------------- query parameters


def one(query: Mapping[str, list[str]], name: str) -> str | None:
    """The parameter's value (the last one when repeated), or None."""
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
