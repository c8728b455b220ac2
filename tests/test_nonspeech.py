"""Nothing is invented on non-speech (issue 24): silence, room noise, mains hum, music-like
tones, clicks and breathing-like bursts (numpy-made, bench/material.py) streamed through
the worker's streaming core with the real model and Silero VAD give no final and no
partial: no "Thank you.", no "Thanks for watching!", no repeated phrase.

The same material decoded offline (faster-whisper, whole file) gives "You" on silence and
"Thank you." on the arpeggio (bench/robustness.py), so the guards are doing work. A second
set streams it with a VAD that calls every window speech, as a VAD fooled by the noise (or
a lower speech threshold) would: then only the decoder's own guards stand between the
noise and the transcript.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from bench import material as mat
from bench.robustness import StreamRun, _decoder, stream
from common.settings import TranscriberSettings, load

# (kind, seconds): ~21 s through Silero (cheap: it calls none of it speech), ~13 s with the
# VAD forced open (every partial and final decoded).
SILERO_CASES = [("silence", 2.0), ("room", 2.0), ("brown", 2.0), ("hum50", 2.0),
                ("hum60", 2.0), ("chords", 3.0), ("arpeggio", 3.0), ("clicks", 2.0),
                ("breathing", 3.0)]
OPEN_VAD_CASES = [("silence", 2.0), ("room", 2.0), ("hum50", 2.0), ("arpeggio", 3.0),
                  ("clicks", 2.0), ("breathing", 2.0)]


@pytest.fixture(scope="module")
def run() -> Iterator[Callable[[str, float, bool], StreamRun]]:
    from transcriber.model import load_whisper
    from transcriber.vad import SileroVad

    settings = load(TranscriberSettings, [], environ={})
    model = load_whisper("", "cpu", "int8", 0)
    vad = SileroVad()

    def go(kind: str, seconds: float, open_vad: bool) -> StreamRun:
        audio = mat.NONSPEECH[kind](seconds, 24)
        return stream(audio, _decoder(model, settings), None if open_vad else vad, settings)

    yield go


def _invented(r: StreamRun) -> list[str]:
    return [*r.finals, *r.partials]


@pytest.mark.parametrize(("kind", "seconds"), SILERO_CASES, ids=[k for k, _ in SILERO_CASES])
def test_non_speech_gives_no_words(run: Callable[[str, float, bool], StreamRun], kind: str,
                                   seconds: float) -> None:
    r = run(kind, seconds, False)
    assert not r.words and not _invented(r), _invented(r)


@pytest.mark.parametrize(("kind", "seconds"), OPEN_VAD_CASES,
                         ids=[k for k, _ in OPEN_VAD_CASES])
def test_non_speech_the_vad_lets_through_gives_no_words(
        run: Callable[[str, float, bool], StreamRun], kind: str, seconds: float) -> None:
    r = run(kind, seconds, True)
    assert r.decoded, "the forced-open VAD sent nothing to a final decode"
    assert not r.words and not _invented(r), _invented(r)
