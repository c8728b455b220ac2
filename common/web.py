"""The edge both servers share (the gateway and ``python -m fanout``): the one adapter from
an error to what a client gets, JSON responses, query parameters, and the WebSocket adapter
(``Socket``: the rest of the code never sees aiohttp's message types).

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
from collections.abc import AsyncIterator, Mapping
from typing import Any
from urllib.parse import parse_qs, urlsplit

from aiohttp import WSMsgType, web

from common.access import select_subprotocol
from common.backoff import REDIS_DOWN, REDIS_FULL
from common.errors import (
    BadRequest,
    MethodNotAllowed,
    QuotaExceeded,
    RateLimited,
    StorageFull,
    StorageUnavailable,
    SttError,
)
from common.messages import ErrorMessage, parse_control, to_json
from common.ratelimit import MessageLimits
from common.session_meta import ENDPOINTING_DEFAULT, ENDPOINTING_OFF

#: Seconds ``Socket.close`` waits for the client's close frame.
CLOSE_TIMEOUT_S = 10.0

# --------------------------------------------------------------------------- errors


def client_error(exc: BaseException) -> SttError:
    """What ``exc`` is to a client (never its internals)."""
    if isinstance(exc, SttError):
        return exc
    if isinstance(exc, REDIS_FULL):
        return StorageFull()
    if isinstance(exc, REDIS_DOWN):
        return StorageUnavailable()
    return SttError()


def json_response(status: http.HTTPStatus, body: Any) -> web.Response:
    data = json.dumps(body, ensure_ascii=False).encode()
    return web.Response(status=status.value, body=data, headers={
        "Content-Type": "application/json", "Cache-Control": "no-store"})


def error_response(exc: BaseException) -> web.Response:
    """The HTTP answer to ``exc``: its status and JSON body, with ``WWW-Authenticate`` on
    401, ``Retry-After`` on a rate limit or a full storage and ``Allow`` on 405."""
    err = client_error(exc)
    response = json_response(http.HTTPStatus(err.http_status),
                             {"type": "error", "code": err.code, "message": err.message})
    if err.http_status == http.HTTPStatus.UNAUTHORIZED:
        response.headers["WWW-Authenticate"] = 'Bearer realm="stt"'
    if isinstance(err, RateLimited | StorageFull | QuotaExceeded):
        response.headers["Retry-After"] = str(max(1, math.ceil(err.retry_after_s)))
    if isinstance(err, MethodNotAllowed) and err.allow:
        response.headers["Allow"] = ", ".join(err.allow)
    return response


def target(request: web.BaseRequest) -> tuple[str, dict[str, list[str]]]:
    """The request's path as it was sent (not percent-decoded) and its query parameters:
    the one parse every check and route acts on."""
    url = urlsplit(request.raw_path)
    return url.path, parse_qs(url.query, keep_blank_values=True)


def wants_websocket(request: web.BaseRequest) -> bool:
    return request.headers.get("Upgrade", "").lower() == "websocket"


# --------------------------------------------------------------------------- WebSockets


#: Close handshakes under way whose caller was cancelled (kept until they end).
_closing: set[asyncio.Future[bool]] = set()


class SocketClosed(Exception):
    """The WebSocket is closed, by either side; ``code`` is its close code when known."""

    def __init__(self, code: int | None = None) -> None:
        super().__init__(f"socket closed ({code})")
        self.code = code


class Socket:
    """A server WebSocket as the services use it: ``recv`` and ``send`` text or bytes, and
    ``close`` with a code; a closed socket raises ``SocketClosed`` (aiohttp reports a close
    as a message, and a failed send as a connection error). ``request`` is the upgrade's
    HTTP request."""

    __slots__ = ("_closing", "request", "ws")

    def __init__(self, request: web.BaseRequest, ws: web.WebSocketResponse) -> None:
        self.request = request
        self.ws = ws
        self._closing: asyncio.Future[bool] | None = None

    @property
    def subprotocol(self) -> str | None:
        return self.ws.ws_protocol

    @property
    def closed(self) -> bool:
        return self.ws.closed

    async def recv(self) -> str | bytes:
        """The next text (str) or binary (bytes) message; pings are answered meanwhile."""
        msg = await self.ws.receive()
        if msg.type is WSMsgType.BINARY or msg.type is WSMsgType.TEXT:
            return msg.data
        raise SocketClosed(self.ws.close_code)

    def __aiter__(self) -> Socket:
        return self

    async def __anext__(self) -> str | bytes:
        try:
            return await self.recv()
        except SocketClosed:
            raise StopAsyncIteration from None

    async def send(self, message: str | bytes) -> None:
        try:
            if isinstance(message, str):
                await self.ws.send_str(message)
            else:
                await self.ws.send_bytes(message)
        except ConnectionError as exc:
            raise SocketClosed(self.ws.close_code) from exc

    async def close(self, code: int, reason: str = "") -> None:
        """Send the close frame and wait (up to ``CLOSE_TIMEOUT_S``) for the client's.

        The handshake goes on when the caller is cancelled (a task stopped meanwhile):
        cancelled, aiohttp would close the connection with the client's unread messages in
        its receive buffer, a TCP reset that can destroy what the client has not read yet
        (the error message, the close frame)."""
        if self._closing is None:
            self._closing = asyncio.ensure_future(
                self.ws.close(code=code, message=reason.encode()))
            _closing.add(self._closing)
            self._closing.add_done_callback(_closing.discard)
        await asyncio.shield(self._closing)

    async def wait_closed(self) -> None:
        """Until a close handshake under way has ended: its handler must not return before
        (aiohttp then closes the connection, resetting it under the client's unread
        messages, the last ones the server sent among them)."""
        if self._closing is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._closing)

    def abort(self) -> None:
        """Cut the TCP connection: its buffers are freed at once."""
        transport = self.request.transport
        if transport is not None:
            transport.abort()


class OpenSockets:
    """A server's open WebSockets, closed together when it stops."""

    def __init__(self) -> None:
        self._sockets: set[Socket] = set()

    def __len__(self) -> int:
        return len(self._sockets)

    @contextlib.asynccontextmanager
    async def track(self, ws: Socket) -> AsyncIterator[Socket]:
        """Count ``ws`` as open while the block runs, and until its close handshake ends."""
        self._sockets.add(ws)
        try:
            yield ws
        finally:
            self._sockets.discard(ws)
            await ws.wait_closed()

    async def close_all(self, code: int, reason: str, wait_s: float = 3.0) -> None:
        """Close every open socket with ``code``; one whose client has not answered the
        close within ``wait_s`` is cut (a client that does not read would otherwise hold a
        stopping server for ``CLOSE_TIMEOUT_S``)."""
        sockets = list(self._sockets)
        closes = [asyncio.ensure_future(ws.close(code, reason)) for ws in sockets]
        if not closes:
            return
        _done, pending = await asyncio.wait(closes, timeout=wait_s)
        for ws, close in zip(sockets, closes, strict=True):
            if close in pending:
                ws.abort()
        if pending:
            await asyncio.wait(pending, timeout=1.0)  # an aborted socket's close ends at once


async def accept(request: web.BaseRequest, max_size: int) -> Socket:
    """Answer an upgrade 101: ``stt`` as the subprotocol where offered (never a
    ``bearer.`` one, so a credential is not echoed), no compression, messages of up to
    ``max_size`` bytes (a larger one is refused from its frame header: close 1009); the
    client's pings are answered as it is read. Keepalive pings are
    ``common.serving``'s (``PING_INTERVAL_S``). aiohttp answers a malformed handshake
    with 400."""
    offered = [item.strip() for line in request.headers.getall("Sec-WebSocket-Protocol", ())
               for item in line.split(",")]
    chosen = select_subprotocol(offered)
    ws = web.WebSocketResponse(protocols=(chosen,) if chosen else (), compress=False,
                               timeout=CLOSE_TIMEOUT_S,
                               max_msg_size=max_size + 1)  # aiohttp refuses >= its bound
    await ws.prepare(request)
    return Socket(request, ws)


async def send_error(ws: Socket, exc: BaseException) -> None:
    """The WebSocket answer to ``exc``: its ``error`` message, then the close with its code."""
    err = client_error(exc)
    with contextlib.suppress(SocketClosed):
        await ws.send(to_json(ErrorMessage(err.code, err.message)))
        await ws.close(err.close_code, err.code)


async def drop(ws: Socket, exc: SttError, grace_s: float) -> None:
    """Disconnect a client that may not be reading: error and close if it takes them in
    ``grace_s``, else cut the TCP connection so its buffers are freed at once."""
    try:
        async with asyncio.timeout(grace_s):
            await send_error(ws, exc)
    except TimeoutError:
        pass
    ws.abort()


async def read_controls(ws: Socket, on_close: asyncio.Event | None = None,
                        limits: MessageLimits | None = None) -> None:
    """Read (and mostly ignore) what a client sends until the socket closes.

    Reading keeps pings and the close handshake flowing. ``{"type": "close"}``
    sets ``on_close`` where the endpoint supports ending early. A message over the
    ``limits`` (too large, too many) gets its error and the close, and ends the reading.
    """
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


def language_param(query: Mapping[str, list[str]]) -> str | None:
    """``language``: an ISO code (``en``, ``pt-BR``) or ``auto``; None when absent."""
    language = one(query, "language") or None
    if language is not None and (
            len(language) > 8 or not all(c.isalpha() or c == "-" for c in language)):
        raise BadRequest("language must be an ISO code or 'auto'")
    return language


#: Bounds on what a client may ask decoding to lean toward (``keyterm=``, ``prompt=``): the
#: decoder keeps at most ``KEYTERM_TOKENS`` tokens of them (transcriber setting) anyway.
KEYTERMS_MAX = 100
KEYTERM_MAX_CHARS = 100
PROMPT_MAX_CHARS = 2000


def bias_params(query: Mapping[str, list[str]]) -> tuple[tuple[str, ...], str]:
    """``keyterm`` (repeatable: names, product words the decoder should expect) and
    ``prompt`` (free text that sets the context, such as a meeting's topic)."""
    terms = tuple(t.strip() for t in query.get("keyterm", ()) if t.strip())
    if len(terms) > KEYTERMS_MAX:
        raise BadRequest(f"at most {KEYTERMS_MAX} keyterm parameters")
    for term in terms:
        if len(term) > KEYTERM_MAX_CHARS or not term.isprintable():
            raise BadRequest(f"a keyterm must be printable text of at most "
                             f"{KEYTERM_MAX_CHARS} characters")
    prompt = (one(query, "prompt") or "").strip()
    if len(prompt) > PROMPT_MAX_CHARS or not prompt.replace("\n", " ").isprintable():
        raise BadRequest(f"prompt must be printable text of at most {PROMPT_MAX_CHARS} "
                         "characters")
    return terms, prompt


#: ``endpointing=`` bounds, in milliseconds of silence (Deepgram's name and unit).
ENDPOINTING_MIN_MS = 10
ENDPOINTING_MAX_MS = 60_000


def endpointing_param(query: Mapping[str, list[str]]) -> int:
    """``endpointing``: milliseconds of silence that end an utterance (the worker's own
    endpoints when absent: ``ENDPOINTING_DEFAULT``), or ``false`` (also ``0``): no silence
    ends one (``ENDPOINTING_OFF``)."""
    value = one(query, "endpointing")
    if value is None or value == "":
        return ENDPOINTING_DEFAULT
    if value.lower() == "false" or value.strip() == "0":
        return ENDPOINTING_OFF
    return int_param(query, "endpointing", 0, ENDPOINTING_MIN_MS, ENDPOINTING_MAX_MS)


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


def _number_param(query: Mapping[str, list[str]], name: str, default: Any, low: Any,
                  high: Any, kind: type, what: str, shown: str) -> Any:
    """``name`` as a ``kind`` within [``low``, ``high``], or ``default`` when absent."""
    value = one(query, name)
    if value is None or value == "":
        return default
    try:
        number = kind(value)
    except ValueError:
        raise BadRequest(f"{name} must be {what}") from None
    if not low <= number <= high:
        raise BadRequest(f"{name} must be between {low:{shown}} and {high:{shown}}")
    return number


def float_param(query: Mapping[str, list[str]], name: str, default: float | None,
                low: float, high: float) -> float | None:
    return _number_param(query, name, default, low, high, float, "a number", "g")


def int_param(query: Mapping[str, list[str]], name: str, default: int,
              low: int, high: int) -> int:
    return int(_number_param(query, name, default, low, high, int, "an integer", "d"))
