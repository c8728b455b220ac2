"""Deleting a session (``DELETE /v1/sessions/{id}``, ``stt delete``) against the shared
stack: real Redis, gateway and transcriber.

Afterwards no key of the session remains, it is gone from the listing, and every read
answers 404 ``session_not_found``; a live session ends first: its client and its viewers
get ``session_not_found``, and neither its gateway nor its transcriber writes it back.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any

import pytest
import redis

from common.client import listen_url, stream
from tests.audio_refs import frames, load_pcm16
from tests.conftest import Stack
from tests.procs import ROOT
from tests.test_sessions_e2e import watch, with_tail

pytestmark = pytest.mark.integration


def request(url: str, method: str = "GET") -> tuple[int, dict[str, Any] | None]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method=method),
                                    timeout=30) as resp:
            body = resp.read()
            return resp.status, json.loads(body) if body else None
    except urllib.error.HTTPError as exc:
        body = exc.read()
        return exc.code, json.loads(body) if body else None


def keys_of(r: redis.Redis, sid: str) -> list[bytes]:
    return list(r.scan_iter(match=f"*{sid}*", count=1000))


def test_a_closed_session_is_deleted_with_every_key_and_reads_are_404(stack: Stack) -> None:
    r = stack.redis.client()
    pcm = with_tail(load_pcm16("ds_ldc93s1"), 1.0)
    res = asyncio.run(stream(listen_url(stack.ws_url), frames(pcm), pace=None))
    sid = res.messages[0].message["session_id"]
    assert res.close_code == 1000 and res.finals
    url = f"{stack.http_url}/v1/sessions/{sid}"
    assert request(url)[0] == 200 and keys_of(r, sid)
    assert r.zscore("stt:index", sid) is not None

    assert request(url, "DELETE") == (204, None)
    assert keys_of(r, sid) == []
    assert r.zscore("stt:index", sid) is None
    for leaf in ("", "/audio.wav", "/transcript.txt"):
        status, body = request(url + leaf)
        assert status == 404 and body is not None and body["code"] == "session_not_found"
    listed = request(f"{stack.http_url}/v1/sessions?limit=200")[1]
    assert listed is not None and sid not in [s["session_id"] for s in listed["sessions"]]
    status, body = request(url, "DELETE")  # once only
    assert status == 404 and body is not None and body["code"] == "session_not_found"
    status, body = request(url, "PUT")
    assert status == 405 and body is not None and body["code"] == "method_not_allowed"


def test_stt_delete_removes_a_session_and_names_an_unknown_one(stack: Stack) -> None:
    r = stack.redis.client()
    pcm = with_tail(load_pcm16("ds_ldc93s1"), 1.0)
    res = asyncio.run(stream(listen_url(stack.ws_url), frames(pcm), pace=None))
    sid = res.messages[0].message["session_id"]

    def stt(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "fanout.cli", *args, "--url",
                               stack.http_url], cwd=ROOT, capture_output=True, text=True,
                              timeout=60)

    done = stt("delete", sid)
    assert done.returncode == 0 and done.stdout.strip() == f"deleted {sid}", done
    assert keys_of(r, sid) == []
    again = stt("delete", sid)
    assert again.returncode == 1 and "session_not_found" in again.stderr, again


def test_a_live_session_ends_for_its_client_and_viewer_and_is_not_written_back(
        stack: Stack) -> None:
    r = stack.redis.client()
    pcm = with_tail(load_pcm16("fw_jfk"))

    async def run() -> tuple[Any, Any, str]:
        sid: list[str] = []
        first_final = asyncio.Event()

        def on_message(m: dict[str, Any]) -> None:
            if m["type"] == "session":
                sid.append(m["session_id"])
            if m["type"] == "final":
                first_final.set()

        client = asyncio.create_task(stream(listen_url(stack.ws_url), frames(pcm), pace=1.0,
                                            on_message=on_message, read_timeout=30))
        await asyncio.wait_for(first_final.wait(), 30)
        viewer = asyncio.create_task(watch(
            f"{stack.ws_url}/v1/sessions/{sid[0]}/results?partials=true"))
        await asyncio.sleep(0.5)
        status, _ = await asyncio.to_thread(
            request, f"{stack.http_url}/v1/sessions/{sid[0]}", "DELETE")
        assert status == 204
        return await asyncio.wait_for(client, 30), await asyncio.wait_for(viewer, 30), sid[0]

    res, viewed, sid = asyncio.run(run())
    errors = [m.message for m in res.messages if m.message["type"] == "error"]
    assert [e["code"] for e in errors] == ["session_not_found"] and res.close_code == 1008
    assert not any(m.message["type"] == "closed" for m in res.messages)
    assert viewed.of("error")[-1]["code"] == "session_not_found", viewed.messages
    assert res.finals  # what was said before the deletion was delivered
    # the worker (lease renewal) and the gateway (appends, resume grace) stop writing it:
    # nothing of the session comes back
    for _ in range(4):
        assert keys_of(r, sid) == []
        time.sleep(0.5)
