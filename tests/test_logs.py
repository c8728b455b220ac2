"""JSON log lines carry the session id as a field."""

from __future__ import annotations

import json
import logging

from common.logs import JsonFormatter


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
