"""Results on their way to one socket: a bounded queue that never makes its producer wait.

The client's own /v1/listen socket and every viewer get their results through a
``ResultQueue``: the reader of the session's results stream offers each result, and a
sender task per socket takes them out. A socket that stops reading fills its queue and is
failed with ``too_slow`` (1013; it may come back with ``after``) instead of holding
results in memory or slowing the reader, which serves other sockets too.
"""

from __future__ import annotations

import asyncio

from common.errors import SttError, TooSlow
from common.messages import Partial, Result


class ResultQueue:
    """One socket's results: bounded, with a failure that ends the socket."""

    def __init__(self, maxsize: int, partials: bool = True,
                 resume_hint: str = "reconnect with after=<last seq received> to continue",
                 ) -> None:
        self.queue: asyncio.Queue[Result] = asyncio.Queue(maxsize)
        self.partials = partials
        self.resume_hint = resume_hint
        self.failed: asyncio.Future[SttError] = asyncio.get_running_loop().create_future()

    def offer(self, result: Result) -> None:
        """Never waits: a full queue fails the socket instead."""
        if self.failed.done() or (isinstance(result, Partial) and not self.partials):
            return
        try:
            self.queue.put_nowait(result)
        except asyncio.QueueFull:
            self.fail(TooSlow(f"this socket fell more than {self.queue.maxsize} results "
                              f"behind; {self.resume_hint}"))

    def fail(self, exc: SttError) -> None:
        if not self.failed.done():
            self.failed.set_result(exc)

    async def get(self) -> Result:
        return await self.queue.get()
