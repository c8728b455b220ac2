"""Garbage-collector pacing: survivors are frozen out of the automatic collections, and the
periodic full collection still frees cyclic garbage among them."""

from __future__ import annotations

import asyncio
import gc
import weakref

from common.gcpolicy import pace_gc


class Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the cyclic collector frees it


def test_pacing_freezes_survivors_and_the_full_collection_frees_frozen_cycles() -> None:
    async def run() -> None:
        node = Node()
        ref = weakref.ref(node)
        pacer = asyncio.create_task(pace_gc(0.05, 0.5))
        try:
            await asyncio.sleep(0.12)
            assert gc.get_freeze_count() > 0  # survivors left the scanned generations
            del node
            gc.collect()  # an ordinary full collection skips frozen objects
            assert ref() is not None
            for _ in range(40):  # the pacer's full collection comes within gc_full_s
                await asyncio.sleep(0.05)
                if ref() is None:
                    break
            assert ref() is None
        finally:
            pacer.cancel()
            gc.unfreeze()

    asyncio.run(run())


def test_pacing_off_leaves_the_collector_alone() -> None:
    gc.unfreeze()
    asyncio.run(pace_gc(0, 300))
    assert gc.get_freeze_count() == 0
