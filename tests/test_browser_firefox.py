"""The browser page end to end in stock Firefox (Debian's firefox-esr), driven over
WebDriver BiDi (tests/bidi.py), against the real stack.

Playwright drives only its own Firefox builds, so these tests talk to the browser's
built-in BiDi server instead. Headless Firefox runs an AudioContext only on a real
audio output, so it gets a private PulseAudio server with a null sink (48 kHz).

* Speech: a preload script replaces ``getUserMedia`` with a stream from an
  AudioContext that loops a 16-bit WAV (1 s of silence, the JFK clip, 3 s of
  silence, as the Chromium test's fake device plays). From there on it is the real
  page in real Firefox: its AudioContext at Firefox's rate, the AudioWorklet, the
  framing, ``sample_rate``, the WebSocket and the rendering.
* Firefox's own fake microphone (a tone; no override): the real getUserMedia path
  starts, frames flow, the level meter moves, and the session closes cleanly.
* The microphone blocked in Firefox's permissions, and no sound output at all: the
  page explains each.
* Older Firefox's refusal of a context at another rate than the mic (simulated).
* The scripted server of tests/test_browser.py: a dropped socket resumed with
  session/after, and a refused token sent as a subprotocol.
"""

from __future__ import annotations

import base64
import contextlib
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.audio_refs import load_pcm16, reference, wav16, wer
from tests.bidi import FIREFOX, Firefox, Page, PulseAudio
from tests.test_browser import ScriptedGateway

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOT = ROOT / "docs" / "screenshots" / "browser-firefox.png"
RATE = 16000
LEAD_S = 1.0   # silence before the speech: capture may start a little into the loop
TAIL_S = 3.0   # silence after it, so VAD ends the utterance
CLIP = "fw_jfk"

#: Preload script: getUserMedia answers with a MediaStream fed by an AudioContext
#: that loops the WAV (``__WAV__`` is replaced by its base64) through a
#: MediaStreamAudioDestinationNode. ``window.__fakeMic`` counts calls and records
#: the rate and whether the page stopped the track.
FAKE_MIC_JS = """() => {
  const md = navigator.mediaDevices;
  if (!md) return; // not a secure context: the page reports that itself
  const WAV = "__WAV__";
  const state = (window.__fakeMic = { calls: 0, rate: 0, stopped: false });
  md.getUserMedia = async function (constraints) {
    state.calls += 1;
    if (!constraints || !constraints.audio || constraints.video) {
      throw new DOMException("the test microphone is audio only", "NotSupportedError");
    }
    const bin = atob(WAV);
    const bytes = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
    const ctx = new AudioContext();
    const buffer = await ctx.decodeAudioData(bytes.buffer);
    const src = ctx.createBufferSource();
    src.buffer = buffer;
    src.loop = true;
    const dest = ctx.createMediaStreamDestination();
    dest.channelCount = 1;
    src.connect(dest);
    src.start();
    await ctx.resume();
    state.rate = ctx.sampleRate;
    const track = dest.stream.getAudioTracks()[0];
    const stop = track.stop.bind(track);
    track.stop = () => {
      stop();
      state.stopped = true;
      ctx.close();
    };
    return dest.stream;
  };
}"""


#: Preload script: keeps the tracks getUserMedia hands the page (``window.__micTracks``), so
#: a test sees whether the page released the microphone (every track "ended") without
#: reading the page's own variables.
MIC_SPY_JS = """() => {
  const md = navigator.mediaDevices;
  if (!md) return;
  const tracks = (window.__micTracks = []);
  const real = md.getUserMedia.bind(md);
  md.getUserMedia = async (constraints) => {
    const stream = await real(constraints);
    tracks.push(...stream.getTracks());
    return stream;
  };
}"""


def _speech_wav() -> tuple[bytes, float]:
    pcm = load_pcm16(CLIP)
    loop = np.concatenate([np.zeros(int(LEAD_S * RATE), np.int16), pcm,
                           np.zeros(int(TAIL_S * RATE), np.int16)])
    return wav16(loop), len(loop) / RATE


@pytest.fixture(scope="module")
def pulse() -> Iterator[PulseAudio]:
    if shutil.which("pulseaudio") is None:
        pytest.fail("pulseaudio is not installed (.ci/run installs the Debian package)")
    server = PulseAudio()
    yield server
    server.close()


def _firefox(pulse: PulseAudio | None, **prefs: Any) -> Firefox:
    """Firefox playing to ``pulse``; with None, to no sound device at all."""
    if not Path(FIREFOX).exists():
        pytest.fail("firefox-esr is not installed (.ci/run installs the Debian package)")
    # None: no PulseAudio server at that address (not even a desktop's own), and an empty
    # ALSA configuration (no "default" device), so not even a real sound card is found.
    env = pulse.env if pulse else {"PULSE_SERVER": "unix:/nonexistent/pulse/native",
                                   "ALSA_CONFIG_PATH": "/dev/null"}
    ff = Firefox(prefs, env=env)
    ff.bidi.send("session.subscribe", {"events": ["log.entryAdded"]})
    return ff


@pytest.fixture(scope="module")
def firefox(pulse: PulseAudio) -> Iterator[Firefox]:
    """Firefox with its fake microphone device and no permission prompt."""
    ff = _firefox(pulse, **{"media.navigator.streams.fake": True})
    yield ff
    ff.close()


@contextlib.contextmanager
def _tab(ff: Firefox) -> Iterator[tuple[Page, list[str]]]:
    """A new tab and the console messages and uncaught errors of its pages."""
    page = ff.new_page()
    console: list[str] = []

    def on_log(entry: dict[str, Any]) -> None:
        if entry.get("source", {}).get("context") == page.context:
            console.append(f"{entry.get('level')}: {entry.get('type')}: {entry.get('text')}")

    ff.bidi.on("log.entryAdded", on_log)
    try:
        yield page, console
    finally:
        ff.bidi.off("log.entryAdded", on_log)
        with contextlib.suppress(Exception):
            ff.close_page(page)


@contextlib.contextmanager
def _preload(ff: Firefox, page: Page, js: str) -> Iterator[None]:
    """``js`` runs in ``page`` before the page's own scripts, on every load."""
    script = ff.bidi.send("script.addPreloadScript", {
        "functionDeclaration": js, "contexts": [page.context]})["script"]
    try:
        yield
    finally:
        ff.bidi.send("script.removePreloadScript", {"script": script})


def _mic_tracks(page: Page) -> list[dict[str, str]]:
    """The tracks the page got from getUserMedia (MIC_SPY_JS): label and readyState."""
    return list(page.evaluate(
        "window.__micTracks.map(t => ({kind: t.kind, label: t.label, state: t.readyState}))"))


def _capture_rate(page: Page) -> int:
    """The capture rate the page sends as ``sample_rate`` (documented ``data-rate``)."""
    return int(page.evaluate(
        "document.querySelector('[data-testid=capture-info]').dataset.rate"))


def _state(page: Page) -> str:
    return str(page.evaluate("document.querySelector('[data-testid=conn-state]').dataset.state"))


def _wait_state(page: Page, state: str, timeout: float) -> None:
    page.wait_for("document.querySelector('[data-testid=conn-state]').dataset.state === "
                  + json.dumps(state), timeout)


def _wait_audio_sent(page: Page, seconds: float, timeout: float) -> None:
    page.wait_for("parseFloat(document.querySelector('[data-testid=audio-sent]').dataset.seconds)"
                  f" >= {seconds}", timeout)


def _finals(page: Page) -> list[dict[str, Any]]:
    return list(page.evaluate("""[...document.querySelectorAll('[data-testid=final]')].map(e => ({
        start: parseFloat(e.dataset.start), end: parseFloat(e.dataset.end),
        text: e.querySelector('.text').textContent}))"""))


def _closed_cleanly(page: Page) -> dict[str, Any]:
    return dict(page.evaluate("""(() => {
        const c = document.querySelector('[data-testid=conn-state]');
        return {state: c.dataset.state, code: c.dataset.closeCode, closed: c.dataset.closed,
                error: document.querySelector('[data-testid=error]').hidden
                       ? '' : document.querySelector('[data-testid=error]').textContent,
                partials: document.querySelectorAll('[data-testid=partial]').length,
                startEnabled: !document.querySelector('[data-testid=start]').disabled};
    })()"""))


def _errors(console: list[str]) -> list[str]:
    return [c for c in console if c.startswith("error")]


def test_firefox_transcribes_speech_live_and_closes_cleanly(
        stack: Any, firefox: Firefox) -> None:
    wav, loop_s = _speech_wav()
    with _tab(firefox) as (page, console):
        script = firefox.bidi.send("script.addPreloadScript", {
            "functionDeclaration": FAKE_MIC_JS.replace("__WAV__", base64.b64encode(wav).decode()),
            "contexts": [page.context]})["script"]
        try:
            page.set_viewport(1180, 820)
            page.navigate(stack.http_url + "/")
            t0 = time.monotonic()
            page.click("[data-testid=start]")

            # Live: a session id, then a partial with a stable/unstable split, then a final.
            _wait_state(page, "live", 20)
            assert page.evaluate(
                "document.querySelector('[data-testid=session-id]').textContent.trim()") \
                not in ("", "—")
            page.wait_for("document.querySelector('[data-testid=partial]') !== null", 30)
            t_partial = time.monotonic() - t0
            page.screenshot(SCREENSHOT)
            page.wait_for("document.querySelector('[data-testid=final]') !== null", 30)
            t_final = time.monotonic() - t0
            # A nicer artifact, when it happens: a final with the next partial below it.
            with contextlib.suppress(TimeoutError):
                page.wait_for("""(() => {
                    const p = document.querySelector('[data-testid=final] ~ [data-testid=partial]');
                    return !!(p && p.querySelector('.stable').textContent.trim()
                              && p.querySelector('.unstable').textContent.trim());
                })()""", 6)
                page.screenshot(SCREENSHOT)

            # Stop once the first pass of the loop (speech and its trailing silence) is sent.
            _wait_audio_sent(page, loop_s - 1.0, 40)
            page.click("[data-testid=stop]")
            t_stop = time.monotonic() - t0

            # Stop drains: the last finals, then `closed`, then close code 1000.
            _wait_state(page, "closed", 60)
            t_closed = time.monotonic() - t0
            end = _closed_cleanly(page)
            assert end == {"state": "closed", "code": "1000", "closed": "true", "error": "",
                           "partials": 0, "startEnabled": True}, (end, console)

            mic = page.evaluate("window.__fakeMic")
            rate = _capture_rate(page)
            info = page.evaluate("document.querySelector('[data-testid=capture-info]').textContent")
            latency = page.evaluate(
                "document.querySelector('[data-testid=latency]').dataset.ms || null")
            finals = _finals(page)
            hyp = " ".join(f["text"] for f in finals)
            score = wer(reference(CLIP), hyp)
            print(f"\nfirefox {firefox.version}: capture {rate} Hz ({info}); partial "
                  f"{t_partial:.1f}s, final {t_final:.1f}s, stop {t_stop:.1f}s, closed "
                  f"{t_closed:.1f}s; {len(finals)} finals; time-to-final {latency} ms; "
                  f"WER {score:.3f}; hyp={hyp!r}")
            # The stream came from the test's getUserMedia, at the rate the page captured.
            assert mic["calls"] == 1 and mic["stopped"] is True, mic
            assert rate == mic["rate"] and 8000 <= rate <= 48000, (rate, mic)
            assert finals, console
            assert all(0 <= f["start"] <= f["end"] <= loop_s + 1 for f in finals), finals
            assert score <= 0.15, (hyp, console)
            assert latency is not None and int(latency) > 0
            assert not _errors(console), console
        finally:
            firefox.bidi.send("script.removePreloadScript", {"script": script})


def test_firefox_captures_from_its_own_microphone_device(
        stack: Any, firefox: Firefox) -> None:
    """No override: Firefox's fake device (a tone) through the real getUserMedia."""
    with _tab(firefox) as (page, console), _preload(firefox, page, MIC_SPY_JS):
        page.navigate(stack.http_url + "/")
        assert page.evaluate("window.__fakeMic === undefined")
        page.click("[data-testid=start]")
        _wait_state(page, "live", 20)
        # Frames flow (so the audio context runs) and the meter shows the tone.
        _wait_audio_sent(page, 2.0, 20)
        page.wait_for("+document.querySelector('[data-testid=level]')"
                      ".getAttribute('aria-valuenow') > 10", 10)
        tracks = _mic_tracks(page)
        rate = _capture_rate(page)
        assert [t["state"] for t in tracks] == ["live"], tracks
        assert 8000 <= rate <= 48000, rate
        page.click("[data-testid=stop]")
        _wait_state(page, "closed", 60)
        end = _closed_cleanly(page)
        assert end == {"state": "closed", "code": "1000", "closed": "true", "error": "",
                       "partials": 0, "startEnabled": True}, (end, console)
        # The page released the microphone.
        assert [t["state"] for t in _mic_tracks(page)] == ["ended"], _mic_tracks(page)
        print(f"\nfirefox fake device: {tracks} at {rate} Hz; finals {_finals(page)}")
        assert not _errors(console), console


def _start_expecting_error(page: Page, url: str, timeout: float) -> str:
    """Open the page, press Start, wait for the error state; the error text, once Start is
    usable again."""
    page.navigate(url + "/")
    page.click("[data-testid=start]")
    _wait_state(page, "error", timeout)
    assert page.evaluate("!document.querySelector('[data-testid=start]').disabled")
    return str(page.evaluate("document.querySelector('[data-testid=error]').textContent"))


def test_firefox_explains_a_blocked_microphone(
        pulse: PulseAudio, scripted: ScriptedGateway) -> None:
    """The microphone blocked in Firefox's settings (permissions.default.microphone = 2)."""
    ff = _firefox(pulse, **{"media.navigator.streams.fake": True,
                            "media.navigator.permission.disabled": False,
                            "permissions.default.microphone": 2})
    try:
        with _tab(ff) as (page, console), _preload(ff, page, MIC_SPY_JS):
            text = _start_expecting_error(page, scripted.url, 10)
            assert "Microphone access was denied" in text, text
            # Nothing was opened without a microphone: no request reached the server.
            assert scripted.credentials == [] and scripted.queries == []
            assert _mic_tracks(page) == []
            assert page.evaluate(
                "document.querySelector('[data-testid=session-id]').textContent") == "—"
            assert not _errors(console), console
    finally:
        ff.close()


def test_firefox_explains_a_missing_sound_output(scripted: ScriptedGateway) -> None:
    """Without any audio output Firefox keeps every AudioContext suspended (resume()
    never settles): the page says so after a few seconds instead of waiting for good."""
    ff = _firefox(None, **{"media.navigator.streams.fake": True})
    try:
        with _tab(ff) as (page, console), _preload(ff, page, MIC_SPY_JS):
            text = _start_expecting_error(page, scripted.url, 15)
            assert "Audio processing did not start" in text, text
            # The page released the microphone it got, and opened no socket.
            tracks = _mic_tracks(page)
            assert tracks and all(t["state"] == "ended" for t in tracks), tracks
            assert scripted.credentials == [] and scripted.queries == []
            assert not _errors(console), console
    finally:
        ff.close()


#: Older Firefox throws NotSupportedError from createMediaStreamSource when the mic's
#: audio graph runs at another rate than the context. Simulated here for a mic at 32 kHz.
REFUSE_OTHER_RATES_JS = """() => {
  const orig = AudioContext.prototype.createMediaStreamSource;
  window.__refused = [];
  AudioContext.prototype.createMediaStreamSource = function (stream) {
    if (this.sampleRate !== 32000) {
      window.__refused.push(this.sampleRate);
      throw new DOMException("AudioContext.createMediaStreamSource: Connecting AudioNodes "
        + "from AudioContexts with different sample-rate is currently not supported.",
        "NotSupportedError");
    }
    return orig.call(this, stream);
  };
}"""


def test_firefox_follows_the_mic_rate_when_the_default_context_is_refused(
        stack: Any, firefox: Firefox) -> None:
    with _tab(firefox) as (page, console):
        script = firefox.bidi.send("script.addPreloadScript", {
            "functionDeclaration": REFUSE_OTHER_RATES_JS, "contexts": [page.context]})["script"]
        try:
            page.navigate(stack.http_url + "/")
            page.click("[data-testid=start]")
            _wait_state(page, "live", 20)
            _wait_audio_sent(page, 1.0, 20)
            page.wait_for("+document.querySelector('[data-testid=level]')"
                          ".getAttribute('aria-valuenow') > 10", 10)
            assert _capture_rate(page) == 32000
            assert page.evaluate("window.__refused")[0] == 48000  # the default context
            assert page.evaluate(
                "document.querySelector('[data-testid=capture-info]').textContent"
            ).startswith("32 kHz mono")
            page.click("[data-testid=stop]")
            _wait_state(page, "closed", 60)
            end = _closed_cleanly(page)
            assert end["code"] == "1000" and end["closed"] == "true" and not end["error"], end
            assert not _errors(console), console
        finally:
            firefox.bidi.send("script.removePreloadScript", {"script": script})


# The scripted stand-in server of tests/test_browser.py (it serves the same static files):
# what the real stack can't be made to do on demand, as Firefox sees it.


@pytest.fixture
def scripted() -> Iterator[ScriptedGateway]:
    server = ScriptedGateway()
    yield server
    server.close()


def test_firefox_resumes_a_dropped_session_without_repeating_text(
        firefox: Firefox, scripted: ScriptedGateway) -> None:
    with _tab(firefox) as (page, _console):
        page.navigate(scripted.url + "/")
        page.click("[data-testid=start]")
        page.wait_for("document.querySelector(\"[data-testid=warning][data-code='server:lagging']\")"
                      " !== null", 15)
        # After the drop (1006) the page reconnects with session/after and gets the next final.
        page.wait_for("document.querySelectorAll('[data-testid=final]').length >= 2", 15)
        page.wait_for("document.querySelector('[data-testid=partial]') !== null", 10)
        assert _state(page) == "live"
        page.click("[data-testid=stop]")
        _wait_state(page, "closed", 15)
        texts = [f["text"].strip() for f in _finals(page)]
        assert texts == ["Hello world.", "This is a test.", "Of resuming."]
        assert _closed_cleanly(page)["code"] == "1000"
        assert not scripted.errors, scripted.errors
        first, second = scripted.queries
        assert first["encoding"] == "pcm_s16le" and first["sample_rate"] == "48000"
        assert second["session"] == "s1" and second["after"] == "4"
        assert all(b > 0 and b % 2 == 0 for b in scripted.audio_bytes), scripted.audio_bytes


def test_firefox_sends_its_token_as_a_subprotocol_and_explains_a_refusal(
        firefox: Firefox, scripted: ScriptedGateway) -> None:
    with _tab(firefox) as (page, _console):
        page.navigate(scripted.url + "/?token=bad")
        assert "token" not in page.evaluate("location.href")
        page.click("[data-testid=start]")
        _wait_state(page, "error", 15)
        page.wait_for("document.querySelector('[data-testid=error]').textContent.length > 0", 10)
        text = page.evaluate("document.querySelector('[data-testid=error]').textContent")
        assert "Authentication failed" in text, text
        # The upgrade (as a bearer.<token> subprotocol), then one plain GET for the status.
        assert scripted.credentials == ["bad", "bad"]
        assert scripted.queries == []
