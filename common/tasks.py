"""A background task that starts on first use and stops with its owner."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine
from typing import Any


class LazyTask:
    """``ensure()`` starts ``run()`` unless it is running; ``close()`` cancels and awaits it."""

    def __init__(self, run: Callable[[], Coroutine[Any, Any, None]], name: str) -> None:
        self._run = run
        self._name = name
        self._task: asyncio.Task[None] | None = None

    def ensure(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name=self._name)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


async def stop_task(task: asyncio.Task[Any], every_s: float = 0.1) -> None:
    """Cancel ``task`` and wait until it has ended, cancelling again while it runs.

    redis-py (8.1) can swallow a cancellation that lands while it opens a connection: the
    command then runs on (an XREAD BLOCK for its whole block time, and the loop around it
    after that), and one ``cancel()`` plus ``await`` would wait for the session's results
    to close. Measured: a cancel a few ms after a results reader started took the whole
    10 s block; the second cancel ends it."""
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=every_s)
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task


async def stop_tasks(*tasks: asyncio.Task[Any]) -> None:
    """``stop_task`` for each, at once."""
    await asyncio.gather(*(stop_task(t) for t in tasks))
