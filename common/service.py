"""The shape every service's ``__main__`` shares: settings, logging, run until SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from common.gcpolicy import pace_gc
from common.logs import setup_logging
from common.settings import load

S = TypeVar("S")


async def wait_for_stop_signal() -> None:
    """Until SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def run_service(settings_cls: type[S], serve: Callable[[S], Awaitable[Any]], prog: str,
                argv: Sequence[str] | None = None) -> None:
    settings = load(settings_cls, argv, prog=prog)
    setup_logging(settings.log_level, settings.log_format)  # type: ignore[attr-defined]
    asyncio.run(_serve_paced(settings, serve))


async def _serve_paced(settings: S, serve: Callable[[S], Awaitable[Any]]) -> None:
    """``serve``, with the garbage collector paced where the settings ask for it."""
    pacer = asyncio.create_task(pace_gc(getattr(settings, "gc_freeze_s", 0.0),
                                        getattr(settings, "gc_full_s", 0.0)))
    try:
        await serve(settings)
    finally:
        pacer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pacer
