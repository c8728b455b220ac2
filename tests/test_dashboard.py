"""The Grafana dashboard (deploy/grafana/stt.json): a valid dashboard over real metrics.

* Structure: what Grafana needs to import or provision the file (uid, title, schemaVersion,
  panels with unique ids on a 24-column grid without overlaps, every query on the dashboard's
  Prometheus datasource variable, one refId per query).
* Every PromQL expression parses (``promql-parser``, the Python binding of the Rust
  ``promql-parser`` crate), after Grafana's ``$__rate_interval`` is replaced by a duration.
* Every metric it reads is one the services export (their collectors are built here, as the
  services build them, and read with the names Prometheus gives them: ``_total`` for
  counters, ``_bucket``/``_sum``/``_count`` for histograms), or one of ANNOUNCED; every label
  it filters or groups by is one of that metric's labels or a label Prometheus adds.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from importlib import import_module
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from common.metrics import gateway_metrics, register_viewer_gauges, worker_metrics
from common.storage import StorageWatch

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "stt.json"

#: Metrics the gateway is to export for autoscaling (issue 26, built on another branch at the
#: same time: workers announcing their models and capacity): name -> labels. Once the code
#: registers them, the code's own labels are checked instead (``exported``).
ANNOUNCED: dict[str, tuple[str, ...]] = {
    "stt_sessions_waiting": ("model",),
    "stt_queue_oldest_wait_seconds": ("model",),
    "stt_worker_free_slots": ("model",),
}

#: Labels Prometheus attaches to every scraped series (target labels, kubernetes_sd).
TARGET_LABELS = {"job", "instance", "namespace", "pod", "container", "service", "endpoint"}

GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}


def _promql() -> Any:
    try:
        return import_module("promql_parser")
    except ImportError:
        pytest.skip("promql_parser not installed (pip install promql-parser; a dev dependency)")


def exported() -> dict[str, tuple[str, ...]]:
    """Every series name the services export, with its labels."""
    registries = [gateway_metrics().registry, worker_metrics().registry]
    viewers = CollectorRegistry()
    register_viewer_gauges(viewers, lambda: 0, lambda: 0)
    storage = CollectorRegistry()  # the gateway's Redis memory gauges
    StorageWatch(None, 0.9, 1.0, 30.0).register_gauges(storage)
    registries += [viewers, storage]
    names: dict[str, tuple[str, ...]] = {}
    for registry in registries:
        # the collectors themselves: a labelled metric with no child yet has no sample
        for collector in set(registry._collector_to_names):
            family = collector.describe()[0]
            labels = tuple(getattr(collector, "_labelnames", ()))
            suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"),
                        "summary": ("_sum", "_count", "")}.get(family.type, ("",))
            for suffix in suffixes:
                extra = ("le",) if suffix == "_bucket" else ()
                names[family.name + suffix] = labels + extra
    return names


def known_metrics() -> dict[str, tuple[str, ...]]:
    return {**ANNOUNCED, **exported()}


def load() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def panels(dash: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for p in dash["panels"]:
        yield p
        yield from p.get("panels", [])  # a collapsed row holds its panels


def expressions(dash: dict[str, Any]) -> Iterator[tuple[str, str]]:
    for p in panels(dash):
        for t in p.get("targets", []):
            yield p["title"], t["expr"]


def parse(expr: str) -> Any:
    for var, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(var, value)
    assert "$" not in expr, f"an unknown variable in {expr!r}"
    return _promql().parse(expr)


def selectors(tree: Any) -> list[Any]:
    p = _promql()
    found: list[Any] = []

    def visit(node: Any) -> bool:
        if isinstance(node, p.VectorSelector):
            found.append(node)
        return True

    p.walk(tree, visit)
    return found


def grouping_labels(expr: str) -> set[str]:
    return {label.strip() for m in re.finditer(r"\b(?:by|without)\s*\(([^)]*)\)", expr)
            for label in m.group(1).split(",") if label.strip()}


# --------------------------------------------------------------------------- structure


def test_dashboard_structure() -> None:
    dash = load()
    assert dash["uid"] and len(dash["uid"]) <= 40
    assert dash["title"]
    assert isinstance(dash["schemaVersion"], int) and dash["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"

    ids = [p["id"] for p in panels(dash)]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    cells: dict[tuple[int, int], str] = {}
    for p in panels(dash):
        g = p["gridPos"]
        assert g["x"] >= 0 and g["w"] > 0 and g["x"] + g["w"] <= 24, p["title"]
        for row in range(g["y"], g["y"] + g["h"]):
            for col in range(g["x"], g["x"] + g["w"]):
                assert (row, col) not in cells, f"{p['title']} overlaps {cells[(row, col)]}"
                cells[(row, col)] = p["title"]
        assert p["type"] in ("row", "timeseries", "stat", "gauge", "bargauge", "table")
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"], p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t.get("datasource", p["datasource"]) == p["datasource"]
            assert t["expr"].strip()


def test_every_expression_parses() -> None:
    exprs = list(expressions(load()))
    assert len(exprs) >= 20
    for title, expr in exprs:
        try:
            parse(expr)
        except ValueError as exc:
            pytest.fail(f"{title}: {expr!r}: {exc}")


def test_every_metric_and_label_exists() -> None:
    known = known_metrics()
    used = set()
    for title, expr in expressions(load()):
        for sel in selectors(parse(expr)):
            assert sel.name, f"{title}: a selector without a metric name: {expr!r}"
            assert sel.name in known, f"{title}: {sel.name} is not exported"
            used.add(sel.name)
            labels = set(known[sel.name]) | TARGET_LABELS
            for m in sel.matchers.matchers:
                assert m.name in labels, f"{title}: {sel.name} has no label {m.name}"
        # by (...) / without (...) name labels of the series they aggregate
        series_labels = set().union(*(known[s.name] for s in selectors(parse(expr))))
        assert grouping_labels(expr) <= series_labels | TARGET_LABELS, (title, expr)
    # the panels the operators of issue 26 asked for
    for name in ("stt_gateway_time_to_final_seconds_bucket", "stt_worker_session_lag_seconds",
                 "stt_sessions_queued", "stt_gateway_sessions_active",
                 "stt_worker_decode_wait_seconds_bucket", "stt_redis_errors_total",
                 "stt_gateway_rejections_total", "stt_redis_memory_used_bytes",
                 "stt_storage_full", *ANNOUNCED):
        assert name in used, name


def test_the_checks_are_not_vacuous() -> None:
    known = known_metrics()
    assert "stt_gateway_rejections_total" in known  # a counter, named as Prometheus does
    assert "stt_gateway_rejections" not in known
    assert known["stt_worker_decode_seconds_bucket"] == ("kind", "le")
    with pytest.raises(ValueError):
        parse("sum(rate(stt_worker_finals_total[5m])")
    (sel,) = selectors(parse('rate(stt_worker_finals_total{kind="x"}[5m])'))
    assert sel.name == "stt_worker_finals_total"
    assert [m.name for m in sel.matchers.matchers] == ["kind"]  # not a label of it
    assert "kind" not in known[sel.name]
    assert grouping_labels("sum by (le, kind) (x) / sum without (op) (y)") == {"le", "kind",
                                                                                 "op"}
