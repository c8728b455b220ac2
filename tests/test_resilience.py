"""Crashes, pauses, outages, reconnects and shutdowns, with real processes and real Redis.

Each test owns a private redis-server and its own worker and gateway
processes, and kills, stops, restarts or disconnects them mid-session.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from websockets.asyncio.client import connect

from common.client import StreamResult, listen_url, stream
from tests.audio_refs import frames, load_pcm16, reference, wer
from tests.procs import Cluster, start_gateway, until
from tests.test_pipeline_e2e import check_protocol, with_tail

pytestmark = pytest.mark.integration


class SessionWatch:
    """Collects the session id from the first message, so a test can act on that session."""

    def __init__(self) -> None:
        self.sid: str | None = None
        self.finals: list[tuple[float, dict[str, Any]]] = []
        self.known = asyncio.Event()

    def __call__(self, msg: dict[str, Any]) -> None:
        if msg["type"] == "session":
            self.sid = msg["session_id"]
            self.known.set()
        elif msg["type"] == "final":
            self.finals.append((time.monotonic(), msg))

    async def kill_owner(self, cluster: Cluster, after_s: float,
                         before: Callable[[str], None] | None = None,
                         sig: signal.Signals = signal.SIGKILL) -> str:
        """``after_s`` seconds into the session, SIGKILL (or ``sig``) the worker that owns it
        (``before`` sees its name first); the owner's name."""
        await self.known.wait()
        await asyncio.sleep(after_s)
        assert self.sid is not None
        owner = cluster.owner(self.sid)
        assert owner in cluster.workers
        if before is not None:
            before(owner)
        cluster.workers[owner].signal(sig)
        return owner

    def stream_through_owner_kill(self, cluster: Cluster, url: str,
                                  messages: list[tuple[bytes, float]], after_s: float,
                                  before: Callable[[str], None] | None = None,
                                  sig: signal.Signals = signal.SIGKILL,
                                  **options: Any) -> StreamResult:
        """Stream ``messages`` at real time to ``url`` while ``kill_owner`` runs; the
        client's account (it resumes as a client does)."""
        async def scenario() -> StreamResult:
            res, _ = await asyncio.gather(
                stream(url, messages, pace=1.0, on_message=self, **options),
                self.kill_owner(cluster, after_s, before, sig))
            return res
        return asyncio.run(scenario())


@pytest.fixture
def cluster_factory(request: pytest.FixtureRequest) -> Iterator[Any]:
    made: list[Cluster] = []

    def make(**kwargs: Any) -> Cluster:
        c = Cluster(**kwargs)
        made.append(c)
        return c

    yield make
    failed = getattr(request.node, "rep_call", None)
    for c in made:
        c.close()
        if failed is not None and failed.failed:  # the services' own account, for diagnosis
            print(c.logs())


JFK = with_tail(load_pcm16("fw_jfk"))


#: The survivor takes over after the 3 s lease, about 3 s before the 11 s clip has all been
#: sent, with 4 s of audio to catch up on: it must be under 1 s behind again at most this
#: long after the last audio was sent (the sampling used to stop at the end of the audio,
#: and on a 2-core machine that decodes 2.3x slower than others the catch-up missed it by
#: a fraction of a second in 1 of 3 runs).
CATCH_UP_S = 2.0


def test_sigkill_of_the_owner_mid_utterance_fails_over_with_nothing_lost_or_repeated(
        cluster_factory: Any) -> None:
    cluster = cluster_factory(workers=2, worker_args=["--lease-ms", "3000"])
    baseline = asyncio.run(stream(listen_url(cluster.ws_url), frames(JFK), pace=1.0))
    check_protocol(baseline)
    watch = SessionWatch()
    killed: dict[str, Any] = {}

    async def scenario() -> StreamResult:
        async def killer() -> None:
            def before(owner: str) -> None:
                killed["name"], killed["at"] = owner, time.monotonic()
                killed["finals_before"] = len(watch.finals)
            # the point in the clip is the case: inside "what your country can do for you"
            await watch.kill_owner(cluster, 6.0, before)

        async def lag_sampler() -> None:
            """(time, lag) pairs: audio sent so far minus audio the owner has processed,
            until CATCH_UP_S after the last audio was sent."""
            await watch.known.wait()
            started = time.monotonic()
            duration = len(JFK) / 16000
            r = cluster.redis.client()
            while time.monotonic() - started < duration + CATCH_UP_S:
                processed = await asyncio.to_thread(
                    r.hget, f"stt:{{{watch.sid}}}:meta", "processed_sample")
                now = time.monotonic()
                sent = min(now - started, duration)
                lags.append((now, sent - int(processed or 0) / 16000))
                await asyncio.sleep(0.2)

        res, _, _ = await asyncio.gather(
            stream(listen_url(cluster.ws_url), frames(JFK), pace=1.0, on_message=watch),
            killer(), lag_sampler())
        return res

    lags: list[tuple[float, float]] = []
    res = asyncio.run(scenario())
    check_protocol(res)  # one final per index, seq strictly increasing, closed, 1000
    assert watch.sid is not None
    survivor = cluster.owner(watch.sid)
    assert survivor != killed["name"]
    base_wer, new_wer = wer(reference("fw_jfk"), baseline.text), wer(reference("fw_jfk"), res.text)
    assert new_wer <= base_wer + 0.02, (res.text, baseline.text)
    after_kill = [at for at, _ in watch.finals[killed["finals_before"]:]]
    assert after_kill, "no final after the kill"
    after = [(t, lag) for t, lag in lags if t > killed["at"]]
    peak_at, peak = max(after, key=lambda x: x[1])
    recovered = next((t for t, lag in after if t > peak_at and lag < 1.0), None)
    assert recovered is not None, f"lag never recovered: {after}"
    print(f"\nfailover gap (kill → next final): {after_kill[0] - killed['at']:.2f} s; "
          f"lag peaked at {peak:.2f} s and was under 1 s again "
          f"{recovered - killed['at']:.2f} s after the kill ({recovered - peak_at:.2f} s "
          f"after the peak); WER {new_wer:.3f} vs undisturbed {base_wer:.3f}")


def test_a_paused_owner_that_wakes_after_takeover_writes_nothing(cluster_factory: Any) -> None:
    cluster = cluster_factory(workers=2, worker_args=["--lease-ms", "2000"])
    watch = SessionWatch()
    info: dict[str, Any] = {}

    async def scenario() -> StreamResult:
        async def pauser() -> None:
            await watch.known.wait()
            sid = watch.sid
            assert sid is not None
            # paused once it has written: its writes are the ones to fence out
            await until("the owner's first result", lambda: any(
                int(f[b"epoch"]) > 0 for f in cluster.result_entries(sid)), 20)
            owner = cluster.owner(sid)
            assert owner is not None
            info["stale"] = owner
            cluster.workers[owner].signal(signal.SIGSTOP)
            await until("the takeover", lambda: cluster.owner(sid) != owner, 20)
            info["epoch"] = epoch = int(cluster.meta(sid)["epoch"])
            # woken while the new owner writes
            await until("the new owner's first result", lambda: any(
                int(f[b"epoch"]) >= epoch for f in cluster.result_entries(sid)), 20)
            cluster.workers[owner].signal(signal.SIGCONT)

        res, _ = await asyncio.gather(
            stream(listen_url(cluster.ws_url), frames(JFK), pace=1.0, on_message=watch),
            pauser())
        return res

    res = asyncio.run(scenario())
    check_protocol(res)
    assert watch.sid is not None
    assert wer(reference("fw_jfk"), res.text) <= 0.10, res.text
    epochs = [int(f[b"epoch"]) for f in cluster.result_entries(watch.sid)]
    first_new = next(i for i, e in enumerate(epochs) if e >= info["epoch"])
    # nothing of the old owner's epoch (or older) after the new owner's first entry
    assert all(e >= info["epoch"] or e == 0 for e in epochs[first_new:]), epochs
    # and the woken owner found out: its next renewal (every LEASE_MS / 3) or its next
    # write (refused: StaleLease) tells it, and it stops the session
    stale = cluster.workers[info["stale"]]
    stale.wait_log(f"session {watch.sid}: lease lost to another worker; stopping", 10)


def test_a_redis_restart_mid_session_loses_no_audio(cluster_factory: Any) -> None:
    cluster = cluster_factory(workers=1, persistence=True)
    watch = SessionWatch()

    async def scenario() -> StreamResult:
        async def restart() -> None:
            await watch.known.wait()
            await asyncio.sleep(4.0)  # the case: mid-session,
            await asyncio.to_thread(cluster.redis.stop)
            await asyncio.sleep(3.0)  # a 3 s outage
            await asyncio.to_thread(cluster.redis.start)

        res, _ = await asyncio.gather(
            stream(listen_url(cluster.ws_url), frames(JFK), pace=1.0, on_message=watch),
            restart())
        return res

    res = asyncio.run(scenario())
    check_protocol(res)
    assert watch.sid is not None
    assert wer(reference("fw_jfk"), res.text) <= 0.10, res.text
    entries = cluster.redis.client().xrange(f"stt:{{{watch.sid}}}:audio")
    import msgpack

    bodies = [msgpack.unpackb(f[b"m"]) for _id, f in entries]
    audio = [b for b in bodies if b["k"] == "audio"]
    assert sum(len(b["pcm"]) // 2 for b in audio) == len(JFK)
    offsets = [b["off"] for b in audio]
    assert offsets == sorted(offsets) and offsets[0] == 0
    assert res.closed_duration == pytest.approx(len(JFK) / 16000, abs=0.01)


def test_reconnect_with_after_delivers_every_result_exactly_once(cluster_factory: Any) -> None:
    cluster = cluster_factory(workers=1)
    parts = frames(JFK)
    half = len(parts) // 2

    async def scenario() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        first: list[dict[str, Any]] = []
        async with connect(listen_url(cluster.ws_url), compression=None) as ws:
            start = time.monotonic()
            reader = asyncio.create_task(_collect(ws, first))
            for i, (payload, _s) in enumerate(parts[:half]):
                await asyncio.sleep(max(0.0, start + i * 0.1 - time.monotonic()))  # real time
                await ws.send(payload)
            sid = first[0]["session_id"]
            await until("the first half stored", lambda: stored_seq(cluster, sid) >= half)
            ws.transport.abort()  # the network drops: no close frame
            reader.cancel()
        last_seq = max((m["seq"] for m in first if "seq" in m), default=0)
        # the case: away for a while, as results keep coming (the worker is behind the audio)
        await asyncio.sleep(1.5)
        url = listen_url(cluster.ws_url, session=sid, after=last_seq)
        second = await stream(url, parts[half:], pace=1.0)
        assert second.messages[0].message["resumed"] is True
        return first, [r.message for r in second.messages]

    first, second = asyncio.run(scenario())
    results = [m for m in first[1:] + second[1:]]
    seqs = [m["seq"] for m in results]
    assert len(seqs) == len(set(seqs)), "a result was delivered twice"
    assert seqs == list(range(1, len(seqs) + 1)), "a result was lost"
    finals = [m for m in results if m["type"] == "final"]
    assert [f["utterance"] for f in finals] == list(range(len(finals)))
    text = " ".join(f["text"] for f in finals)
    assert wer(reference("fw_jfk"), text) <= 0.10, text
    assert second[-1]["type"] == "closed"


async def _collect(ws: Any, out: list[dict[str, Any]]) -> None:
    async for raw in ws:
        out.append(json.loads(raw))


def stored_seq(cluster: Cluster, sid: str) -> int:
    """The last audio entry of the session stored (one per audio message sent)."""
    return int(cluster.meta(sid).get("audio_seq", 0))


CLIPS = ["fw_jfk", "ds_ldc93s1", "ls_6930-75918-0000"]


@pytest.mark.long
def test_three_workers_share_nine_sessions_by_capacity(cluster_factory: Any) -> None:
    cluster = cluster_factory(workers=3, worker_args=["--capacity", "3", "--cpu-threads", "1"])
    clips = [CLIPS[i % 3] for i in range(9)]
    watches = [SessionWatch() for _ in clips]

    async def all_sessions() -> list[StreamResult]:
        return await asyncio.gather(*(
            stream(listen_url(cluster.ws_url, interim_results=False),
                   frames(with_tail(load_pcm16(c))), pace=1.0, on_message=w, read_timeout=240)
            for c, w in zip(clips, watches, strict=True)))

    results = asyncio.run(all_sessions())
    owners: dict[str, int] = {}
    for clip, res, w in zip(clips, results, watches, strict=True):
        check_protocol(res)
        assert w.sid is not None
        owner = cluster.owner(w.sid)
        assert owner is not None
        owners[owner] = owners.get(owner, 0) + 1
        assert wer(reference(clip), res.text) <= 0.35, (clip, res.text)
    assert owners == {"w1": 3, "w2": 3, "w3": 3}


def test_sigterm_hands_sessions_over_without_waiting_for_the_lease(cluster_factory: Any) -> None:
    cluster = cluster_factory(workers=2, worker_args=["--lease-ms", "60000"])
    watch = SessionWatch()
    info: dict[str, Any] = {}

    def before(owner: str) -> None:
        info["owner"], info["at"] = owner, time.monotonic()

    res = watch.stream_through_owner_kill(cluster, listen_url(cluster.ws_url), frames(JFK),
                                          4.0, before, signal.SIGTERM)  # mid-session
    check_protocol(res)
    assert watch.sid is not None
    assert cluster.owner(watch.sid) != info["owner"]
    assert wer(reference("fw_jfk"), res.text) <= 0.10, res.text
    finished = res.messages[-1].at - info["at"]
    assert finished < 30.0, f"took {finished:.1f} s: waited for the 60 s lease?"
    assert cluster.workers[info["owner"]].proc.wait(10) == 0


def test_gateway_shutdown_closes_clients_with_1012(cluster_factory: Any) -> None:
    cluster = cluster_factory(workers=1)

    async def scenario() -> int | None:
        async with connect(listen_url(cluster.ws_url)) as ws:
            await ws.recv()
            await ws.send(np.zeros(1600, dtype=np.int16).tobytes())
            await asyncio.to_thread(cluster.gateway.stop)
            with pytest.raises(Exception):  # noqa: B017
                while True:
                    await ws.recv()
            return ws.close_code

    assert asyncio.run(scenario()) == 1012


def test_backlog_bound_refuses_new_sessions_with_1013_and_queued_clients_are_told(
        cluster_factory: Any) -> None:
    cluster = cluster_factory(workers=0, gateway_args=["--max-backlog", "1"])

    async def scenario() -> tuple[list[dict[str, Any]], StreamResult]:
        got: list[dict[str, Any]] = []
        async with connect(listen_url(cluster.ws_url)) as ws:
            reader = asyncio.create_task(_collect(ws, got))
            await ws.send(np.zeros(1600, dtype=np.int16).tobytes())
            await until("the queued session told its position",
                        lambda: any(m["type"] == "warning" for m in got))
            refused = await stream(listen_url(cluster.ws_url), frames(JFK[:16000]), pace=None)
            reader.cancel()
        return got, refused

    try:
        queued, refused = asyncio.run(scenario())
    finally:
        print(cluster.gateway.log()[-3000:])
    warnings = [m for m in queued if m["type"] == "warning"]
    assert warnings and warnings[0]["code"] == "queued" and "position 1" in warnings[0]["message"]
    assert refused.close_code == 1013
    assert refused.of_type("error")[0]["code"] == "overloaded"


def stored_audio(cluster: Cluster, sid: str) -> list[dict[str, Any]]:
    import msgpack

    entries = cluster.redis.client().xrange(f"stt:{{{sid}}}:audio")
    return [b for b in (msgpack.unpackb(f[b"m"]) for _id, f in entries) if b["k"] == "audio"]


def test_a_gateway_killed_with_audio_buffered_in_an_outage_loses_none_of_it(
        cluster_factory: Any) -> None:
    """Redis is down; the client sends 3 s more, which its gateway buffers; that gateway is
    SIGKILLed. The client resumes on another gateway, whose 'session' message says how much
    audio is stored (stored_samples), and sends the rest again from there: every sample is
    stored once, in order, and transcribed (before: 32,000 of 80,000 samples stored, and
    new audio continued at 2.0 s while the client was at 5.0 s)."""
    cluster = cluster_factory(workers=1, persistence=True)
    other, other_port = start_gateway(cluster.redis.url)
    watch = SessionWatch()
    resumes: list[dict[str, Any]] = []

    def on_message(msg: dict[str, Any]) -> None:
        watch(msg)
        if msg["type"] == "session" and msg.get("resumed"):
            resumes.append(msg)

    async def scenario() -> StreamResult:
        async def fault() -> None:
            # the case's timeline: 3 s stored, Redis down, 3 s buffered in the gateway,
            # the gateway killed, Redis back while the client resumes
            await watch.known.wait()
            await asyncio.sleep(3.0)
            await asyncio.to_thread(cluster.redis.stop)
            await asyncio.sleep(3.0)  # the gateway buffers what the client sends
            cluster.gateway.signal(signal.SIGKILL)
            await asyncio.sleep(0.5)
            await asyncio.to_thread(cluster.redis.start)

        res, _ = await asyncio.gather(
            stream(listen_url(cluster.ws_url), frames(JFK), pace=1.0, on_message=on_message,
                   reconnects=20, reconnect_delay_s=0.5,
                   resume_urls=[f"ws://127.0.0.1:{other_port}"]),
            fault())
        return res

    try:
        res = asyncio.run(scenario())
    finally:
        other.stop()
    check_protocol(res)
    assert resumes, "the client never resumed"
    assert 0 < resumes[0]["stored_samples"] < 5 * 16000, resumes[0]
    assert watch.sid is not None
    audio = stored_audio(cluster, watch.sid)
    offsets = [b["off"] for b in audio]
    assert offsets == sorted(offsets) and offsets[0] == 0
    ends = [b["off"] + len(b["pcm"]) // 2 for b in audio]
    assert all(end == nxt for end, nxt in zip(ends, offsets[1:], strict=False)), "a gap"
    assert ends[-1] == len(JFK)
    assert res.closed_duration == pytest.approx(len(JFK) / 16000, abs=0.01)
    assert wer(reference("fw_jfk"), res.text) <= 0.10, res.text


def test_a_connection_whose_session_was_resumed_elsewhere_is_told_when_it_sends_close(
        cluster_factory: Any) -> None:
    """The old connection learns it was taken over (session_taken, 1008) as soon as its
    close marker is refused, instead of waiting 120 s for a 'closed' and getting 1011."""
    cluster = cluster_factory(workers=1)
    other, other_port = start_gateway(cluster.redis.url)

    async def scenario() -> tuple[list[dict[str, Any]], int | None, float, StreamResult]:
        parts = frames(JFK)
        async with connect(listen_url(cluster.ws_url)) as old:
            sid = json.loads(await old.recv())["session_id"]
            for payload, _ in parts[:20]:
                await old.send(payload)
            await until("the 20 messages stored", lambda: stored_seq(cluster, sid) >= 20)
            attach = int(cluster.meta(sid)["attach"])
            resumed = asyncio.create_task(stream(
                listen_url(f"ws://127.0.0.1:{other_port}", session=sid, after=0), parts[20:],
                pace=1.0))
            await until("the other gateway taking the session",
                        lambda: int(cluster.meta(sid)["attach"]) > attach)
            began = time.monotonic()
            await old.send(json.dumps({"type": "close"}))
            told: list[dict[str, Any]] = []
            with contextlib.suppress(Exception):
                async for raw in old:
                    told.append(json.loads(raw))
            took = time.monotonic() - began
            return told, old.close_code, took, await resumed

    try:
        told, code, took, res = asyncio.run(scenario())
    finally:
        other.stop()
    errors_seen = [m for m in told if m["type"] == "error"]
    assert [e["code"] for e in errors_seen] == ["session_taken"], told
    assert code == 1008 and took < 5.0, (code, took)
    check_protocol(res)
