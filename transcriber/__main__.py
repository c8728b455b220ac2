"""python -m transcriber: one worker process (one per GPU, or per CPU box)."""

from __future__ import annotations

import asyncio

from common.logs import setup_logging
from common.settings import TranscriberSettings, load
from transcriber.worker import serve


def main(argv: list[str] | None = None) -> None:
    settings = load(TranscriberSettings, argv, prog="python -m transcriber")
    setup_logging(settings.log_level, settings.log_format)
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
