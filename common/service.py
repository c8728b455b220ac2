"""The shape every service's ``__main__`` shares: settings, logging, run until SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import logging
import resource
import signal
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from common.gcpolicy import pace_gc
from common.logs import setup_logging
from common.settings import load

S = TypeVar("S")

log = logging.getLogger(__name__)


async def wait_for_stop_signal() -> None:
    """Until SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def raise_open_files_limit() -> tuple[int, int]:
    """Raise this process's soft limit on open files (RLIMIT_NOFILE) to its hard limit: every
    socket is a file, and the common soft default of 1024 runs out long before the memory
    does. Returns the (soft, hard) limits now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft != hard:
        # an unlimited hard limit still caps the soft one at the kernel's nr_open
        target = hard if hard != resource.RLIM_INFINITY else max(soft, _nr_open())
        if target > soft:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            except (ValueError, OSError) as exc:
                log.warning("could not raise the open files limit from %d to %d: %s", soft,
                            target, exc)
            else:
                soft = target
    return soft, hard


def _nr_open() -> int:
    try:
        with open("/proc/sys/fs/nr_open") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 1 << 20


def run_service(settings_cls: type[S], serve: Callable[[S], Awaitable[Any]], prog: str,
                argv: Sequence[str] | None = None) -> None:
    settings = load(settings_cls, argv, prog=prog)
    setup_logging(settings.log_level, settings.log_format)  # type: ignore[attr-defined]
    # kill -USR1 PID: every thread's stack to standard error (a stop that does not finish)
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    soft, hard = raise_open_files_limit()
    log.info("open files limit: %d (hard limit %s)", soft,
             "unlimited" if hard == resource.RLIM_INFINITY else hard)
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
