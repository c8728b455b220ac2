"""python -m ingest: the WebSocket gateway (with in-process fanout to the originating socket)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

from common.logs import setup_logging
from common.settings import GatewaySettings, load
from ingest.gateway import Gateway

log = logging.getLogger("ingest")


async def serve(settings: GatewaySettings) -> None:
    gateway = Gateway(settings)
    server = await gateway.start()
    ports = sorted({sock.getsockname()[1] for sock in server.sockets})
    log.info("gateway listening on %s port %s", settings.host, ports)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await gateway.close()


def main(argv: list[str] | None = None) -> None:
    settings = load(GatewaySettings, argv, prog="python -m ingest")
    setup_logging(settings.log_level, settings.log_format)
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
