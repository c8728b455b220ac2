"""Model-based test of the lease and commit protocol (transcriber/commit.py) on a real
redis-server: hypothesis interleaves workers that acquire a session through work entries
(fresh, duplicate or expired leases), renew, publish, commit, retry a commit whose reply
was lost, hand the session back and crash, and checks every step against a model: one
owner at a time, a stale owner writes nothing, a duplicate entry takes nothing, and every
utterance is committed exactly once, in order.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from common import keys
from common.errors import StaleLease
from common.messages import Final, Partial, unpack_result
from common.sessions import create_session
from tests.procs import RedisServer
from transcriber.commit import DUPLICATE, SessionWriter

SID = "0" * 31 + "1"
WORKERS = st.integers(0, 2)
ENTRIES = st.sampled_from([b"1-0", b"2-0", b"3-0"])
#: a lease that has run out (0 ms), or one that is still fresh
LEASE_MS = st.sampled_from([0, 10**9])


@pytest.fixture(scope="module")
def server(module_redis: RedisServer) -> RedisServer:
    return module_redis


class LeaseProtocol(RuleBasedStateMachine):
    url = ""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.redis = aioredis.from_url(self.url)
        self.run(self.redis.flushall())
        self.run(create_session(self.redis, SID, {"model": ""}))
        # the model
        self.epoch = 0
        self.lease_entry: bytes | None = None
        self.committed = 0  # next utterance index
        # each worker's view: writer, the next utterance it will commit, its last commit
        self.writers: dict[int, SessionWriter] = {}
        self.next: dict[int, int] = {}
        self.last: dict[int, tuple[Final, int]] = {}

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def teardown(self) -> None:
        self.run(self.redis.aclose())
        self.loop.close()

    def owner(self, w: int) -> bool:
        return w in self.writers and self.writers[w].epoch == self.epoch

    @rule(w=WORKERS, entry=ENTRIES, lease_ms=LEASE_MS)
    def acquire(self, w: int, entry: bytes, lease_ms: int) -> None:
        got = self.run(SessionWriter.acquire(self.redis, SID, f"w{w}", entry, lease_ms))
        if self.lease_entry is not None and entry != self.lease_entry and lease_ms > 0:
            assert got == DUPLICATE  # another entry holds a live lease
            return
        self.epoch += 1
        assert got == self.epoch
        self.lease_entry = entry
        self.writers[w] = SessionWriter(self.redis, SID, got)
        self.next[w] = self.committed  # it resumes from the commit point
        self.last.pop(w, None)

    @rule(w=WORKERS)
    def renew(self, w: int) -> None:
        if w in self.writers:
            assert self.run(self.writers[w].renew()) == self.owner(w)

    @rule(w=WORKERS)
    def publish_partial(self, w: int) -> None:
        if w not in self.writers:
            return
        partial = Partial(SID, self.next[w], "some words", "some", 0.0, 1.0)
        if self.owner(w):
            assert self.run(self.writers[w].publish(partial)) > 0
        else:
            with pytest.raises(StaleLease):
                self.run(self.writers[w].publish(partial))

    @rule(w=WORKERS)
    def commit(self, w: int) -> None:
        if w not in self.writers:
            return
        u = self.next[w]
        final = Final(SID, u, f"utterance {u}", float(u), u + 0.5, ())
        if not self.owner(w):
            with pytest.raises(StaleLease):
                self.run(self.writers[w].commit(final, (u + 1) * 16000, u + 1, "", "0-0"))
            return
        seq = self.run(self.writers[w].commit(final, (u + 1) * 16000, u + 1, "", "0-0"))
        assert seq > 0 and u == self.committed
        self.committed = u + 1
        self.next[w] = u + 1
        self.last[w] = (final, u + 1)

    @rule(w=WORKERS)
    def commit_again_after_a_lost_reply(self, w: int) -> None:
        if w not in self.last:
            return
        final, nxt = self.last[w]
        if self.owner(w):
            args = (final, nxt * 16000, nxt, "", "0-0")
            assert self.run(self.writers[w].commit(*args)) == 0  # already committed
        else:
            with pytest.raises(StaleLease):
                self.run(self.writers[w].commit(final, nxt * 16000, nxt, "", "0-0"))

    @rule(w=WORKERS)
    def hand_back(self, w: int) -> None:
        if w not in self.writers:
            return
        released = self.run(self.writers[w].release())
        assert released == self.owner(w)
        if released:
            self.lease_entry = None
        del self.writers[w]
        self.last.pop(w, None)

    @rule(w=WORKERS)
    def crash(self, w: int) -> None:
        self.writers.pop(w, None)  # its lease stays until it runs out (acquire lease_ms=0)
        self.last.pop(w, None)

    @invariant()
    def every_utterance_once_in_order_by_the_owner_of_the_time(self) -> None:
        entries = self.run(self.redis.xrange(keys.results(SID)))
        finals = [unpack_result(f) for _id, f in entries]
        indexes = [r.utterance for r in finals if isinstance(r, Final)]
        assert indexes == list(range(self.committed))
        epochs = [int(f[b"epoch"]) for _id, f in entries]
        assert epochs == sorted(epochs), "a stale owner wrote after a newer one"
        meta = self.run(self.redis.hgetall(keys.meta(SID)))
        assert int(meta[b"epoch"]) == self.epoch
        assert int(meta[b"next_utterance"]) == self.committed


def test_the_lease_and_commit_protocol_holds_under_any_interleaving(
        server: RedisServer) -> None:
    LeaseProtocol.url = server.url
    examples = int(os.environ.get("PROTOCOL_EXAMPLES", "60"))
    state_machine_test = LeaseProtocol.TestCase
    state_machine_test.settings = settings(
        max_examples=examples, stateful_step_count=40, deadline=None,
        suppress_health_check=[HealthCheck.too_slow])
    state_machine_test().runTest()
