"""Serving HTTP and WebSocket on one port with aiohttp: the gateway, ``python -m fanout`` and
the worker's health port.

aiohttp parses requests, routes them and runs the WebSocket protocol; what it lacks is what
a service facing the internet needs before a request is read (docs/security.md,
*Connections per address*). ``ConnectionGuard`` stands in front of each connection's aiohttp
``RequestHandler`` (it is the protocol the event loop talks to, and hands the bytes on):

* **at accept**, before anything is read, the peer address is counted against
  ``PeerLimits`` (open connections, unanswered requests); over a cap the connection is cut
  (TCP reset, no response);
* **while the request head arrives**, its shape is bounded: a request line or header line
  of at most ``MAX_LINE_BYTES`` (414 / 431), at most ``MAX_HEADERS`` header lines and
  ``max_request_bytes`` in all (431); a header aiohttp's parser takes once, repeated, is a
  400 ``bad_request`` (aiohttp would answer it with a plain-text HTTP/1.0 400 and log a
  traceback); a refused head is answered at once and what follows is read and discarded;
* **the handshake timeout** cuts a connection that has not had its answer (the 101, or an
  HTTP response's head) that long after it was accepted, without a response;
* **one request per connection**: once a head is complete, reading stops until the handler
  decides: a WebSocket upgrade answered 101 reads on (its frames), anything else (a refused
  upgrade too) gets its response and ``Connection: close``. So nothing pipelined behind a
  request is parsed, and a keep-alive connection cannot send a second head past these
  bounds. An endpoint that reads a request body calls ``Connections.read_body`` first;
* **keepalive pings** on an upgraded connection: after ``PING_INTERVAL_S`` without a read
  the client is pinged, after as long again without one (its pong is a read) it is cut.
  aiohttp's own heartbeat does the same with a callback and a timer reset for every read
  (measured: a tenth of the CPU aiohttp spends receiving 100 ms frames); this costs a
  counter per read and one timer per socket.

``serve`` puts an ``Application`` on a listening socket this way (``AppRunner`` and a
``GuardedSite``, ``SO_REUSEPORT`` on request); request lines and headers are logged at DEBUG
(credentials are redacted by ``common.logs``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from common.access import PeerLimits

log = logging.getLogger(__name__)

#: Longest request line or header line, its line end included (websockets' bound before).
MAX_LINE_BYTES = 8192
#: Most header lines in one request.
MAX_HEADERS = 128
#: Handlers still running when a server stops get this long before they are cancelled.
SHUTDOWN_TIMEOUT_S = 5.0
#: Seconds without a read from an upgraded client before it is pinged; as long again
#: without one and it is cut (a dead peer, a vanished network).
PING_INTERVAL_S = 20.0
#: A WebSocket ping frame with no payload, as a server sends it (unmasked).
_PING = b"\x89\x00"

#: Headers aiohttp's request parser refuses to see twice (``aiohttp.http_parser.
#: SINGLETON_HEADERS``; a test checks this covers it), by their lower-case name.
SINGLETON_HEADERS = {name.lower(): name for name in (
    "Content-Length", "Content-Location", "Content-Range", "Content-Type", "ETag", "Host",
    "Max-Forwards", "Server", "Transfer-Encoding", "User-Agent")}
_NAME_BYTES = max(map(len, SINGLETON_HEADERS)) + 2  # of a line, enough to tell its name

_HEAD, _HELD, _PASS, _DISCARD = range(4)
_STATUS_TEXT = {400: "Bad Request", 414: "URI Too Long",
                431: "Request Header Fields Too Large"}


class _Refused(Exception):
    def __init__(self, status: int, text: str, code: str | None = None) -> None:
        super().__init__(text)
        self.status = status
        self.text = text
        self.code = code  # an error code: a JSON error body (else plain text)


class ConnectionGuard(asyncio.Protocol):
    """One accepted connection: the checks above, in front of aiohttp's ``RequestHandler``
    (``inner``), which gets every byte it is meant to parse. One per socket: slotted."""

    __slots__ = ("_held", "_line_first", "_line_len", "_line_start", "_lines", "_peer",
                 "_ping_timer", "_pinged", "_reads", "_reads_seen", "_request_line", "_seen",
                 "_started", "_state", "_timer", "_total", "_unanswered", "_ws",
                 "data_received", "inner", "owner", "transport")

    def __init__(self, inner: asyncio.Protocol, owner: Connections) -> None:
        self.inner = inner
        self.owner = owner
        self.transport: asyncio.Transport | None = None
        self._peer: str | None = None  # the PeerLimits bucket counted, if any
        self._unanswered = False
        self._started = False  # inner has the connection
        self._timer: asyncio.TimerHandle | None = None
        self._state = _HEAD
        self._held = b""
        # the request head so far
        self._total = 0
        self._lines = 0  # complete lines, the request line included
        self._line_len = 0  # bytes of the current, incomplete line
        self._line_first = 0  # its first byte
        self._line_start = b""  # its first _NAME_BYTES bytes
        self._request_line = False  # a request line was read (empty lines before it skip)
        self._seen: set[str] | None = None  # singleton headers so far
        # an upgraded connection's keepalive
        self._ws: web.WebSocketResponse | None = None
        self._reads = 0
        self._reads_seen = 0
        self._pinged = False
        self._ping_timer: asyncio.TimerHandle | None = None
        # What the transport calls with each read (the slot shadows the method): ``_read``
        # until the head is done, then ``_pass`` (an upgraded connection's frames skip the
        # head's state checks).
        self.data_received = self._read  # type: ignore[method-assign]

    # ------------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        limits = self.owner.limits
        bucket = limits.bucket(transport.get_extra_info("peername")) \
            if limits is not None else None
        if bucket is not None:
            assert limits is not None
            if not limits.open(bucket):
                transport.abort()  # nothing read, nothing answered
                return
            self._peer, self._unanswered = bucket, True
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self.owner.handshake_timeout_s, self._timed_out)
        self.owner.guards[transport] = self
        self._started = True
        self.inner.connection_made(transport)

    def _read(self, data: bytes) -> None:
        state = self._state
        if state is _PASS:
            self.inner.data_received(data)
        elif state is _HEAD:
            try:
                end = self._scan(data)
            except _Refused as refused:
                self._refuse(refused)
                return
            if end < 0:
                self.inner.data_received(data)
                return
            # The head is complete: nothing more is parsed until the handler says so.
            self._state = _HELD
            self._held = data[end:]
            assert self.transport is not None
            self.transport.pause_reading()
            self.inner.data_received(data[:end])
        elif state is _HELD:  # reading was paused in this same read
            self._held += data

    def eof_received(self) -> bool | None:
        return self.inner.eof_received() if self._started else None

    def pause_writing(self) -> None:
        if self._started:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self._started:
            self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._ping_timer is not None:
            self._ping_timer.cancel()
            self._ping_timer = None
        self._ws = None
        self.answered()
        if self._peer is not None:
            assert self.owner.limits is not None
            self.owner.limits.closed(self._peer)
            self._peer = None
        if self.transport is not None:
            self.owner.guards.pop(self.transport, None)
        self._held = b""
        if self._started:
            self._started = False
            self.inner.connection_lost(exc)

    # ------------------------------------------------------------------ the handler's side

    def answered(self) -> None:
        """The request has its answer (a response head is going out): it no longer counts
        as unanswered, and the handshake timeout no longer applies."""
        if self._state is not _DISCARD and self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._unanswered and self._peer is not None:
            self._unanswered = False
            assert self.owner.limits is not None
            self.owner.limits.answered(self._peer)

    def read_on(self) -> None:
        """Hand what follows the head to aiohttp from now on (a WebSocket's frames, a
        request body)."""
        if self._state is not _HELD or self.transport is None:
            return
        self._state = _PASS
        # From now on the transport's reads skip the state checks (an instance attribute
        # shadows the method): a count for the keepalive, and on to aiohttp.
        self.data_received = self._pass  # type: ignore[method-assign]
        held, self._held = self._held, b""
        self.transport.resume_reading()
        if held:
            self.inner.data_received(held)

    def _pass(self, data: bytes) -> None:
        self._reads += 1
        self.inner.data_received(data)

    def keep_alive(self, ws: web.WebSocketResponse, interval_s: float) -> None:
        """Ping the client of this upgraded connection after ``interval_s`` without a read
        and cut it after as long again without one, until ``ws`` is closed."""
        self._ws = ws
        self._reads_seen, self._pinged = self._reads, False
        loop = asyncio.get_running_loop()
        self._ping_timer = loop.call_later(interval_s, self._tick, interval_s)

    def _tick(self, interval_s: float) -> None:
        self._ping_timer = None
        ws, transport = self._ws, self.transport
        if ws is None or ws.closed or transport is None or transport.is_closing():
            return
        if self._reads != self._reads_seen:
            self._reads_seen, self._pinged = self._reads, False
        elif self._pinged:
            log.debug("no pong within %.0f s: cutting %s", interval_s,
                      transport.get_extra_info("peername"))
            transport.abort()
            return
        else:
            transport.write(_PING)  # between frames: aiohttp writes each in one go
            self._pinged = True
        self._ping_timer = asyncio.get_running_loop().call_later(interval_s, self._tick,
                                                                 interval_s)

    # ------------------------------------------------------------------ the request head

    def _scan(self, data: bytes) -> int:
        """Follow the head through ``data``: the offset just past its end, or -1 when it
        goes on. ``_Refused`` when it breaks a bound."""
        limit = self.owner.max_request_bytes
        pos, size = 0, len(data)
        while True:
            nl = data.find(b"\n", pos)
            if nl < 0:
                if pos < size:
                    if self._line_len == 0:
                        self._line_first = data[pos]
                    if self._line_len < _NAME_BYTES:
                        self._line_start += data[pos:pos + _NAME_BYTES - self._line_len]
                    self._line_len += size - pos
                    if self._line_len >= MAX_LINE_BYTES:
                        raise self._line_too_long()
                self._total += size
                if 0 < limit < self._total:
                    raise self._too_large(limit)
                return -1
            if self._line_len == 0 and nl > pos:
                self._line_first = data[pos]
            start = self._line_start + data[pos:min(nl, pos + _NAME_BYTES - self._line_len)]
            length = self._line_len + nl - pos + 1  # with its "\n"
            empty = length == 1 or (length == 2 and self._line_first == 0x0D)
            self._line_len, self._line_start = 0, b""
            pos = nl + 1
            if length > MAX_LINE_BYTES:
                raise self._line_too_long()
            if 0 < limit < self._total + pos:
                raise self._too_large(limit)
            if not self._request_line:
                self._request_line = not empty  # empty lines before a request are skipped
                continue
            if empty:
                self._total += pos
                return pos
            self._lines += 1
            if self._lines > MAX_HEADERS:
                raise _Refused(431, f"a request may have at most {MAX_HEADERS} headers")
            name = start.partition(b":")[0].strip().lower().decode("latin-1")
            if name in SINGLETON_HEADERS:
                if self._seen is None:
                    self._seen = set()
                elif name in self._seen:
                    raise _Refused(400, f"send one {SINGLETON_HEADERS[name]} header",
                                   "bad_request")
                self._seen.add(name)

    def _line_too_long(self) -> _Refused:
        if not self._request_line:
            return _Refused(414, f"the request line may be at most {MAX_LINE_BYTES} bytes")
        return _Refused(431, f"a header line may be at most {MAX_LINE_BYTES} bytes")

    @staticmethod
    def _too_large(limit: int) -> _Refused:
        return _Refused(431, f"the request line and headers may be at most {limit} bytes")

    def _refuse(self, refused: _Refused) -> None:
        """Answer a head over a bound at once and discard what the client still sends, until
        it closes or the handshake timeout cuts it (closing now would reset the connection
        under the unread request, and the client might never see the answer)."""
        self._state = _DISCARD
        if refused.code is not None:
            ctype = "application/json"
            body = json.dumps({"type": "error", "code": refused.code,
                               "message": refused.text}).encode()
        else:
            ctype, body = "text/plain; charset=utf-8", (refused.text + "\n").encode()
        assert self.transport is not None
        self.transport.write(
            f"HTTP/1.1 {refused.status} {_STATUS_TEXT[refused.status]}\r\n"
            f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
            f"Connection: close\r\n\r\n".encode() + body)
        self.answered()
        log.debug("refused a request head: %s", refused.text)

    def _timed_out(self) -> None:
        self._timer = None
        if self.transport is not None:
            log.debug("handshake timeout: cutting %s",
                      self.transport.get_extra_info("peername"))
            self.transport.abort()


@dataclasses.dataclass
class Connections:
    """The protections one listening socket applies to each connection it accepts, and its
    open connections (by transport)."""

    limits: PeerLimits | None = None
    max_request_bytes: int = 0
    handshake_timeout_s: float = 10.0
    ping_interval_s: float = PING_INTERVAL_S
    guards: dict[asyncio.BaseTransport, ConnectionGuard] = dataclasses.field(
        default_factory=dict)

    def guard(self, request: web.BaseRequest) -> ConnectionGuard | None:
        transport = request.transport
        return self.guards.get(transport) if transport is not None else None

    def read_body(self, request: web.BaseRequest) -> None:
        """Let aiohttp read what follows this request's head: its body."""
        guard = self.guard(request)
        if guard is not None:
            guard.read_on()

    def factory(self, handler_factory: Callable[[], asyncio.Protocol]) -> Callable[
            [], asyncio.Protocol]:
        return lambda: ConnectionGuard(handler_factory(), self)

    def install(self, app: web.Application) -> None:
        """The middleware and signal the guards need, on ``app``."""
        app.middlewares.insert(0, self._middleware)
        app.on_response_prepare.append(self._on_response_prepare)

    @web.middleware
    async def _middleware(self, request: web.Request,
                          handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                          ) -> web.StreamResponse:
        if log.isEnabledFor(logging.DEBUG):
            log.debug("< %s %s HTTP/%d.%d", request.method, request.raw_path,
                      *request.version)
            for name, value in request.raw_headers:
                log.debug("< %s: %s", name.decode("latin-1"), value.decode("latin-1"))
        return await handler(request)

    async def _on_response_prepare(self, request: web.BaseRequest,
                                   response: web.StreamResponse) -> None:
        guard = self.guard(request)
        if guard is not None:
            guard.answered()
            if isinstance(response, web.WebSocketResponse):  # a 101: frames follow
                guard.read_on()
                if self.ping_interval_s > 0:
                    guard.keep_alive(response, self.ping_interval_s)
        if response.status != 101:
            response.force_close()  # one request per connection
            response.headers["Connection"] = "close"
        log.debug("> HTTP/1.1 %d %s", response.status, response.reason)


class GuardedSite(web.BaseSite):
    """A TCP listening socket whose connections go through ``Connections``' guards."""

    __slots__ = ("_connections", "_host", "_port", "_reuse_port")

    def __init__(self, runner: web.BaseRunner, connections: Connections, host: str,
                 port: int, *, reuse_port: bool = False, backlog: int = 128) -> None:
        super().__init__(runner, backlog=backlog)
        self._connections = connections
        self._host = host
        self._port = port
        self._reuse_port = reuse_port

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self._port}"

    @property
    def ports(self) -> list[int]:
        sockets = getattr(self._server, "sockets", None) or ()
        return sorted({sock.getsockname()[1] for sock in sockets})

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._connections.factory(server), self._host, self._port, backlog=self._backlog,
            reuse_port=self._reuse_port or None)


@dataclasses.dataclass
class Served:
    """An ``Application`` being served: ``stop_accepting`` then ``close``."""

    runner: web.AppRunner
    site: GuardedSite
    connections: Connections

    @property
    def ports(self) -> list[int]:
        return self.site.ports

    @property
    def port(self) -> int:
        return self.ports[0]

    async def stop_accepting(self) -> None:
        """Close the listening socket; open connections go on."""
        await self.site.stop()

    async def close(self) -> None:
        """Stop serving: connections still open are closed (their handlers get
        ``SHUTDOWN_TIMEOUT_S`` to finish)."""
        await self.runner.cleanup()


async def serve(app: web.Application, host: str, port: int, *,
                limits: PeerLimits | None = None, max_request_bytes: int = 0,
                handshake_timeout_s: float = 10.0, reuse_port: bool = False,
                **handler_args: Any) -> Served:
    """Serve ``app`` on ``host``:``port`` (0: a free port) under ``Connections``' checks."""
    connections = Connections(limits, max_request_bytes, handshake_timeout_s)
    connections.install(app)
    runner = web.AppRunner(
        app, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT_S,
        # aiohttp's own bounds sit just above the guard's, which answer first
        max_line_size=MAX_LINE_BYTES, max_field_size=MAX_LINE_BYTES,
        max_headers=2 * MAX_HEADERS,
        lingering_time=0,  # an unread body is not waited for: the connection closes
        **handler_args)
    await runner.setup()
    site = GuardedSite(runner, connections, host, port, reuse_port=reuse_port)
    await site.start()
    return Served(runner, site, connections)
