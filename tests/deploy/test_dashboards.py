"""The Grafana dashboards and Prometheus rules as files: provisionable, consistent, valid PromQL.

Whether every expression returns data against a real meter is tests/deploy/test_prometheus_real.py's job.
"""

from __future__ import annotations

import json
import re
import subprocess

import pytest
import yaml
from prometheus_client import CollectorRegistry

from meter.records import Outcome
from meter.sinks.prometheus import ProxyMetrics
from tests.conftest_db import make_record
from tests.support.prometheus import (
    DASHBOARDS,
    RULE_FILES,
    SCRAPE_CONFIG,
    alert_rules,
    comparisons_as_bool,
    dashboard_expressions,
    dashboard_panels,
    promtool,
)

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


def _labelled_metrics() -> dict[str, set[str]]:
    """Series names of meter's own metrics -> their label names, from one fully populated record."""
    registry = CollectorRegistry()
    metrics = ProxyMetrics(registry, process_metrics=False)
    metrics.publish(
        make_record(
            requested_model="m",
            stream=True,
            status_code=503,
            outcome=Outcome.UPSTREAM_ERROR,
            prompt_tokens=1,
            completion_tokens=3,
            duration_ms=9.0,
            ttft_ms=1.0,
            server_ttft_ms=1.0,
            server_processing_ms=1.0,
            overhead_ms=0.1,
        )
    )
    found: dict[str, set[str]] = {}
    for family in registry.collect():
        for sample in family.samples:
            found.setdefault(sample.name, set()).update(set(sample.labels) - {"le"})
    return found


def test_there_are_the_four_dashboards():
    titles = {json.loads(p.read_text())["title"] for p in DASHBOARDS}
    assert titles == {
        "meter / Overview",
        "meter / Teams and billing",
        "meter / Latency",
        "meter / Pipeline health",
    }


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_is_provisionable(path):
    board = json.loads(path.read_text())
    assert board["uid"].startswith("meter-") and len(board["uid"]) <= 40
    assert "id" not in board or board["id"] is None  # provisioning assigns ids
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("team", "model"):
        variable = variables[name]
        assert variable["type"] == "query" and variable["datasource"] == DATASOURCE
        assert variable["includeAll"] and variable["multi"] and variable["allValue"] == ".*"
        assert variable["query"]["query"].startswith("label_values(meter_requests_total")
    ids, cells = set(), set()
    for panel in dashboard_panels(path):
        assert panel["id"] not in ids
        ids.add(panel["id"])
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE and target["expr"].strip()
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24
        xs, ys = range(pos["x"], pos["x"] + pos["w"]), range(pos["y"], pos["y"] + pos["h"])
        area = {(x, y) for x in xs for y in ys}
        assert not area & cells, f"{panel['title']} overlaps another panel"
        cells |= area


def test_every_selector_of_a_team_or_model_metric_honours_the_variables():
    labelled = _labelled_metrics()
    for expression in dashboard_expressions():
        for name, matchers in re.findall(r"\b(meter_[a-z0-9_]+)(\{[^}]*\})?", expression.expr):
            labels = labelled.get(name, set())
            for label, value in (("team", 'team=~".*"'), ("model", 'model=~".*"')):
                if label in labels:
                    assert value in matchers, f"{expression.source}: {name} without the ${label} filter"


@pytest.mark.integration
def test_dashboard_promql_is_valid(tmp_path):
    # promtool validates PromQL offline when it checks a rule file: one recording rule per expression.
    rules = [{"record": f"dashboard:expr_{i}", "expr": e.expr} for i, e in enumerate(dashboard_expressions())]
    path = tmp_path / "dashboards.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    check = subprocess.run([promtool(), "check", "rules", str(path)], capture_output=True, timeout=60)
    assert check.returncode == 0, check.stdout.decode() + check.stderr.decode()


@pytest.mark.integration
def test_promtool_checks_the_rules_and_the_scrape_config():
    for command in (["check", "rules", *map(str, RULE_FILES)], ["check", "config", str(SCRAPE_CONFIG)]):
        check = subprocess.run([promtool(), *command], capture_output=True, timeout=60)
        assert check.returncode == 0, check.stdout.decode() + check.stderr.decode()


def test_alert_rules_cover_the_operational_risks():
    rules = {r["alert"]: r for r in alert_rules()}
    assert {
        "MeterHighErrorRate",
        "MeterTimeToFirstTokenRegression",
        "MeterOverheadHigh",
        "MeterJournalBacklogGrowing",
        "MeterUsageNotReported",
        "MeterUnpricedUsage",
        "MeterTeamBudget80Percent",
        "MeterTeamBudgetExhausted",
    } <= set(rules)
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in {"page", "warning", "info"}, name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name
    assert "0.003" in rules["MeterOverheadHigh"]["expr"]
    assert ">= 0.8" in rules["MeterTeamBudget80Percent"]["expr"]
    assert ">= 1" in rules["MeterTeamBudgetExhausted"]["expr"]


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ('up{job="meter"} == 0', 'up{job="meter"} == bool 0'),
        ('rate(x{a!~"4..",b=~"y"}[5m]) > 0.05', 'rate(x{a!~"4..",b=~"y"}[5m]) > bool 0.05'),
        ("a >= 0.8", "a >= bool 0.8"),
        ("a > bool 1 and b < 2", "a > bool 1 and b < bool 2"),
        ('x{l="a>b"} != 1', 'x{l="a>b"} != bool 1'),
    ],
)
def test_comparisons_as_bool(expr, expected):
    assert comparisons_as_bool(expr) == expected
