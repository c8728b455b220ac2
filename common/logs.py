"""Logging setup shared by the services' entry points: text or JSON lines."""

from __future__ import annotations

import json
import logging
import re
import time

_SESSION = re.compile(r"\bsession ([0-9a-f]{32})\b")


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
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
