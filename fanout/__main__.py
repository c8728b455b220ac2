"""python -m fanout: the standalone viewer server (viewers, session listing, exports)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

from common.logs import setup_logging
from common.settings import FanoutSettings, load
from fanout.server import FanoutServer

log = logging.getLogger("fanout")


async def serve(settings: FanoutSettings) -> None:
    fanout = FanoutServer(settings)
    server = await fanout.start()
    ports = sorted({sock.getsockname()[1] for sock in server.sockets})
    log.info("fanout listening on %s port %s", settings.host, ports)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await fanout.close()


def main(argv: list[str] | None = None) -> None:
    settings = load(FanoutSettings, argv, prog="python -m fanout")
    setup_logging(settings.log_level, settings.log_format)
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
