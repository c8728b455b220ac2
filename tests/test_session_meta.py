"""The session record's one decode, and its field names shared with the Lua scripts."""

from __future__ import annotations

import asyncio
import re

from common import keys, scripts
from common.session_meta import ACTIVE, CLOSED, FIELDS, SessionMeta
from common.sessions import create_session
from tests.procs import RedisServer


def test_every_meta_field_a_script_reads_or_writes_is_a_field_of_the_record() -> None:
    """A field written by a script under a name the record does not know would be
    invisible to every reader (and the reverse: a renamed field would read its default)."""
    used: set[str] = set()
    for name in dir(scripts):
        text = getattr(scripts, name)
        if not isinstance(text, str) or "redis.call" not in text:
            continue
        for call in re.findall(r"redis\.call\('H(?:GET|SET|DEL|INCRBY)', KEYS\[1\],([^)]*)\)",
                               text):
            used.update(re.findall(r"'([a-z_]+)'", call))
    used -= {ACTIVE, CLOSED}  # values of 'state', not field names
    assert used, "no hash fields found in the scripts"
    assert used <= set(FIELDS), used - set(FIELDS)


def test_a_created_session_decodes_with_its_types(module_redis: RedisServer) -> None:
    async def scenario() -> SessionMeta:
        async with module_redis.aclient() as r:
            sid = "ab" * 16
            await create_session(r, sid, {"model": "tiny.en", "interim": "0",
                                          "sample_rate": 48000, "deadline": "1900000000.5"})
            await r.hset(keys.meta(sid), mapping={"stable": b"\x82\xa1u\x00", "epoch": 3})
            return SessionMeta.decode(await r.hgetall(keys.meta(sid)))

    meta = asyncio.run(scenario())
    assert (meta.state, meta.closed, meta.model, meta.interim) == ("active", False, "tiny.en",
                                                                   False)
    assert (meta.sample_rate, meta.epoch, meta.deadline) == (48000, 3, 1900000000.5)
    assert meta.created > 1.7e9 and meta.heartbeat == meta.created
    assert meta.stable == b"\x82\xa1u\x00"
    assert SessionMeta.decode({}) == SessionMeta()  # a record not written yet: defaults
