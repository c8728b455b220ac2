"""``keyterm=`` (repeatable) and ``prompt=`` lean decoding toward names and product words,
through the real gateway and worker, on real speech: "Montreal Forced Aligner", said in a
recording whose words tiny.en otherwise hears as "Montreal for a Seliner", comes out right
when a client lists it among other terms, and the transcript as a whole gets no worse. Bad
values are refused with ``bad_request``. (bench/keyterms.py measures recall and the cost on
speech without the terms.)"""

from __future__ import annotations

import asyncio
import json
from urllib.parse import urlencode

import pytest
from websockets.asyncio.client import connect

from common.client import listen_url, stream
from common.web import KEYTERM_MAX_CHARS, KEYTERMS_MAX
from tests.audio_refs import frames, load_pcm16, normalize, reference, wer
from tests.conftest import Stack
from tests.test_pipeline_e2e import check_protocol, with_tail

pytestmark = pytest.mark.integration

GLOSSARY = ["Siobhan Okafor", "Zyntrax", "Montreal Forced Aligner", "Reykjavik", "Nguyen"]


def test_a_keyterm_is_heard_inside_a_sentence_of_real_speech(stack: Stack) -> None:
    pcm = with_tail(load_pcm16("mfa_her"))  # "montreal forced aligner i hardly know her"
    plain = asyncio.run(stream(listen_url(stack.ws_url), frames(pcm), pace=None))
    leaning = asyncio.run(stream(listen_url(stack.ws_url, keyterm=GLOSSARY), frames(pcm),
                                 pace=None))
    check_protocol(leaning)
    assert "montreal forced aligner" in normalize(leaning.text), leaning.text
    ref = reference("mfa_her")
    assert wer(ref, leaning.text) <= wer(ref, plain.text), (plain.text, leaning.text)


async def first_message(url: str) -> dict[str, object]:
    async with connect(url) as ws:
        return dict(json.loads(await asyncio.wait_for(ws.recv(), 10)))


@pytest.mark.parametrize("query", [
    [("keyterm", "x")] * (KEYTERMS_MAX + 1),
    [("keyterm", "y" * (KEYTERM_MAX_CHARS + 1))],
    [("keyterm", "bell\x07")],
    [("prompt", "z" * 2001)],
], ids=["too_many", "too_long", "control_character", "prompt_too_long"])
def test_bad_keyterms_and_prompts_are_refused(stack: Stack, query: list[tuple[str, str]]) -> None:
    msg = asyncio.run(first_message(f"{stack.ws_url}/v1/listen?{urlencode(query)}"))
    assert msg["type"] == "error" and msg["code"] == "bad_request", msg
