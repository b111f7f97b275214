"""deploy/, the Dockerfile and the Helm chart, held to meter itself.

Every environment variable they give meter is one meter reads (meter/settings.py ENVIRONMENT, the
OTEL_* variables meter/sinks/otel_config.py reads, PROMETHEUS_MULTIPROC_DIR) and parses; every meter command
they run parses with meter's own CLI; ports, probe paths and scrape targets agree; every file parses
and every file they mount or link exists. The chart is rendered by Helm when Helm is at hand (a
``helm`` binary, or the ``helm_python`` SDK); without it the templates are checked as YAML with their
template actions stripped. Whether the topology really runs is tests/deploy/test_local.py's job.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import click
import pytest
import yaml

from meter.cli.main import main as meter_cli
from meter.health import ROUTES
from meter.settings import ENVIRONMENT, Settings, load_settings
from tests.support.paths import ROOT
from tests.support.prometheus import DASHBOARDS, RULE_FILES, promtool

DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
CHART = DEPLOY / "helm" / "meter"
TEMPLATES = CHART / "templates"
DOCKERFILE = ROOT / "Dockerfile"
LOCAL = DEPLOY / "local"
PATHS = {path for route in ROUTES for path in route.paths}  # /healthz, /readyz, /metrics
DEFAULT_PORT = Settings().port
SECRET = "0123456789abcdef0123456789abcdef"

# --- what meter reads ---------------------------------------------------------------------------------


def _otel_variables() -> set[str]:
    source = (ROOT / "meter" / "sinks" / "otel_config.py").read_text()
    names = {name for name in re.findall(r"\bOTEL_[A-Z0-9_]*[A-Z0-9]\b", source)}
    for signal in ("TRACES", "METRICS"):  # f"OTEL_EXPORTER_OTLP_{upper}_..." in meter/sinks/otel_config.py
        names |= {f"OTEL_EXPORTER_OTLP_{signal}_{part}" for part in ("ENDPOINT", "PROTOCOL", "HEADERS")}
    return names


READS = set(ENVIRONMENT) | _otel_variables() | {"PROMETHEUS_MULTIPROC_DIR"}
VARIABLE = re.compile(r"\b(?:METER|OTEL)_[A-Z0-9_]*[A-Z0-9]\b")


def assert_meter_reads(names: set[str], where: str) -> None:
    unknown = sorted(name for name in names if name not in READS)
    assert not unknown, f"{where} sets variables meter does not read: {unknown}"


def assert_meter_accepts(env: dict[str, str], where: str) -> Settings:
    assert_meter_reads(set(env), where)
    try:
        return load_settings(env)
    except Exception as exc:  # SettingsError names the variable
        raise AssertionError(f"{where}: meter would refuse to start: {exc}") from None


def meter_command(args: list[str]) -> list[str]:
    """The subcommand path of a ``meter`` command line (``["db", "upgrade"]``), after parsing every
    argument and option with meter's own click commands (a bad one raises click.UsageError)."""
    command: click.Command = meter_cli
    path: list[str] = []
    rest = list(args)
    while isinstance(command, click.Group):
        assert rest, f"meter {' '.join(args)}: no subcommand"
        sub = command.get_command(click.Context(command), rest[0])
        assert sub is not None, f"meter {' '.join(args)}: no command {rest[0]!r}"
        path.append(rest.pop(0))
        command = sub
    command.make_context("meter " + " ".join(path), rest)
    return path


def test_meter_command_parsing_rejects_what_meter_rejects() -> None:
    assert meter_command(["serve", "--port", "8787"]) == ["serve"]
    assert meter_command(["db", "upgrade"]) == ["db", "upgrade"]
    for bad in (["serve", "--prot", "1"], ["db", "upgrde"], ["serve", "--port", "x"]):
        with pytest.raises((click.UsageError, AssertionError)):
            meter_command(bad)


# --- the Dockerfile --------------------------------------------------------------------------------


def dockerfile_instructions(stage: int = -1) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of one build stage (default: the final one), continuations joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    stages: list[list[tuple[str, str]]] = [[]]
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, arguments = line.partition(" ")
        if instruction.upper() == "FROM":
            stages.append([])
        stages[-1].append((instruction.upper(), arguments.strip()))
    return stages[1:][stage]


def _exec_form(arguments: str) -> list[str]:
    value = json.loads(arguments)
    assert isinstance(value, list), f"{arguments}: use the exec form (a JSON array)"
    return value


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction, arguments in dockerfile_instructions():
        if instruction == "ENV":
            for name, value in re.findall(r"(\w+)=(\S+)", arguments):
                env[name] = value
    return env


def test_dockerfile_environment_is_meters_own() -> None:
    env = {k: v for k, v in dockerfile_env().items() if k.startswith(("METER_", "OTEL_"))}
    settings = assert_meter_accepts(env, "Dockerfile ENV")
    assert settings.host == "0.0.0.0"  # reachable from outside the container
    assert settings.journal_dir and settings.journal_dir.startswith("/var/lib/meter/")
    assert dockerfile_env()["MALLOC_ARENA_MAX"] == "2"  # docs/performance.md's RSS figures assume it


def test_dockerfile_runs_meter_serve_as_a_non_root_user() -> None:
    instructions = dict(dockerfile_instructions())
    assert _exec_form(instructions["ENTRYPOINT"]) == ["meter"]
    assert meter_command(_exec_form(instructions["CMD"])) == ["serve"]
    user = instructions["USER"].split(":")[0]
    assert user not in {"root", "0"}
    assert "VOLUME" in instructions and "/var/lib/meter" in instructions["VOLUME"]


def test_dockerfile_port_and_health_check_match_meter() -> None:
    instructions = dict(dockerfile_instructions())
    port = int(dockerfile_env().get("METER_PORT", DEFAULT_PORT))
    assert instructions["EXPOSE"].split() == [str(port)]
    check = instructions["HEALTHCHECK"]
    probe_paths = set(re.findall(r"127\.0\.0\.1:%s(/\w+)", check))
    assert probe_paths == {"/healthz"} and probe_paths <= PATHS
    assert "METER_PORT" in check and f"'{port}'" in check  # follows METER_PORT, defaults to the port


def test_dockerignore_lets_in_exactly_what_the_image_copies() -> None:
    copied = set()
    for stage in (0, 1):
        for instruction, arguments in dockerfile_instructions(stage):
            if instruction == "COPY" and not arguments.startswith("--from"):
                copied |= set(arguments.split()[:-1])
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()]
    patterns = [p for p in patterns if p and not p.startswith("#")]
    assert patterns[0] == "**"  # everything out, then the sources back in
    included = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    assert included == copied, (included, copied)
    assert all((ROOT / path).exists() for path in copied)


@pytest.mark.slow
def test_the_image_build_context_builds_a_wheel_with_the_migrations(tmp_path: Path) -> None:
    """What the build stage does, without Docker: build meter from exactly the files the Dockerfile
    copies; the wheel must carry the migrations (`meter db upgrade` in the image needs them)."""
    context = tmp_path / "context"
    context.mkdir()
    for instruction, arguments in dockerfile_instructions(0):
        if instruction == "COPY":
            *sources, _ = arguments.split()
            for source in sources:
                target = context / source
                if (ROOT / source).is_dir():
                    shutil.copytree(ROOT / source, target, ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    shutil.copy(ROOT / source, target)
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path / "dist"), str(context)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    (wheel,) = (tmp_path / "dist").glob("meter-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "meter/_migrations/env.py" in names
    assert any(n.startswith("meter/_migrations/versions/") for n in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "meter = meter.cli.main:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


# --- compose ---------------------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return loaded


def interpolate(value: str) -> str:
    """Compose's ${NAME:-default} / ${NAME-default} / ${NAME} with nothing set: the defaults."""

    def replace(match: re.Match[str]) -> str:
        body = match.group(1)
        for separator in (":-", "-"):
            if separator in body:
                return body.split(separator, 1)[1]
        raise AssertionError(f"${{{body}}} has no default: compose would need it set")

    return re.sub(r"\$\{([^}]+)\}", replace, value)


def _env(service: dict[str, Any]) -> dict[str, str]:
    environment = service.get("environment", {})
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) for item in environment)
    return {name: interpolate(str(value)) for name, value in environment.items()}


def meter_services() -> dict[str, dict[str, Any]]:
    """Services running the meter image: the replicas, the migration and the simulator."""
    return {name: s for name, s in compose()["services"].items() if s.get("image") == "meter:local"}


def replicas() -> dict[str, dict[str, Any]]:
    return {name: s for name, s in meter_services().items() if "command" not in s}


def test_compose_has_the_topology() -> None:
    services = compose()["services"]
    assert {"postgres", "redis", "migrate", "lb", "prometheus", "grafana", "otel-collector"} <= set(services)
    assert sorted(replicas()) == ["meter-1", "meter-2"]
    for service in meter_services().values():
        assert (
            service["build"]["context"] == ".." and (DEPLOY / ".." / service["build"]["dockerfile"]).is_file()
        )


def test_compose_environment_is_what_meter_reads_and_accepts() -> None:
    for name, service in meter_services().items():
        settings = assert_meter_accepts(_env(service), f"compose service {name}")
        if name in replicas():
            assert settings.database_url.startswith("postgresql") and settings.redis_url
            assert settings.key_secret and settings.host == "0.0.0.0"
            assert settings.otel_environment  # traces and GenAI metrics go to the collector


def test_compose_commands_are_meter_commands() -> None:
    default = _exec_form(dict(dockerfile_instructions())["CMD"])
    commands = {name: meter_command(s.get("command", default)) for name, s in meter_services().items()}
    assert commands == {
        "meter-1": ["serve"],
        "meter-2": ["serve"],
        "migrate": ["db", "upgrade"],
        "simulator": ["simulate"],
    }


def test_compose_migrates_before_any_replica_starts_and_stops_gracefully() -> None:
    for name, service in replicas().items():
        assert service["depends_on"]["migrate"]["condition"] == "service_completed_successfully", name
        stop_grace = re.fullmatch(r"(\d+)s", service["stop_grace_period"])
        assert stop_grace and float(stop_grace.group(1)) > load_settings(_env(service)).shutdown_grace, name


def test_compose_gives_every_replica_its_own_journal_volume() -> None:
    volumes = []
    for name, service in replicas().items():
        journal = _env(service)["METER_JOURNAL_DIR"]
        mounts = [v for v in service["volumes"] if v.split(":")[1] == journal]
        assert len(mounts) == 1, f"{name}: no volume at {journal}"
        volumes.append(mounts[0].split(":")[0])
    assert len(set(volumes)) == len(volumes) and set(volumes) <= set(compose()["volumes"])


def test_compose_health_checks_probe_meters_endpoints() -> None:
    for name, service in replicas().items():
        port = _env(service)["METER_PORT"]
        urls = re.findall(r"http://127\.0\.0\.1:(\d+)(/\w+)", " ".join(service["healthcheck"]["test"]))
        assert urls and all(p == port and path in PATHS for p, path in urls), (name, urls)


def test_compose_load_balancer_and_prometheus_reach_every_replica() -> None:
    targets = {f"{name}:{_env(s)['METER_PORT']}" for name, s in replicas().items()}
    nginx = (DEPLOY / "nginx" / "meter.conf").read_text()
    assert set(re.findall(r"^\s*server\s+(\S+?:\d+)", nginx, re.M)) == targets
    lb = compose()["services"]["lb"]
    (mount,) = [v for v in lb["volumes"] if v.startswith("./nginx/")]
    assert (DEPLOY / mount.split(":")[0]).resolve() == (DEPLOY / "nginx" / "meter.conf").resolve()
    listen = re.search(r"^\s*listen\s+(\d+);", nginx, re.M).group(1)  # type: ignore[union-attr]
    assert any(p.split(":")[-1] == listen for p in lb["ports"])

    config = yaml.safe_load(compose()["configs"]["prometheus"]["content"])
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "meter"]  # the alert rules' job
    assert job.get("metrics_path", "/metrics") in PATHS
    assert {t for c in job["static_configs"] for t in c["targets"]} == targets


@pytest.mark.integration
def test_compose_prometheus_config_loads_the_alert_rules(tmp_path: Path) -> None:
    service = compose()["services"]["prometheus"]
    content = compose()["configs"]["prometheus"]["content"]
    config = yaml.safe_load(content)
    (rules_mount,) = [v for v in service["volumes"] if v.startswith("./prometheus/rules:")]
    source, target = rules_mount.split(":")[:2]
    assert (DEPLOY / source).resolve() == RULE_FILES[0].parent
    assert config["rule_files"] == [f"{target}/*.yml"]
    # promtool checks the configuration with the rule files where this checkout has them.
    config["rule_files"] = [str(path) for path in RULE_FILES]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    check = subprocess.run(
        [promtool(), "check", "config", str(path)], capture_output=True, text=True, timeout=60
    )
    assert check.returncode == 0, check.stdout + check.stderr


def test_compose_grafana_provisions_the_datasource_and_the_dashboards() -> None:
    grafana = compose()["services"]["grafana"]
    mounts = dict(v.split(":")[:2] for v in grafana["volumes"] if v.startswith("."))
    provisioning = DEPLOY / next(s for s, t in mounts.items() if t == "/etc/grafana/provisioning")
    assert provisioning.resolve() == (DEPLOY / "grafana" / "provisioning").resolve()
    (datasource,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())[
        "datasources"
    ]
    assert datasource["type"] == "prometheus" and datasource["isDefault"]
    url = urlsplit(datasource["url"])
    assert url.hostname in compose()["services"] and url.hostname == "prometheus"
    assert any(p.split(":")[-1] == str(url.port) for p in compose()["services"]["prometheus"]["ports"])
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "meter.yaml").read_text())["providers"]
    dashboards = DEPLOY / next(s for s, t in mounts.items() if t == provider["options"]["path"])
    assert dashboards.resolve() == (ROOT / "dashboards").resolve()
    assert sorted(p.name for p in dashboards.glob("*.json")) == sorted(p.name for p in DASHBOARDS)
    assert len(DASHBOARDS) == 4


def test_compose_sends_telemetry_to_the_collector() -> None:
    collector = yaml.safe_load((DEPLOY / "otel" / "collector.yaml").read_text())
    services = compose()["services"]
    (mount,) = services["otel-collector"]["volumes"]
    assert (DEPLOY / mount.split(":")[0]).resolve() == (DEPLOY / "otel" / "collector.yaml").resolve()
    http = urlsplit("http://" + collector["receivers"]["otlp"]["protocols"]["http"]["endpoint"])
    for name, service in replicas().items():
        endpoint = urlsplit(_env(service)["OTEL_EXPORTER_OTLP_ENDPOINT"])
        assert endpoint.hostname == "otel-collector" and endpoint.port == http.port, name
    for pipeline in collector["service"]["pipelines"].values():
        for kind in ("receivers", "processors", "exporters"):
            assert set(pipeline.get(kind, [])) <= set(collector[kind])
    exporter = urlsplit("http://" + collector["exporters"]["prometheus"]["endpoint"])
    config = yaml.safe_load(compose()["configs"]["prometheus"]["content"])
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "otel-collector"]
    assert job["static_configs"][0]["targets"] == [f"otel-collector:{exporter.port}"]


def test_compose_mounts_exist() -> None:
    for name, service in compose()["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name}: {source} does not exist"


@pytest.mark.integration
def test_compose_load_balancer_config_is_valid_nginx(tmp_path: Path) -> None:
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if nginx is None:
        pytest.fail("nginx is not installed: apt-get install nginx (.ci/run installs it)")
    server = (DEPLOY / "nginx" / "meter.conf").read_text()
    server = re.sub(r"\bmeter-\d+:", "127.0.0.1:", server)  # compose's service names resolve only there
    (tmp_path / "meter.conf").write_text(server)
    (tmp_path / "nginx.conf").write_text(
        f"pid {tmp_path}/nginx.pid;\nevents {{}}\nhttp {{\n  include {tmp_path}/meter.conf;\n}}\n"
    )
    check = subprocess.run(
        [
            nginx,
            "-t",
            "-q",
            "-e",
            str(tmp_path / "error.log"),
            "-p",
            str(tmp_path),
            "-c",
            str(tmp_path / "nginx.conf"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert check.returncode == 0, check.stdout + check.stderr + (tmp_path / "error.log").read_text()


# --- the Helm chart --------------------------------------------------------------------------------

RENDER_VALUES: dict[str, Any] = {
    "secret": {
        "databaseUrl": "postgresql+asyncpg://meter:password@postgres:5432/meter",
        "keySecret": SECRET,
        "adminToken": "admin-token",
        "redisUrl": "redis://redis:6379/0",
    },
    "meter": {"env": {"METER_UNKNOWN_KEYS": "reject", "OTEL_SERVICE_NAME": "meter"}},
    "metrics": {
        "serviceMonitor": {"enabled": True},
        "podMonitor": {"enabled": True},
        "prometheusRule": {"enabled": True},
    },
    "grafanaDashboards": {"enabled": True},
    "upstreamCredentials": {"existingSecret": "upstream-credentials"},
}


def chart_values() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((CHART / "values.yaml").read_text())
    return loaded


def strip_template(text: str) -> str:
    """A template with its actions removed: whole-line actions dropped, inline ones replaced by a
    placeholder. What is left must be YAML (a check for when Helm is not at hand)."""
    text = re.sub(r"\{\{-?\s*/\*.*?\*/\s*-?\}\}", "", text, flags=re.S)  # comments
    text = re.sub(r"\{\{[^}]*\n[^}]*\}\}", "", text)  # actions spanning lines (a dict literal)
    lines = []
    for line in text.splitlines():
        if re.fullmatch(r"\s*(\{\{.*?\}\}\s*)+", line):
            continue
        lines.append(re.sub(r"\{\{.*?\}\}", "x", line))
    return "\n".join(lines)


def test_chart_metadata() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2" and chart["name"] == "meter" and chart["type"] == "application"
    from importlib.metadata import version

    assert chart["appVersion"] == version("meter")  # the image tag defaults to it


@pytest.mark.parametrize("path", sorted(TEMPLATES.glob("*.yaml")), ids=lambda p: p.name)
def test_chart_template_is_yaml_once_its_actions_are_stripped(path: Path) -> None:
    for document in yaml.safe_load_all(strip_template(path.read_text())):
        assert document is None or isinstance(document, dict)


def test_chart_sets_only_variables_meter_reads() -> None:
    names = set()
    for path in [*TEMPLATES.iterdir(), CHART / "values.yaml"]:
        names |= set(VARIABLE.findall(path.read_text()))
    assert {"METER_PORT", "METER_DATABASE_URL", "METER_KEY_SECRET", "METER_JOURNAL_DIR"} <= names
    assert_meter_reads(names, "the Helm chart")
    assert_meter_reads(set(chart_values()["meter"]["env"]), "values.yaml meter.env")


def test_chart_commands_ports_and_probes_match_meter() -> None:
    workload = (TEMPLATES / "workload.yaml").read_text()
    job = (TEMPLATES / "migration-job.yaml").read_text()
    assert [meter_command(yaml.safe_load(a)) for a in re.findall(r"args: (\[.*\])", workload)] == [["serve"]]
    assert [meter_command(yaml.safe_load(a)) for a in re.findall(r"args: (\[.*\])", job)] == [
        ["db", "upgrade"]
    ]
    probes = dict(re.findall(r"(\w+Probe):\s*\n\s*httpGet:\s*\n\s*path: (\S+)", workload))
    assert probes == {"startupProbe": "/healthz", "livenessProbe": "/healthz", "readinessProbe": "/readyz"}
    for monitor in ("servicemonitor.yaml", "podmonitor.yaml"):
        assert re.search(r"path: (\S+)", (TEMPLATES / monitor).read_text()).group(1) in PATHS  # type: ignore[union-attr]
        assert "jobLabel: app.kubernetes.io/name" in (TEMPLATES / monitor).read_text()  # job="meter"
    values = chart_values()
    assert values["meter"]["port"] == DEFAULT_PORT == values["service"]["port"]
    assert values["meter"]["shutdownGrace"] == Settings().shutdown_grace


def test_chart_termination_grace_covers_meters_drain() -> None:
    values = chart_values()
    grace = (
        values["lifecycle"]["preStopSeconds"]
        + values["meter"]["shutdownGrace"]
        + values["lifecycle"]["drainSeconds"]
    )
    assert grace > values["lifecycle"]["preStopSeconds"] + values["meter"]["shutdownGrace"]
    assert (
        'terminationGracePeriodSeconds: {{ include "meter.terminationGracePeriodSeconds" . }}'
        in (TEMPLATES / "workload.yaml").read_text()
    )


def test_chart_links_to_the_shipped_rules_and_dashboards() -> None:
    rules = CHART / "files" / "meter-alerts.yml"
    assert rules.is_symlink() and rules.resolve() == (DEPLOY / "prometheus" / "rules" / "meter-alerts.yml")
    assert (CHART / "dashboards").is_symlink() and (CHART / "dashboards").resolve() == ROOT / "dashboards"
    assert sorted(p.name for p in (CHART / "dashboards").glob("*.json")) == sorted(p.name for p in DASHBOARDS)


# Rendering, when Helm is at hand.


def _render_with_binary(helm: str, values: dict[str, Any], tmp_path: Path) -> dict[str, str]:
    values_file = tmp_path / "values.yaml"
    values_file.write_text(yaml.safe_dump(values))
    done = subprocess.run(
        [helm, "template", "meter", str(CHART), "--namespace", "prod", "-f", str(values_file)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if done.returncode != 0:
        raise RuntimeError(done.stderr)
    return {"all": done.stdout}


def _render_with_sdk(values: dict[str, Any]) -> dict[str, str]:
    import helm_python

    with helm_python.Chart.load(str(CHART)) as chart:
        rendered: dict[str, str] = chart.render(values, name="meter", namespace="prod")
    return rendered


@pytest.fixture
def render(tmp_path: Path) -> Iterator[Any]:
    helm = shutil.which("helm")
    try:
        import helm_python  # noqa: F401

        sdk = True
    except ImportError:
        sdk = False
    if helm is None and not sdk:
        pytest.fail(
            "Helm is not installed (no helm binary, and the test extra's helm-python-sdk is missing): "
            "install the test extra, or render by hand: helm template meter deploy/helm/meter"
        )

    def run(values: dict[str, Any]) -> list[dict[str, Any]]:
        files = _render_with_binary(helm, values, tmp_path) if helm else _render_with_sdk(values)
        return [
            document
            for name, text in files.items()
            if not name.endswith("NOTES.txt")
            for document in yaml.safe_load_all(text)
            if document
        ]

    yield run


def test_chart_lints_clean(render: Any, tmp_path: Path) -> None:
    helm = shutil.which("helm")
    if helm:
        values_file = tmp_path / "values.yaml"
        values_file.write_text(yaml.safe_dump(RENDER_VALUES))
        done = subprocess.run(
            [helm, "lint", "--strict", str(CHART), "-f", str(values_file)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return
    import helm_python

    report = helm_python.lint(str(CHART), RENDER_VALUES, strict=True)
    warnings = [m for m in report["messages"] if m["severity"] >= 2]  # 1 is info ("icon is recommended")
    assert not report["errors"] and not warnings, report


def _by_kind(documents: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    kinds: dict[str, list[dict[str, Any]]] = {}
    for document in documents:
        kinds.setdefault(document["kind"], []).append(document)
    return kinds


def _is_hook(document: dict[str, Any]) -> bool:
    return "helm.sh/hook" in document["metadata"].get("annotations", {})


@pytest.mark.parametrize("persistent", [False, True], ids=["deployment", "statefulset"])
def test_rendered_chart_is_consistent_with_meter(render: Any, persistent: bool) -> None:
    values = json.loads(json.dumps(RENDER_VALUES))
    values["journal"] = {"persistence": {"enabled": persistent}}
    kinds = _by_kind(render(values))
    workload_kind = "StatefulSet" if persistent else "Deployment"
    expected = {"Service", "ConfigMap", "Secret", "Job", "HorizontalPodAutoscaler", "PodDisruptionBudget"}
    assert expected | {workload_kind, "ServiceMonitor", "PodMonitor", "PrometheusRule"} <= set(kinds)
    (workload,) = kinds[workload_kind]
    pod = workload["spec"]["template"]
    (container,) = pod["spec"]["containers"]

    # Environment: the ConfigMap and the Secret, exactly what meter reads, and what it accepts.
    (config,) = [c for c in kinds["ConfigMap"] if not c["metadata"]["name"].endswith("-dashboards")]
    (secret,) = [s for s in kinds["Secret"] if not _is_hook(s)]
    sources = {ref.get("configMapRef", ref.get("secretRef"))["name"] for ref in container["envFrom"]}
    assert sources == {config["metadata"]["name"], secret["metadata"]["name"]}
    env = {**config["data"], **secret["stringData"]}
    settings = assert_meter_accepts(env, "the rendered chart")
    assert settings.key_secret == SECRET and settings.redis_url and not settings.auto_migrate

    # Command, port and probes.
    assert container.get("command") is None and meter_command(container["args"]) == ["serve"]
    (port,) = container["ports"]
    assert port["containerPort"] == settings.port and port["name"] == "http"
    for probe, path in (
        ("startupProbe", "/healthz"),
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
    ):
        assert container[probe]["httpGet"] == {"path": path, "port": "http"}
    service = next(s for s in kinds["Service"] if s["spec"].get("clusterIP") != "None")
    assert service["spec"]["ports"][0]["targetPort"] == "http"

    # SIGTERM: the preStop sleep and meter's grace fit in the termination grace period.
    sleep = container["lifecycle"]["preStop"]["exec"]["command"]
    assert (
        sleep[0] == "sleep"
        and int(sleep[1]) + settings.shutdown_grace < pod["spec"]["terminationGracePeriodSeconds"]
    )

    # The journal on a volume that survives container restarts, where METER_JOURNAL_DIR says.
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == settings.journal_dir]
    if persistent:
        assert [c["metadata"]["name"] for c in workload["spec"]["volumeClaimTemplates"]] == [mount["name"]]
    else:
        (volume,) = [v for v in pod["spec"]["volumes"] if v["name"] == mount["name"]]
        assert "emptyDir" in volume
    credentials = [m for m in container["volumeMounts"] if m["name"] == "upstream-credentials"]
    assert settings.upstream_credentials_file == credentials[0]["mountPath"] + "/credentials.toml"
    assert (
        container["securityContext"]["readOnlyRootFilesystem"]
        and pod["spec"]["securityContext"]["runAsNonRoot"]
    )

    # Selectors: the Service, PDB and monitors select the replicas and never the migration's pod.
    labels = pod["metadata"]["labels"]
    (job,) = kinds["Job"]
    job_labels = job["spec"]["template"]["metadata"]["labels"]
    selectors = [service["spec"]["selector"]]
    selectors += [
        d["spec"]["selector"]["matchLabels"]
        for k in ("PodDisruptionBudget", "ServiceMonitor", "PodMonitor")
        for d in kinds[k]
    ]
    for selector in selectors:
        assert selector.items() <= labels.items() and not selector.items() <= job_labels.items()
    (hpa,) = kinds["HorizontalPodAutoscaler"]
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": workload_kind,
        "name": workload["metadata"]["name"],
    }

    # The migration: `meter db upgrade` as a hook before install and upgrade, with a database URL.
    assert set(job["metadata"]["annotations"]["helm.sh/hook"].split(",")) == {"pre-install", "pre-upgrade"}
    (migrate,) = job["spec"]["template"]["spec"]["containers"]
    assert meter_command(migrate["args"]) == ["db", "upgrade"]
    assert_meter_accepts(
        {e["name"]: "postgresql://x@y/z" if "valueFrom" in e else e["value"] for e in migrate["env"]},
        "the migration Job",
    )
    (hook_secret,) = [s for s in kinds["Secret"] if _is_hook(s)]
    assert int(hook_secret["metadata"]["annotations"]["helm.sh/hook-weight"]) < int(
        job["metadata"]["annotations"]["helm.sh/hook-weight"]
    )
    ref = migrate["env"][0]["valueFrom"]["secretKeyRef"]
    assert ref["name"] == hook_secret["metadata"]["name"] and ref["key"] in hook_secret["stringData"]

    # Monitoring: every replica's /metrics; meter's own alert rules; meter's own dashboards.
    for monitor, key in (("ServiceMonitor", "endpoints"), ("PodMonitor", "podMetricsEndpoints")):
        (endpoint,) = kinds[monitor][0]["spec"][key]
        assert endpoint["port"] == "http" and endpoint["path"] in PATHS
    (rule,) = kinds["PrometheusRule"]
    assert rule["spec"]["groups"] == yaml.safe_load(RULE_FILES[0].read_text())["groups"]
    (dashboards,) = [c for c in kinds["ConfigMap"] if c["metadata"]["name"].endswith("-dashboards")]
    assert sorted(dashboards["data"]) == sorted(p.name for p in DASHBOARDS)
    assert all(json.loads(dashboards["data"][p.name]) == json.loads(p.read_text()) for p in DASHBOARDS)


def test_rendered_chart_with_an_existing_secret(render: Any) -> None:
    kinds = _by_kind(render({"secret": {"existingSecret": "meter-secrets"}}))
    assert "Secret" not in kinds  # neither the release's nor the migration's
    (workload,) = kinds["Deployment"]
    refs = [
        r["secretRef"]["name"]
        for r in workload["spec"]["template"]["spec"]["containers"][0]["envFrom"]
        if "secretRef" in r
    ]
    assert refs == ["meter-secrets"]
    (job,) = kinds["Job"]
    assert (
        job["spec"]["template"]["spec"]["containers"][0]["env"][0]["valueFrom"]["secretKeyRef"]["name"]
        == "meter-secrets"
    )


def test_rendered_chart_refuses_what_meter_would_refuse(render: Any) -> None:
    for values in (
        {},  # no database URL, no key secret
        {"secret": {"databaseUrl": "postgresql://x@y/z", "keySecret": "too-short"}},
        {
            "secret": {"existingSecret": "s"},
            "meter": {"env": {"LOG_LEVEL": "debug"}},
        },  # not a METER_* variable
    ):
        with pytest.raises(Exception, match=r"keySecret|at least 16|only METER_"):
            render(values)


# --- the local topology's scripts ------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize("script", sorted(LOCAL.glob("*.sh")), ids=lambda p: p.name)
def test_local_script_is_valid_bash_and_sets_only_meters_variables(script: Path) -> None:
    check = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stderr
    assert_meter_reads(set(VARIABLE.findall(script.read_text())) - {"METER_"}, str(script.relative_to(ROOT)))


def test_local_nginx_template_is_filled_in_completely() -> None:
    fields = set(re.findall(r"@[A-Z_]+@", (LOCAL / "nginx.conf.template").read_text()))
    up = (LOCAL / "up.sh").read_text()
    assert fields and all(f"conf//{field}/" in up for field in fields), fields
    # The proxy settings are those of the compose load balancer.
    compose_settings = set(
        re.findall(r"^\s*(proxy_\w+ [^;]+;)", (DEPLOY / "nginx" / "meter.conf").read_text(), re.M)
    )
    local_settings = set(
        re.findall(r"^\s*(proxy_\w+ [^;]+;)", (LOCAL / "nginx.conf.template").read_text(), re.M)
    )
    assert {s for s in compose_settings if "@" not in s and "tries" not in s} <= local_settings


def test_local_prometheus_scrapes_with_the_shipped_rules() -> None:
    up = (LOCAL / "up.sh").read_text()
    assert "$REPO_DIR/deploy/prometheus/rules/*.yml" in up and "job_name: meter" in up


# --- the documentation ------------------------------------------------------------------------------


def readme_meter_commands() -> list[list[str]]:
    """The arguments of every ``meter ...`` command in deploy/README.md's shell blocks (not those run
    through docker or kubectl, whose arguments follow the image's entrypoint)."""
    readme = (DEPLOY / "README.md").read_text()
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", readme, re.S):
        block = re.sub(r"\\\n\s*", " ", block)
        block = re.sub(r"\$\([^)]*\)", "VALUE", block)  # $(openssl rand ...)
        for line in block.splitlines():
            words = shlex.split(line, comments=True)
            for i, word in enumerate(words):
                is_meter = (word == "meter" or word.endswith("/meter")) and words[i + 1 : i + 2] != []
                if is_meter and words[i + 1].isalpha() and not {"docker", "kubectl", "helm"} & set(words[:i]):
                    args = words[i + 1 :]
                    ends = [j for j, w in enumerate(args) if w in {"|", "||", "&&", ";", "<<<", ">", "&"}]
                    commands.append(args[: ends[0]] if ends else args)
    return commands


def test_deploy_readme_commands_are_meter_commands() -> None:
    commands = readme_meter_commands()
    assert len(commands) >= 5
    for args in commands:
        meter_command(args)
