"""The browser page's ES modules (ingest/static/*.js) outside a browser.

* Their unit tests, ``tests/js/*.test.mjs``, under Node's built-in test runner (no npm
  packages): URLs, message handling, resume and resend, the reconnect policy, the
  transcript model, latency bookkeeping.
* The page's error texts (``ERROR_TEXT`` in protocol.js) against the server's codes:
  every code a /v1/listen client can receive has a sentence, and no sentence is for a
  code the server never sends.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

import common.errors
from common.errors import SttError

ROOT = Path(__file__).resolve().parents[1]
STATIC = ROOT / "ingest" / "static"
JS_TESTS = sorted((ROOT / "tests" / "js").glob("*.test.mjs"))
MIN_NODE = 18  # node:test and --test

#: Server codes a /v1/listen client never receives, and why. Each must still be a code
#: the server has (so this list cannot go stale) and must have no text in the page.
NOT_FOR_LISTEN = {
    "stale_lease": "between a transcriber and Redis: a worker that lost its lease",
    "session_active": "replays of a session still being recorded",
    "too_many_viewers": "viewer sockets (the page's tail recovery ignores their errors)",
    "token_used": "POST /v1/token/revoke",
    "not_configured": "/v1/token on a server without session tokens",
    "not_found": "paths no endpoint serves; the page asks only for /v1/listen",
    "method_not_allowed": "a method an HTTP endpoint does not serve (the page only GETs)",
    "websocket_required": "viewer and replay endpoints asked for over plain HTTP",
}


def _node() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.fail(f"node is not installed: the page's unit tests (tests/js) need Node.js "
                    f"{MIN_NODE} or newer (.ci/run installs Debian's nodejs package)")
    out = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=30)
    match = re.match(r"v(\d+)\.", out.stdout.strip())
    if not match or int(match.group(1)) < MIN_NODE:
        pytest.fail(f"{node} is {out.stdout.strip() or out.stderr.strip()!r}; the page's unit "
                    f"tests need Node.js {MIN_NODE} or newer")
    return node


def test_page_modules_pass_their_node_tests() -> None:
    node = _node()
    assert JS_TESTS, "no tests/js/*.test.mjs"
    proc = subprocess.run([node, "--test", *map(str, JS_TESTS)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    summary = "\n".join(line for line in proc.stdout.splitlines()
                        if re.match(r"# (tests|pass|fail)\b", line))
    print(f"\nnode --test tests/js: {summary.replace(chr(10), ', ')}")
    if proc.returncode != 0:
        pytest.fail(f"node --test failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}",
                    pytrace=False)


def _page_codes() -> dict[str, list[str]]:
    """The code sets protocol.js exports, read by Node from the module itself."""
    script = """
const m = await import(process.argv[1]);
console.log(JSON.stringify({
  text: Object.keys(m.ERROR_TEXT), detail: [...m.DETAIL_CODES], resumable: [...m.RESUMABLE_ERRORS],
}));"""
    proc = subprocess.run([_node(), "--input-type=module", "-e", script,
                           (STATIC / "protocol.js").as_uri()],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    codes: dict[str, list[str]] = json.loads(proc.stdout)
    return codes


def _subclasses(cls: type[SttError]) -> Iterator[type[SttError]]:
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def _server_codes() -> dict[str, str]:
    """Every error code of the processes a page talks to: SttError and its subclasses in
    common/, ingest/ and fanout/ (each module imported, so classes outside common/errors.py
    count too). Code → where it is defined."""
    for package in ("common", "ingest", "fanout"):
        path = [str(ROOT / package)]
        for info in pkgutil.iter_modules(path):
            if not info.name.startswith("__"):
                importlib.import_module(f"{package}.{info.name}")
    codes = {SttError.code: f"{common.errors.__name__}.{SttError.__name__}"}
    for cls in _subclasses(SttError):
        codes.setdefault(cls.code, f"{cls.__module__}.{cls.__qualname__}")
    return codes


def test_page_has_a_text_for_every_error_code_a_listen_client_can_get() -> None:
    server = _server_codes()
    page = _page_codes()
    text = set(page["text"])
    stale = sorted(set(NOT_FOR_LISTEN) - set(server))
    assert not stale, f"NOT_FOR_LISTEN names codes the server no longer has: {stale}"
    missing = {code: where for code, where in server.items()
               if code not in text and code not in NOT_FOR_LISTEN}
    assert not missing, (
        f"codes without a text in ERROR_TEXT (ingest/static/protocol.js): {missing}; add a "
        f"sentence, or add the code to NOT_FOR_LISTEN here if /v1/listen never sends it")
    unknown = sorted((text | set(page["detail"]) | set(page["resumable"])) - set(server))
    assert not unknown, f"protocol.js has codes the server never sends: {unknown}"
    shadowed = sorted(text & set(NOT_FOR_LISTEN))
    assert not shadowed, f"texts for codes a /v1/listen client never gets: {shadowed}"
    assert set(page["detail"]) <= text and set(page["resumable"]) <= text, page
