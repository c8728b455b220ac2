"""Logging (common/logs.py): JSON lines carry the session id, credentials are redacted
from every line (percent-encoded ones too), and the resource-error filter logs a flood of
"Too many open files" once and counts what it left out."""

from __future__ import annotations

import json
import logging

from common.auth import TokenSigner, new_key
from common.logs import JsonFormatter, RedactingFormatter, ResourceErrorFilter, redact

SECRET = "s" * 40


def test_json_lines_carry_the_session_id() -> None:
    sid = "0123456789abcdef0123456789abcdef"
    record = logging.LogRecord("ingest.listen", logging.INFO, __file__, 1,
                               "session %s: opened (%s)", (sid, "pcm_s16le"), None)
    line = json.loads(JsonFormatter().format(record))
    assert line["session"] == sid
    assert line["message"] == f"session {sid}: opened (pcm_s16le)"
    assert line["level"] == "INFO" and line["logger"] == "ingest.listen"
    other = logging.LogRecord("x", logging.WARNING, __file__, 1, "redis down", (), None)
    assert "session" not in json.loads(JsonFormatter().format(other))


def test_credentials_are_redacted_from_log_lines() -> None:
    key = new_key()
    token, _ = TokenSigner(SECRET).mint("alice", 60, 300)
    lines = [
        f"< GET /v1/listen?encoding=wav&token={token}&x=1 HTTP/1.1",
        f"< Authorization: Bearer {key}",
        f"< Sec-WebSocket-Protocol: stt, bearer.{token}",
        f"something mentions {key} and {token}",
        "connecting to rediss://gateway:hunter2hunter2@redis:6380/0",
    ]
    for line in lines:
        out = redact(line)
        assert key not in out and token not in out and "hunter2" not in out, out
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "key %s", (key,), None)
    formatted = RedactingFormatter(logging.Formatter("%(message)s")).format(record)
    assert key not in formatted


def percent_encoded(text: str, lower: bool = False) -> str:
    return "".join(("%%%02x" if lower else "%%%02X") % b for b in text.encode())


def test_redaction_decodes_before_it_looks() -> None:
    key = new_key()
    cases = [
        f"< GET /v1/listen?tok%65n={percent_encoded(key)}&sample_rate=16000 HTTP/1.1",
        f"GET /v1/listen?%74oken={percent_encoded(percent_encoded(key))}",  # twice
        f"/v1/sessions?a=1&token={percent_encoded(key)[:30]}{key[10:]}",
        f"Authorization: Bearer%20{percent_encoded(key)}",
        f"/v1/listen?token={key}",
    ]
    for line in cases:
        out = redact(line)
        assert key not in out and key[4:] not in out and percent_encoded(key)[6:] not in out, out
        assert "redacted" in out, out
    assert "%0A" in redact("/v1/listen?x=%0a&token=%73tt_" + "A" * 43)  # no newline decoded
    assert redact("/a%20b?c=%2F") == "/a%20b?c=%2F"  # nothing secret: left as it came


def test_the_resource_error_filter_counts_what_it_left_out() -> None:
    now = [0.0]
    f = ResourceErrorFilter(60.0, clock=lambda: now[0])

    def record(msg: str, exc: BaseException | None = None) -> logging.LogRecord:
        info = (type(exc), exc, None) if exc is not None else None
        return logging.LogRecord("asyncio", logging.ERROR, __file__, 1, msg, (), info)

    emfile = OSError(24, "Too many open files")
    assert f.filter(record("socket.accept() out of system resource", emfile))
    for i in range(5):
        now[0] += 1
        assert not f.filter(record("socket.accept() out of system resource", emfile))
        assert f.filter(record(f"unrelated {i}"))
    now[0] += 60
    passed = record("redis unavailable: [Errno 24] Too many open files")
    assert f.filter(passed)
    assert "5 more like this" in passed.getMessage()


def test_redis_out_of_memory_lines_are_limited_apart_from_file_descriptor_lines() -> None:
    """A full Redis fails every session's writes at once: one line a minute says so, and
    it neither hides nor is hidden by the out-of-descriptors lines."""
    now = [0.0]
    f = ResourceErrorFilter(60.0, clock=lambda: now[0])

    def record(msg: str) -> logging.LogRecord:
        return logging.LogRecord("ingest", logging.WARNING, __file__, 1, msg, (), None)

    oom = "session %s: audio append failed (command not allowed when used memory > 'maxmemory'.)"
    assert f.filter(record(oom % "a"))
    assert f.filter(record("socket.accept() out of system resource"))  # another kind
    for sid in "bcdefg":
        now[0] += 1
        assert not f.filter(record(oom % sid))
    now[0] += 60
    passed = record(oom % "h")
    assert f.filter(passed)
    assert "6 more like this" in passed.getMessage()
