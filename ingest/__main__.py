"""python -m ingest: the WebSocket gateway (with in-process fanout to the originating socket)."""

from __future__ import annotations

import logging

from common.service import run_service, wait_for_stop_signal
from common.settings import GatewaySettings
from ingest.gateway import Gateway

log = logging.getLogger("ingest")


async def serve(settings: GatewaySettings) -> None:
    gateway = Gateway(settings)
    served = await gateway.start()
    ports = served.ports
    log.info("gateway listening on %s port %s", settings.host, ports)
    await wait_for_stop_signal()
    await gateway.close()


def main(argv: list[str] | None = None) -> None:
    run_service(GatewaySettings, serve, "python -m ingest", argv)


if __name__ == "__main__":
    main()
