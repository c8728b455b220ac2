"""Fixtures: a real redis-server on a free port, a real gateway and transcriber on top."""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Iterator

import pytest

from tests.procs import RedisServer, Service, start_gateway, start_transcriber


@dataclasses.dataclass
class Stack:
    redis: RedisServer
    gateway: Service
    transcriber: Service
    port: int

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``long`` tests (load-style runs of half a minute or more: many sessions, many
    workers, fairness under contention) run with ``STT_LONG_TESTS=1`` (``make test-long``);
    ``make test`` (and CI) stays under 15 minutes on a 2-core machine without them."""
    if os.environ.get("STT_LONG_TESTS") == "1":
        return
    skip = pytest.mark.skip(reason="a long run: STT_LONG_TESTS=1 (make test-long) runs it")
    for item in items:
        if "long" in item.keywords:
            item.add_marker(skip)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Keep each phase's report on the item, so a fixture can tell that its test failed."""
    rep = yield
    setattr(item, f"rep_{rep.when}", rep)
    return rep


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A redis-server for this test alone: it may stop, stall and restart it."""
    s = RedisServer()
    s.start()
    yield s
    s.stop()


@pytest.fixture
def durable_redis() -> Iterator[RedisServer]:
    """A redis-server for this test alone that keeps every write (AOF, fsync always) across
    the restarts the test makes."""
    s = RedisServer(persistence=True)
    s.start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def module_redis() -> Iterator[RedisServer]:
    """A redis-server for one test module's tests (they may flush it)."""
    s = RedisServer()
    s.start()
    yield s
    s.stop()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed (make test installs it via .ci/run)")
    server = RedisServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def stack(redis_server: RedisServer) -> Iterator[Stack]:
    """One gateway and one transcriber shared by the end-to-end tests."""
    worker = start_transcriber(redis_server.url)
    # a name no worker serves is allowed here, to test that a replay asking for it is refused
    gateway, port = start_gateway(redis_server.url, REPLAY_MODELS="tiny.en,no-such-model")
    yield Stack(redis_server, gateway, worker, port)
    gateway.stop()
    worker.stop()
