"""Keyterms (``keyterm=``, ``prompt=``): recall of rare words with and without them, and what
they cost on speech that does not contain them. In process, through the worker's streaming
core (the real model, Silero VAD, 100 ms chunks, partials and speculative finals on), as
``bench.finals`` does.

    python -m bench.keyterms

* rare terms spoken inside sentences: the four real recordings of ``../shared/audio`` that
  say "Montreal Forced Aligner" (which tiny.en hears as "for a Seliner", "forced the
  liner", ...), and sentences with names and product words spoken by espeak-ng (a robotic
  voice: harder than a person for the model); each streamed without keyterms, then with
  its own terms among ten others (as a client would list a whole glossary);
* the cost: every other English clip of the finals suite streamed without keyterms and
  with the same ten terms, none of which it contains: corpus WER both ways.
"""

from __future__ import annotations

import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import soxr

from bench.finals import FINALS_CLIPS, _session, _Timed, corpus_wer
from bench.sessions import save_report
from common.settings import TranscriberSettings, load
from tests.audio_refs import load_pcm16, normalize, reference
from transcriber.config import resolve_tails
from transcriber.model import WhisperDecoder, load_whisper
from transcriber.vad import SileroVad

RATE = 16000

#: (clip, its terms) from ../shared/audio.
REAL = [("mfa_words", ["Montreal Forced Aligner"]), ("mfa_crossword", ["Montreal Forced Aligner"]),
        ("mfa_uhum", ["Montreal Forced Aligner"]), ("mfa_her", ["Montreal Forced Aligner"])]
#: (sentence, its terms), spoken by espeak-ng.
SPOKEN = [
    ("Please forward the invoice to Siobhan Okafor before Thursday.", ["Siobhan Okafor"]),
    ("The Zyntrax deployment failed on the staging cluster again.", ["Zyntrax"]),
    ("Our new product, Quillbright Nimbus, launches next week in Reykjavik.",
     ["Quillbright Nimbus", "Reykjavik"]),
    ("Doctor Nguyen prescribed amoxicillin for the infection.", ["Nguyen", "amoxicillin"]),
    ("Ask Priyanka Chaudhry about the Xylophonic integration.",
     ["Priyanka Chaudhry", "Xylophonic"]),
    ("We moved the database from Postgres to Cockroach last spring.", ["Postgres", "Cockroach"]),
    ("Kowalczyk said the Tenerife office closes early on Fridays.", ["Kowalczyk", "Tenerife"]),
    ("The Hyperion Vault backup runs every night at two.", ["Hyperion Vault"]),
]
#: The glossary every session lists: the terms of the spoken sentences and the real clips.
GLOSSARY = sorted({t for _, terms in [*REAL, *SPOKEN] for t in terms})


def spoken(text: str, speed: int = 150) -> np.ndarray:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "s.wav"
        subprocess.run(["espeak-ng", "-v", "en-us", "-s", str(speed), "-w", str(path), text],
                       check=True, capture_output=True)
        audio, rate = sf.read(path, dtype="float32")
    pcm = soxr.resample(audio, rate, RATE)
    return (np.clip(pcm, -1, 1) * 32767).astype(np.int16)


def found(term: str, text: str) -> bool:
    return f" {normalize(term)} " in f" {normalize(text)} "


def glossary_for(terms: list[str], size: int = 10) -> list[str]:
    """The item's own terms among others, ``size`` in all."""
    others = [t for t in GLOSSARY if t not in terms]
    return terms + others[:max(0, size - len(terms))]


def main() -> None:
    s = load(TranscriberSettings, [], environ={})  # the worker's defaults
    model = load_whisper(s.model, s.device, s.compute_type, s.cpu_threads)
    tail, final_tail = resolve_tails(s, cuda=False)
    model.tail_frames = tail
    vad = SileroVad()

    def stream(pcm: np.ndarray, keyterms: list[str]) -> str:
        decoder = WhisperDecoder.from_settings(model, "en", s, final_tail)
        if keyterms:
            decoder.set_bias(keyterms, "", s.keyterm_tokens)
        text, _delays, _promised = _session(pcm, _Timed(decoder), vad, s)
        return text

    items = [(clip, load_pcm16(clip), reference(clip), terms) for clip, terms in REAL] + \
        [(f"espeak {i}", spoken(text), text, terms) for i, (text, terms) in enumerate(SPOKEN)]
    out: dict[str, Any] = {"glossary": GLOSSARY, "items": []}
    recall = {"without": 0, "with": 0}
    total = 0
    refs: list[str] = []
    hyps: dict[str, list[str]] = {"without": [], "with": []}
    for name, pcm, ref, terms in items:
        row: dict[str, Any] = {"item": name, "terms": terms}
        for way, keyterms in (("without", []), ("with", glossary_for(terms))):
            text = stream(pcm, keyterms)
            hits = sum(found(t, text) for t in terms)
            recall[way] += hits
            hyps[way].append(text)
            row[way] = {"text": text, "found": hits}
        refs.append(ref)
        total += len(terms)
        out["items"].append(row)
        print(f"{name}: {row['without']['text']!r} -> {row['with']['text']!r}")
    out["term_recall"] = {way: recall[way] / total for way in recall}
    out["termed_wer"] = {way: corpus_wer(refs, hyps[way]) for way in hyps}

    others = [c for c in FINALS_CLIPS if c not in dict(REAL)]
    began = time.monotonic()
    cost = {way: corpus_wer([reference(c) for c in others],
                            [stream(load_pcm16(c), keyterms) for c in others])
            for way, keyterms in (("without", []), ("with", GLOSSARY[:10]))}
    out["other_clips"] = {"clips": len(others), "wer": cost,
                          "seconds": round(time.monotonic() - began, 1)}
    save_report("keyterms", out)
    print(f"term recall: {recall['without']}/{total} without, {recall['with']}/{total} with "
          f"keyterms; WER of those items {out['termed_wer']}")
    print(f"other clips ({len(others)}), terms absent: WER {cost['without']:.4f} without, "
          f"{cost['with']:.4f} with the 10-term glossary")


if __name__ == "__main__":
    main()
