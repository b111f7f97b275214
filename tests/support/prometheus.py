"""A real Prometheus for tests, and the PromQL of meter's dashboards and alert rules.

Prometheus and promtool come from Debian's ``prometheus`` package (``.ci/run`` installs it). A test that
needs them fails, never skips, when they are missing.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.support.processes import free_port

ROOT = Path(__file__).resolve().parent.parent.parent
DASHBOARDS = sorted((ROOT / "dashboards").glob("*.json"))
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
RULE_FILES = sorted((PROMETHEUS_DIR / "rules").glob("*.yml"))
SCRAPE_CONFIG = PROMETHEUS_DIR / "prometheus.yml"

# What Grafana puts in for its variables when a panel runs with every team and model selected.
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$__range": "5m",
    "${team}": ".*",
    "$team": ".*",
    "${model}": ".*",
    "$model": ".*",
}


def _binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: apt-get install prometheus (the CI script installs it)")
    return path


def promtool() -> str:
    return _binary("promtool")


def prometheus() -> str:
    return _binary("prometheus")


@dataclass(frozen=True)
class Expression:
    source: str  # "overview.json: Error rate (A)" or "meter-alerts.yml: MeterHighErrorRate"
    expr: str


def grafana_to_promql(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"unhandled Grafana variable in {expr!r}"
    return expr


def dashboard_panels(path: Path) -> Iterator[dict[str, Any]]:
    def walk(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for panel in panels:
            yield panel
            yield from walk(panel.get("panels", []))

    yield from walk(json.loads(path.read_text())["panels"])


def dashboard_expressions() -> list[Expression]:
    found = []
    for path in DASHBOARDS:
        for panel in dashboard_panels(path):
            for target in panel.get("targets", []):
                source = f"{path.name}: {panel['title']} ({target['refId']})"
                found.append(Expression(source, grafana_to_promql(target["expr"])))
    return found


def alert_rules() -> list[dict[str, Any]]:
    rules = []
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                rules.append({**rule, "file": path.name, "group": group["name"]})
    return rules


def alert_expressions() -> list[Expression]:
    return [Expression(f"{r['file']}: {r.get('alert') or r.get('record')}", r["expr"]) for r in alert_rules()]


_COMPARISON = re.compile(r"(==|!=|>=|<=|>|<)")


def comparisons_as_bool(expr: str) -> str:
    """``expr`` with every comparison turned into its ``bool`` form: ``rate(x[5m]) > 0.05`` becomes
    ``rate(x[5m]) > bool 0.05``, which answers 0 or 1 for every input series instead of filtering
    them. An alert rule that is quiet returns nothing; its bool form still shows that the series it
    watches exist. Label matchers and strings are left alone."""
    out: list[str] = []
    depth = 0  # inside {...}
    quote: str | None = None
    i = 0
    while i < len(expr):
        char = expr[i]
        if quote is not None:
            out.append(char)
            if char == "\\":
                out.append(expr[i + 1])
                i += 1
            elif char == quote:
                quote = None
        elif char in "\"'`":
            quote = char
            out.append(char)
        elif char == "{":
            depth += 1
            out.append(char)
        elif char == "}":
            depth -= 1
            out.append(char)
        elif depth == 0 and (match := _COMPARISON.match(expr, i)) and not expr.startswith("=~", i):
            operator = match.group(1)
            out.append(operator)
            i += len(operator)
            rest = expr[i:].lstrip()
            if not rest.startswith("bool"):
                out.append(" bool")
            continue
        else:
            out.append(char)
        i += 1
    return "".join(out)


def referenced_metrics(expr: str) -> set[str]:
    """Names of the series an expression selects (meter's and Prometheus' own ``up``)."""
    names = set(re.findall(r"\bmeter_[a-z0-9_]+\b", expr))
    return names | {"up"} if re.search(r"\bup\s*\{", expr) else names


class PrometheusServer:
    """``prometheus`` on a free loopback port with its own configuration and storage in ``workdir``."""

    def __init__(
        self,
        workdir: Path,
        targets: list[str],
        *,
        scrape_interval: str = "1s",
        rule_files: list[Path] | None = None,
    ) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = yaml.safe_load(SCRAPE_CONFIG.read_text())  # meter's shipped scrape config, adapted
        config["global"].update({"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval})
        (job,) = (j for j in config["scrape_configs"] if j["job_name"] == "meter")
        job["scrape_interval"] = scrape_interval
        job["static_configs"] = [{"targets": targets}]
        config["rule_files"] = [str(p) for p in (rule_files if rule_files is not None else RULE_FILES)]
        self.config_path = workdir / "prometheus.yml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = workdir / "prometheus.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> PrometheusServer:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [
                prometheus(),
                f"--config.file={self.config_path}",
                f"--storage.tsdb.path={self.workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--storage.tsdb.retention.time=1h",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"prometheus exited with {self.proc.returncode}:\n{self.log_path.read_text()}"
                )
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"prometheus did not become ready:\n{self.log_path.read_text()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def __enter__(self) -> PrometheusServer:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    def api(self, path: str, **params: str) -> Any:
        response = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=10)
        body = response.json()
        if body.get("status") != "success":
            raise PromQLError(body.get("error", response.text))
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.api("query", query=expr)
        result = data["result"]
        return result if data["resultType"] in ("vector", "matrix") else [{"value": result}]


class PromQLError(Exception):
    pass
