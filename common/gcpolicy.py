"""Garbage-collector pacing for the socket servers (gateway, fanout).

CPython's full (generation 2) collection scans every live container object and
stops the event loop meanwhile. A gateway with 500 streaming sockets holds about
120,000 of them (tasks, coroutines, futures, connections), and the automatic
full collections paused it 70-100 ms about every 3 s under load (measured with
``gc.callbacks``), the whole frame->XADD p99 of the load benchmark.

Here the objects that survived a young collection are frozen (``gc.freeze``,
constant time) every ``gc_freeze_s``: automatic collections then scan only what
is newer. Acyclic garbage is freed by reference counting as always, frozen or
not; cyclic garbage among frozen objects (a closed socket's task and coroutine
cycles) waits for the one full collection every ``gc_full_s``.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time

log = logging.getLogger(__name__)


def freeze_survivors() -> None:
    """Collect the young generations, then freeze what survived."""
    gc.collect(1)
    gc.freeze()


def collect_everything() -> float:
    """Unfreeze and run one full collection; returns its duration in seconds."""
    started = time.perf_counter()
    gc.unfreeze()
    gc.collect()
    return time.perf_counter() - started


async def pace_gc(freeze_s: float, full_s: float) -> None:
    """Forever: freeze survivors every ``freeze_s``, collect everything every ``full_s``."""
    if freeze_s <= 0:
        return
    last_full = time.monotonic()
    freeze_survivors()
    while True:
        await asyncio.sleep(freeze_s)
        if time.monotonic() - last_full >= full_s:
            took = collect_everything()
            last_full = time.monotonic()
            log.debug("full garbage collection: %.1f ms", took * 1000)
        freeze_survivors()
