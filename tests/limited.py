"""``python -m tests.limited SOFT HARD MODULE [ARGS...]``: run ``python -m MODULE ARGS`` under
an open files limit (RLIMIT_NOFILE) of SOFT and HARD, as a service started by a shell with
``ulimit -n`` would run (tests/test_bounds.py)."""

from __future__ import annotations

import resource
import runpy
import sys


def main() -> None:
    soft, hard, module = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    sys.argv = [module, *sys.argv[4:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
