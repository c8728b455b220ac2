"""``python -m tests.skewed MODULE ARGS...``: run a service with its wall clock (``time.time``)
moved by ``SKEW_S`` seconds, as on a machine whose clock disagrees with the others'."""

from __future__ import annotations

import os
import runpy
import sys
import time


def main() -> None:
    real = time.time
    skew = float(os.environ["SKEW_S"])
    time.time = lambda: real() + skew  # type: ignore[assignment]
    module = sys.argv[1]
    sys.argv = [module, *sys.argv[2:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
