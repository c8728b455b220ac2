"""Logging setup shared by the services' entry points."""

from __future__ import annotations

import logging


def setup_logging(level: str) -> None:
    logging.getLogger("faster_whisper").setLevel(logging.WARNING)
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
