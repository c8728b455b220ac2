"""Logging setup shared by the services' entry points: text or JSON lines."""

from __future__ import annotations

import json
import logging
import re
import time

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


def redact(text: str) -> str:
    for pattern, replacement in _SECRETS:
        text = pattern.sub(replacement, text)
    return text


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


def setup_logging(level: str, fmt: str = "text") -> None:
    logging.getLogger("faster_whisper").setLevel(logging.WARNING)
    handler = logging.StreamHandler()
    inner = JsonFormatter() if fmt == "json" else logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s: %(message)s")
    handler.setFormatter(RedactingFormatter(inner))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
