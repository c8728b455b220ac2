"""python -m bench.multichannel: a stereo call of two real speakers (overlap and crosstalk),
at real time, against each of its channels streamed alone; per-channel WER, time to final
and the worker's CPU per second of audio, in one run.

Channel 0 is fw_jfk (11 s), channel 1 ps_librivox_0870 (7.1 s) from 6 s on (5 s of both
talking at once); each channel hears the other at ``--bleed`` (default -30 dB). Runs, one
after another, on one worker (tiny.en int8 on this machine's CPUs):

* ``alone``: each clip as its own mono session, both at once (two sessions, two channels'
  worth of decodes, as the call has);
* ``downmixed``: the call as plain stereo (``channels=2``, mixed to one) — what the
  gateway did before ``multichannel``;
* ``multichannel``: the call with ``multichannel=true``;
* ``multichannel, no crosstalk gate``: the same on a worker with ``CROSSTALK_DB=0``.

CPU: the worker process's user+system seconds over each run (``/proc/PID/stat``), per second
of audio on the call's timeline.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from typing import Any

import numpy as np

from bench.sessions import cpu_seconds, save_report
from common.client import StreamResult, listen_url, stream
from tests.audio_refs import frames, load_pcm16, reference, stereo_call, wer
from tests.procs import Cluster

CLIPS = ("fw_jfk", "ps_librivox_0870")


def median_ttf(res: StreamResult) -> float | None:
    times = res.time_to_final()
    return round(statistics.median(times), 3) if times else None


async def main_async(offset_s: float, bleed: float) -> dict[str, Any]:
    call = stereo_call(CLIPS, offset_s, bleed)
    seconds = len(call) / 16000
    cluster = Cluster(workers=1)
    pid = next(iter(cluster.workers.values())).proc.pid
    report: dict[str, Any] = {"clips": CLIPS, "offset_s": offset_s, "bleed": bleed,
                              "call_s": seconds, "runs": {}}
    try:
        async def timed(name: str, runs: Any) -> list[StreamResult]:
            began = cpu_seconds(pid)
            results = list(await asyncio.gather(*runs))
            cpu = cpu_seconds(pid) - began
            report["runs"][name] = {"worker_cpu_s": round(cpu, 2),
                                    "worker_cpu_per_audio_s": round(cpu / seconds, 3)}
            return results

        tail = np.zeros(32000, np.int16)
        solo = await timed("alone", [
            stream(listen_url(cluster.ws_url), frames(np.concatenate([load_pcm16(c), tail])),
                   pace=1.0) for c in CLIPS])
        for channel, (clip, res) in enumerate(zip(CLIPS, solo, strict=True)):
            report["runs"]["alone"][f"channel_{channel}"] = {
                "wer": round(wer(reference(clip), res.text), 3), "ttf_median_s": median_ttf(res),
                "text": res.text}
        [mixed] = await timed("downmixed", [
            stream(listen_url(cluster.ws_url, channels=2), frames(call), pace=1.0)])
        report["runs"]["downmixed"].update({
            f"wer_channel_{c}": round(wer(reference(clip), mixed.text), 3)
            for c, clip in enumerate(CLIPS)})
        report["runs"]["downmixed"]["text"] = mixed.text
        [multi] = await timed("multichannel", [
            stream(listen_url(cluster.ws_url, multichannel=True, channels=2),
                   frames(call), pace=1.0)])
        for channel, clip in enumerate(CLIPS):
            text = " ".join(f["text"] for f in multi.finals if f["channel"] == channel)
            report["runs"]["multichannel"][f"channel_{channel}"] = {
                "wer": round(wer(reference(clip), text), 3), "text": text}
        report["runs"]["multichannel"]["ttf_median_s"] = median_ttf(multi)
    finally:
        cluster.close()
    # the same call without the crosstalk gate (a worker with CROSSTALK_DB=0)
    cluster = Cluster(workers=1, worker_args=["--crosstalk-db", "0"])
    try:
        [ungated] = await asyncio.gather(
            stream(listen_url(cluster.ws_url, multichannel=True, channels=2),
                   frames(call), pace=1.0))
        row = report["runs"]["multichannel, no crosstalk gate"] = {}
        for channel, clip in enumerate(CLIPS):
            text = " ".join(f["text"] for f in ungated.finals if f["channel"] == channel)
            row[f"channel_{channel}"] = {"wer": round(wer(reference(clip), text), 3),
                                         "text": text}
    finally:
        cluster.close()
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--offset-s", type=float, default=6.0)
    parser.add_argument("--bleed", type=float, default=0.03)
    args = parser.parse_args()
    began = time.monotonic()
    report = asyncio.run(main_async(args.offset_s, args.bleed))
    report["wall_s"] = round(time.monotonic() - began, 1)
    print(json.dumps(report, indent=1, ensure_ascii=False))
    save_report("multichannel", report)


if __name__ == "__main__":
    main()
