"""The browser page end to end: real headless Chromium, a fake microphone, the real stack.

Chromium's fake capture device plays a WAV file in a loop (1 s of silence,
the JFK clip, 3 s of silence). The page captures it through its AudioWorklet
and streams it to the gateway; the test reads partials and finals from the DOM.
"""

from __future__ import annotations

import http.client
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.audio_refs import load_pcm16, reference, wav16, wer

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOT = ROOT / "docs" / "screenshots" / "browser.png"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
RATE = 16000
LEAD_S = 1.0   # silence before the speech: capture may start a little into the file
TAIL_S = 3.0   # silence after it, so VAD ends the utterance
CLIP = "fw_jfk"


def _fake_mic_wav(directory: Path) -> tuple[Path, float]:
    pcm = load_pcm16(CLIP)
    silence = np.zeros
    loop = np.concatenate([silence(int(LEAD_S * RATE), np.int16), pcm,
                           silence(int(TAIL_S * RATE), np.int16)])
    path = directory / "fake_mic.wav"
    path.write_bytes(wav16(loop))
    return path, len(loop) / RATE


@pytest.fixture(scope="module")
def fake_mic(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    return _fake_mic_wav(tmp_path_factory.mktemp("browser"))


@pytest.fixture(scope="module")
def browser(fake_mic: tuple[Path, float]) -> Iterator[Any]:
    sync_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.fail("chromium is not installed (.ci/run installs the Debian package)")
    args = [
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={fake_mic[0]}",
        "--autoplay-policy=no-user-gesture-required",
    ]
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=args)
        yield b
        b.close()


def _get(url: str, path: str) -> tuple[int, str, bytes]:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.getheader("Content-Type", ""), resp.read()
    finally:
        conn.close()


def test_page_and_scripts_are_served_with_their_content_types(stack: Any) -> None:
    expected = {
        "/": "text/html",
        "/index.html": "text/html",
        "/app.js": "text/javascript",
        "/worklet.js": "text/javascript",
        "/style.css": "text/css",
        "/favicon.svg": "image/svg+xml",
    }
    for path, ctype in expected.items():
        status, got, body = _get(stack.http_url, path)
        assert status == 200, path
        mime = got.split(";")[0].strip()
        # ES modules and worklets need a JavaScript MIME type (strict MIME checking).
        if ctype == "text/javascript":
            assert mime in ("text/javascript", "application/javascript"), (path, got)
        else:
            assert mime == ctype, (path, got)
        assert body, path
    status, _, body = _get(stack.http_url, "/")
    assert b'src="app.js"' in body and b'type="module"' in body
    assert _get(stack.http_url, "/nope.js")[0] == 404


def _finals(page: Any) -> list[dict[str, Any]]:
    js = """() => [...document.querySelectorAll('[data-testid=final]')].map(e => ({
        start: parseFloat(e.dataset.start), end: parseFloat(e.dataset.end),
        text: e.querySelector('.text').textContent}))"""
    return list(page.evaluate(js))


def test_page_transcribes_the_microphone_live_and_closes_cleanly(
        stack: Any, browser: Any, fake_mic: tuple[Path, float]) -> None:
    loop_s = fake_mic[1]
    context = browser.new_context(viewport={"width": 1180, "height": 820},
                                  permissions=["microphone"])
    page = context.new_page()
    console: list[str] = []
    page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
    page.on("pageerror", lambda e: console.append(f"pageerror: {e}"))
    try:
        t0 = time.monotonic()
        page.goto(stack.http_url + "/")
        page.get_by_test_id("start").click()

        # Live: a session id, then a partial with a stable/unstable split, then a final.
        page.wait_for_selector("[data-testid=conn-state][data-state=live]", timeout=20_000)
        assert page.get_by_test_id("session-id").inner_text().strip() not in ("", "—")
        page.wait_for_selector("[data-testid=partial]", timeout=30_000)
        t_partial = time.monotonic() - t0
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOT))
        page.wait_for_selector("[data-testid=final]", timeout=30_000)
        t_final = time.monotonic() - t0
        # A nicer artifact: a final and the next partial on screen together, when it happens.
        try:
            page.wait_for_selector("[data-testid=final] ~ [data-testid=partial]", timeout=6_000)
            page.screenshot(path=str(SCREENSHOT))
        except Exception:
            pass

        # Stop once the whole first pass of the loop (speech and its trailing
        # silence, but not the next pass's speech) has been sent.
        page.wait_for_function(
            "s => parseFloat(document.querySelector('[data-testid=audio-sent]')"
            ".dataset.seconds) >= s",
            arg=loop_s - 1.0, timeout=40_000)
        page.get_by_test_id("stop").click()
        t_stop = time.monotonic() - t0

        # Stop drains: the last finals, then `closed`, then close code 1000.
        page.wait_for_selector("[data-testid=conn-state][data-state=closed]", timeout=60_000)
        t_closed = time.monotonic() - t0
        conn = page.get_by_test_id("conn-state")
        assert conn.get_attribute("data-close-code") == "1000"
        assert conn.get_attribute("data-closed") == "true"
        assert page.get_by_test_id("error").is_hidden()
        assert page.locator("[data-testid=partial]").count() == 0
        assert page.get_by_test_id("start").is_enabled()

        finals = _finals(page)
        hyp = " ".join(f["text"] for f in finals)
        score = wer(reference(CLIP), hyp)
        latency = page.get_by_test_id("latency").get_attribute("data-ms")
        print(f"\nbrowser: partial {t_partial:.1f}s, final {t_final:.1f}s, stop {t_stop:.1f}s, "
              f"closed {t_closed:.1f}s; {len(finals)} finals; time-to-final {latency} ms; "
              f"WER {score:.3f}; hyp={hyp!r}")
        assert finals, console
        assert all(0 <= f["start"] <= f["end"] <= loop_s + 1 for f in finals), finals
        assert score <= 0.15, (hyp, console)
        assert latency is not None and int(latency) > 0
        assert not [c for c in console if c.startswith(("error", "pageerror"))], console
    finally:
        context.close()
