"""python -m transcriber: one worker process (one per GPU, or per CPU box)."""

from __future__ import annotations

from common.service import run_service
from common.settings import TranscriberSettings
from transcriber.worker import serve


def main(argv: list[str] | None = None) -> None:
    run_service(TranscriberSettings, serve, "python -m transcriber", argv)


if __name__ == "__main__":
    main()
