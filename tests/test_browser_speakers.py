"""The browser page's speaker labels end to end: headless Chromium's fake microphone plays two
real voices taking turns, the page asks for ``diarize=true``, shows each final after its
speaker's coloured name, and a person renames a speaker for the page and the downloads."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from playwright.sync_api import sync_playwright

from bench.diarize import build, whole_clip
from tests.audio_refs import wav16
from tests.test_browser import CHROMIUM

pytestmark = pytest.mark.integration

TURNS = [("mfa", "mfa_her", 0.8), ("librivox", "ps_librivox_0870", 0.8),
         ("mfa", "mfa_thoughts", 3.0)]


@pytest.fixture(scope="module")
def two_voices_mic(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    conv = build("page", [whole_clip(v, c) for v, c, _ in TURNS], [g for _, _, g in TURNS],
                 lead_s=1.0, tail_s=0.0)
    path = tmp_path_factory.mktemp("speakers") / "two_voices.wav"
    path.write_bytes(wav16(conv.pcm.astype(np.int16)))
    return path, conv.seconds


@pytest.fixture(scope="module")
def browser(two_voices_mic: tuple[Path, float]) -> Iterator[Any]:
    if not Path(CHROMIUM).exists():
        pytest.fail("chromium is not installed (.ci/run installs the Debian package)")
    args = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
            "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={two_voices_mic[0]}",
            "--autoplay-policy=no-user-gesture-required"]
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=args)
        yield b
        b.close()


def test_the_page_labels_speakers_and_a_person_renames_one(
        stack: Any, browser: Any, two_voices_mic: tuple[Path, float]) -> None:
    loop_s = two_voices_mic[1]
    context = browser.new_context(permissions=["microphone"], accept_downloads=True)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    try:
        page.goto(stack.http_url + "/")
        page.locator("details summary").first.click()  # the settings
        page.get_by_test_id("opt-diarize").check()
        page.get_by_test_id("start").click()
        page.wait_for_function(
            "s => parseFloat(document.querySelector('[data-testid=audio-sent]')"
            ".dataset.seconds) >= s", arg=loop_s - 0.5, timeout=60_000)
        page.get_by_test_id("stop").click()
        page.wait_for_selector("[data-testid=conn-state][data-state=closed]", timeout=60_000)

        rows = page.evaluate("""() => [...document.querySelectorAll('[data-testid=final]')]
            .filter(e => e.querySelector('.text').textContent.trim())
            .map(e => [...e.querySelectorAll('.speaker')].map(t => t.dataset.speaker))""")
        assert len(rows) >= 3 and all(rows), rows
        firsts = [r[0] for r in rows]
        assert firsts[0] == "0" and "1" in firsts, firsts  # the second voice is someone else
        tag = page.locator(".speaker[data-speaker='1']").first
        assert tag.inner_text() == "Speaker 2"
        assert tag.evaluate("e => getComputedStyle(e).color") != page.locator(
            ".speaker[data-speaker='0']").first.evaluate("e => getComputedStyle(e).color")

        page.once("dialog", lambda d: d.accept("Marianne"))
        tag.click()
        assert {t.strip() for t in page.locator(".speaker[data-speaker='1']").all_inner_texts()} \
            == {"Marianne"}
        with page.expect_download() as info:
            page.get_by_test_id("download-vtt").click()
        vtt = Path(info.value.path()).read_text()
        assert "<v Marianne>" in vtt and "<v Speaker 1>" in vtt, vtt
        assert not errors, errors
    finally:
        context.close()
