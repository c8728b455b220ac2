"""The package boundaries docs/architecture.md describes, checked on the source: no import
cycle, ``common`` depends on no service, ingest reaches fanout only through its sessions
API, the transcriber on neither, and the session record's fields are read and written
only where their owner is."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "ingest", "transcriber", "fanout")


def modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).glob("*.py")):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            out[name] = path
    return out


def imports(path: Path, known: set[str]) -> set[str]:
    """Project modules ``path`` imports anywhere (functions and TYPE_CHECKING blocks too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        found |= {n for n in names if n in known}
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports(path, known) - {name} for name, path in mods.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_the_checker_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles() -> None:
    assert cycles(graph()) == []


def test_package_dependencies_point_one_way() -> None:
    for module, deps in graph().items():
        package = module.split(".")[0]
        outside = {d for d in deps if d.split(".")[0] not in (package, "common")}
        if package == "common":
            assert not {d for d in deps if d.split(".")[0] != "common"}, module
        elif package == "ingest":
            # the gateway serves the recorded-sessions API; nothing else of fanout
            assert outside <= {"fanout.api"}, (module, outside)
        else:
            assert not outside, (module, outside)


def test_session_record_fields_are_touched_only_by_their_owners() -> None:
    """HGET/HMGET/HSET/HINCRBY on ``stt:{sid}:meta`` name fields: only the sessions module
    (and the transcriber's lease and commit code) may."""
    field_access = re.compile(r"\.(hget|hmget|hset|hincrby|hgetall|hdel)\(\s*keys\.meta\(")
    owners = {"common.sessions"}
    for module, path in modules().items():
        if module in owners or module.startswith("transcriber."):
            continue
        assert not field_access.search(path.read_text()), module
