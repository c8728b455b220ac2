"""Logging setup shared by the services' entry points: text or JSON lines."""

from __future__ import annotations

import errno
import json
import logging
import re
import time
from collections.abc import Callable
from urllib.parse import quote, unquote_plus

from redis.exceptions import OutOfMemoryError

_SESSION = re.compile(r"\bsession ([0-9a-f]{32})\b")

#: Credentials that must never reach a log: query tokens, bearer headers and subprotocols,
#: API keys and session tokens by their shape, passwords in Redis URLs.
_SECRETS = (
    (re.compile(r"(?i)\b(token=)[^&\s\"']+"), r"\1<redacted>"),
    (re.compile(r"(?i)\b(authorization[\"']?\s*[:=]\s*[\"']?)[^\r\n\"']+"), r"\1<redacted>"),
    (re.compile(r"(?i)\b(bearer[ .])[A-Za-z0-9._~+/=-]+"), r"\1<redacted>"),
    (re.compile(r"\bstt_[A-Za-z0-9_-]{16,}"), "<redacted-key>"),
    (re.compile(r"\bstt1\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+"), "<redacted-token>"),
    (re.compile(r"(rediss?://[^:/@\s]*:)[^@\s]+@"), r"\1<redacted>@"),
)


#: A run of characters without spaces or quotes (a request target, a URL). One with
#: percent-encoding in it is searched for secrets decoded, the way the server reads a query
#: (``tok%65n=`` is ``token=``).
_RUN = re.compile(r"[^\s\"'<>]+")
_PERCENT = re.compile(r"%[0-9A-Fa-f]{2}")
#: Kept as they are when a redacted run is encoded again (readable, and no control
#: character or space can reach the log line).
_URL_SAFE = "/?&=;:,.@!$()*+~_-<>[]"


def _redact_plain(text: str) -> str:
    for pattern, replacement in _SECRETS:
        text = pattern.sub(replacement, text)
    return text


def _redact_encoded(match: re.Match[str]) -> str:
    raw = match.group(0)
    if _PERCENT.search(raw) is None:
        return raw
    decoded = raw
    for _ in range(3):  # a value encoded twice over is still found
        step = unquote_plus(decoded)
        if step == decoded:
            break
        decoded = step
    clean = _redact_plain(decoded)
    if clean == decoded:
        return raw  # nothing secret in it: logged as it came
    return quote(clean, safe=_URL_SAFE)


def redact(text: str) -> str:
    if "%" in text:
        text = _RUN.sub(_redact_encoded, text)
    return _redact_plain(text)


class RedactingFormatter(logging.Formatter):
    """Wraps a formatter and removes credentials from every formatted line, tracebacks and
    third-party (websockets debug) lines included."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        return redact(self.inner.format(record))


class JsonFormatter(logging.Formatter):
    """One JSON object per line; the session id, when a line is about one, as a field.

    Every line about a session says ``session <id>`` (a project convention), so the
    field is taken from the message rather than threaded through every call.
    """

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        out: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": message,
        }
        m = _SESSION.search(message)
        if m:
            out["session"] = m.group(1)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


#: errno values of "out of file descriptors / memory for sockets": a flood of connections
#: makes every accept fail and log once a second (asyncio retries every second).
_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
#: At most one such line per this many seconds.
RESOURCE_LOG_INTERVAL_S = 60.0


def _out_of_resources(record: logging.LogRecord) -> str | None:
    """Which kind of resource exhaustion the line reports ("fds", "redis_memory"), if any."""
    exc = record.exc_info[1] if record.exc_info else None
    if isinstance(exc, OSError) and exc.errno in _RESOURCE_ERRNOS:
        return "fds"
    message = record.getMessage()
    if "Too many open files" in message or "out of system resource" in message:
        return "fds"
    if "'maxmemory'" in message or isinstance(exc, OutOfMemoryError):
        return "redis_memory"
    return None


class ResourceErrorFilter(logging.Filter):
    """Lets one line of each kind of resource exhaustion through per ``interval_s`` and
    counts the others; the next line of that kind that passes says how many were left out.
    Kinds: out of file descriptors (EMFILE, ENFILE, ENOBUFS, ENOMEM: a flood of connections)
    and Redis refusing writes for lack of memory ("used memory > 'maxmemory'": every
    session's writes fail at once). Other lines are not touched."""

    def __init__(self, interval_s: float = RESOURCE_LOG_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.interval_s = interval_s
        self.clock = clock
        self._next: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    @property
    def suppressed(self) -> int:
        return sum(self._suppressed.values())

    def filter(self, record: logging.LogRecord) -> bool:
        kind = _out_of_resources(record)
        if kind is None:
            return True
        now = self.clock()
        if now < self._next.get(kind, float("-inf")):
            self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
            return False
        self._next[kind] = now + self.interval_s
        left_out = self._suppressed.pop(kind, 0)
        if left_out:
            record.msg = (f"{record.getMessage()} ({left_out} more like this in the "
                          f"last {self.interval_s:.0f} s not logged)")
            record.args = None
        return True


class MalformedRequestFilter(logging.Filter):
    """aiohttp logs every request it cannot parse (the client's fault, and the client's to
    repeat at will) at ERROR with a traceback: such a line is kept at DEBUG, as one line,
    and dropped otherwise. Its other errors (a handler that failed) are not touched."""

    def filter(self, record: logging.LogRecord) -> bool:
        from aiohttp.http_exceptions import HttpProcessingError

        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError):
            return True
        if not logging.getLogger(record.name).isEnabledFor(logging.DEBUG):
            return False
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        record.msg = f"{record.getMessage()}: malformed request: {' '.join(str(exc).split())}"
        record.args, record.exc_info, record.exc_text = None, None, None
        return True


def setup_logging(level: str, fmt: str = "text") -> None:
    logging.getLogger("faster_whisper").setLevel(logging.WARNING)
    handler = logging.StreamHandler()
    inner = JsonFormatter() if fmt == "json" else logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s: %(message)s")
    handler.setFormatter(RedactingFormatter(inner))
    handler.addFilter(ResourceErrorFilter())
    server_log = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, MalformedRequestFilter) for f in server_log.filters):
        server_log.addFilter(MalformedRequestFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
