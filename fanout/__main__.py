"""python -m fanout: the standalone viewer server (viewers, session listing, exports)."""

from __future__ import annotations

import logging

from common.service import run_service, wait_for_stop_signal
from common.settings import FanoutSettings
from fanout.server import FanoutServer

log = logging.getLogger("fanout")


async def serve(settings: FanoutSettings) -> None:
    fanout = FanoutServer(settings)
    served = await fanout.start()
    ports = served.ports
    log.info("fanout listening on %s port %s", settings.host, ports)
    await wait_for_stop_signal()
    await fanout.close()


def main(argv: list[str] | None = None) -> None:
    run_service(FanoutSettings, serve, "python -m fanout", argv)


if __name__ == "__main__":
    main()
