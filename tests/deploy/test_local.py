"""The multi-replica topology, run from native processes by deploy/local/up.sh as an operator would.

``up.sh`` starts three `meter serve` replicas behind nginx, the simulator as the upstream, and a
Prometheus scraping every replica with meter's alert rules; the replicas share the machine's
PostgreSQL (a fresh database per run) and Redis (a fresh key prefix per run). The test drives traffic
with the ``openai`` SDK through the load balancer, kills one replica with SIGKILL mid-load and restarts
it with ``replica.sh``, and then checks what an operator relies on: every request a client saw
complete is in the database exactly once, every replica was scraped, the alert rules are loaded, and
every dashboard query returns data. A separate test holds a team's rate limit across the replicas.

nginx, prometheus, PostgreSQL and Redis are required: the tests fail, never skip, without them
(``.ci/run`` installs nginx and prometheus from Debian's packages).
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import openai
import pytest
import redis

from tests.conftest import wait_for
from tests.conftest_db import create_database, drop_database, postgres_url_for, unique_database_name
from tests.deploy.test_prometheus_real import drive_traffic, pending_metrics
from tests.support.paths import ROOT
from tests.support.processes import free_port
from tests.support.prometheus import PromQLError, alert_rules, dashboard_expressions, referenced_metrics

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

LOCAL = ROOT / "deploy" / "local"
REDIS_URL = "redis://127.0.0.1:6379/0"  # the machine's, as in the quota tests
KEY_SECRET = "deploy-test-secret-0123456789abcdef"
ADMIN_TOKEN = "deploy-test-admin-token"
REPLICAS = 3
SCRAPE_INTERVAL = 1.0
MESSAGES = [{"role": "user", "content": "count to five"}]
QUOTA_TEAM = "quota-team"
QUOTA_KEY = "fw-deploy-quota-key-0001"
QUOTA_RPM = 12


def _require_tools() -> None:
    missing = [
        f"{name} (apt-get install {name}; .ci/run installs it)"
        for name in ("nginx", "prometheus")
        if not (shutil.which(name) or Path(f"/usr/sbin/{name}").exists())
    ]
    if missing:
        pytest.fail(f"the local topology needs {', '.join(missing)}", pytrace=False)
    try:
        redis.Redis.from_url(REDIS_URL, socket_timeout=3).ping()
    except redis.RedisError as exc:
        pytest.fail(f"Redis is not reachable at {REDIS_URL} ({exc}); the replicas share it", pytrace=False)


def _meter_environment() -> dict[str, str]:
    """The caller's environment without METER_*/OTEL_*, plus the topology's key secret: what the CLI
    needs to act on the topology's database (keys are fingerprinted with that secret)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("METER_", "OTEL_"))}
    env["METER_KEY_SECRET"] = KEY_SECRET
    return env


def meter_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meter", *args],
        env=_meter_environment(),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


@dataclass
class Topology:
    state_dir: Path
    database_url: str
    lb_port: int
    replica_ports: list[int]
    prometheus_port: int
    quota_setup: list[subprocess.CompletedProcess[str]] = field(default_factory=list)

    @property
    def lb_url(self) -> str:
        return f"http://127.0.0.1:{self.lb_port}"

    @property
    def prometheus_url(self) -> str:
        return f"http://127.0.0.1:{self.prometheus_port}"

    def replica_address(self, n: int) -> str:
        return f"127.0.0.1:{self.replica_ports[n - 1]}"

    def script(self, name: str, *args: str, timeout: float = 120) -> str:
        done = subprocess.run(
            ["bash", str(LOCAL / name), *args],
            env={k: v for k, v in os.environ.items() if not k.startswith("METER_")},
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert done.returncode == 0, f"{name} {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
        return done.stdout

    def replica(self, action: str, n: int) -> str:
        return self.script("replica.sh", "--state-dir", str(self.state_dir), action, str(n))

    def query(self, expr: str) -> list[dict[str, Any]]:
        response = httpx.get(f"{self.prometheus_url}/api/v1/query", params={"query": expr}, timeout=10)
        body = response.json()
        if body.get("status") != "success":
            raise PromQLError(body.get("error", response.text))
        return list(body["data"]["result"])

    def api(self, path: str) -> Any:
        return httpx.get(f"{self.prometheus_url}/api/v1/{path}", timeout=10).json()["data"]


@pytest.fixture(scope="module")
def topology(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Topology]:
    _require_tools()
    name = unique_database_name()
    asyncio.run(create_database(name))
    database_url = postgres_url_for(name)
    prefix = f"meter:test:{secrets.token_hex(4)}:"
    state_dir = tmp_path_factory.mktemp("local-topology")
    ports = [free_port() for _ in range(REPLICAS + 3)]
    topology = Topology(state_dir, database_url, ports[0], ports[3:], ports[1])
    try:
        # The operator's order: migrate, configure teams, keys and limits, then start the replicas.
        migrated = meter_cli("db", "upgrade", "--database", database_url)
        assert migrated.returncode == 0, migrated.stderr
        for args, stdin in (
            (("team", "create", QUOTA_TEAM), None),
            (("key", "register", QUOTA_TEAM), QUOTA_KEY + "\n"),
        ):
            done = meter_cli(*args, "--database", database_url, stdin=stdin)
            assert done.returncode == 0, done.stdout + done.stderr
        # Quotas: held only by test_a_team_rate_limit_holds_across_replicas, which reads this outcome.
        topology.quota_setup.append(
            meter_cli(
                *f"quota set --team {QUOTA_TEAM} --rpm {QUOTA_RPM} --budget-usd 1000".split(),
                "--database",
                database_url,
            )
        )
        topology.script(
            "up.sh",
            "--state-dir", str(state_dir),
            "--replicas", str(REPLICAS),
            "--database", database_url,
            "--redis", REDIS_URL,
            "--quota-prefix", prefix,
            "--lb-port", str(ports[0]),
            "--prometheus-port", str(ports[1]),
            "--simulator-port", str(ports[2]),
            "--replica-ports", ",".join(map(str, ports[3:])),
            "--scrape-interval", f"{SCRAPE_INTERVAL:g}s",
            "--key-secret", KEY_SECRET,
            "--admin-token", ADMIN_TOKEN,
            "--python", sys.executable,
            "--env", "METER_LOG_LEVEL=warning",
        )  # fmt: skip
        yield topology
    finally:
        try:
            topology.script("down.sh", "--state-dir", str(state_dir))
        except AssertionError as exc:
            print(f"\ndown.sh: {exc}")  # the tests' own outcome matters more than this one
        asyncio.run(drop_database(name))
        client = redis.Redis.from_url(REDIS_URL)
        keys = list(client.scan_iter(match=prefix + "*", count=1000))
        if keys:
            client.delete(*keys)


class Load:
    """Client threads sending streamed and non-streamed chat completions through the load balancer until
    stopped; remembers the response id and the answering replica of every request that completed from
    the client's point of view."""

    def __init__(self, base_url: str, threads: int = 6) -> None:
        self.base_url = base_url
        self.completed: list[tuple[str, str, float]] = []  # (response id, replica, finished at)
        self.failures: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def _run(self, index: int) -> None:
        client = openai.OpenAI(base_url=self.base_url, api_key=f"fw-load-{index}", max_retries=0, timeout=10)
        n = 0
        while not self._stop.is_set():
            n += 1
            stream = n % 2 == 1
            try:
                raw = client.chat.completions.with_raw_response.create(
                    model="m",
                    messages=MESSAGES,  # type: ignore[arg-type]
                    max_tokens=5,
                    stream=stream,
                )
                parsed: Any = raw.parse()
                response_id = [chunk.id for chunk in parsed][-1] if stream else parsed.id
            except (openai.APIError, httpx.HTTPError) as exc:
                with self._lock:
                    self.failures.append(type(exc).__name__)
                time.sleep(0.01)
                continue
            # nginx lists every replica it tried; the last one answered.
            replica = raw.headers.get("x-meter-replica", "").split(",")[-1].strip()
            with self._lock:
                self.completed.append((response_id, replica, time.monotonic()))

    def count(self, replica: str | None = None, since: float = 0.0) -> int:
        with self._lock:
            return sum(1 for _, r, t in self.completed if t >= since and (replica is None or r == replica))

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(20)


def _rows(url: str) -> list[asyncpg.Record]:
    async def fetch() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(url)
        try:
            return list(await conn.fetch("SELECT event_id, response_id FROM usage_events"))
        finally:
            await conn.close()

    return asyncio.run(fetch())


def _rollup_requests(url: str) -> int:
    async def fetch() -> int:
        conn = await asyncpg.connect(url)
        try:
            return int(await conn.fetchval("SELECT COALESCE(SUM(requests), 0) FROM usage_hourly"))
        finally:
            await conn.close()

    return asyncio.run(fetch())


def test_replicas_behind_the_balancer_lose_nothing_when_one_is_killed(topology: Topology) -> None:
    started = time.monotonic()
    replicas = [topology.replica_address(n) for n in range(1, REPLICAS + 1)]
    victim = replicas[1]
    with Load(topology.lb_url + "/v1") as load:
        wait_for(
            lambda: all(load.count(r) >= 20 for r in replicas), 60, "traffic on every replica before the kill"
        )
        topology.replica("kill", 2)  # SIGKILL mid-load
        killed_at = time.monotonic()
        wait_for(lambda: load.count(since=killed_at) >= 100, 60, "the other replicas carrying the load")
        topology.replica("start", 2)  # the same port and journal directory
        restarted_at = time.monotonic()
        wait_for(lambda: load.count(victim, since=restarted_at) >= 20, 60, "traffic on the restarted replica")
    print(
        f"\n{len(load.completed)} completed, {len(load.failures)} failed {dict(Counter(load.failures))} "
        f"(in flight on the killed replica), per replica {dict(Counter(r for _, r, _ in load.completed))}"
    )
    # Only requests in flight on (or already sent to) the killed replica may fail.
    assert len(load.failures) <= 50, Counter(load.failures)
    # Every request a client saw complete is in the database exactly once.
    url = topology.database_url
    completed = [response_id for response_id, _, _ in load.completed]
    assert len(completed) == len(set(completed))
    try:
        rows = wait_for(
            lambda: (r := _rows(url)) and {x["response_id"] for x in r} >= set(completed) and r,
            timeout=30,
            message="every completed request in the database",
        )
    except AssertionError:
        missing = set(completed) - {r["response_id"] for r in _rows(url)}
        raise AssertionError(
            f"{len(missing)} of {len(completed)} completed requests are not in the database"
        ) from None
    ids = Counter(r["response_id"] for r in rows if r["response_id"] is not None)
    assert not [i for i, n in ids.items() if n > 1], "a request was recorded twice"
    wait_for(
        lambda: _rollup_requests(url) == len(_rows(url)),
        10,
        "hourly rollups equal to the raw events",
    )

    # Prometheus scraped every replica, the restarted one included, and loaded the alert rules.
    wait_for(
        lambda: len(topology.query('up{job="meter"} == 1')) == REPLICAS, 20, "every replica up in Prometheus"
    )

    # The restarted replica's counters exist only once it has served a request: wait for a scrape
    # that came after that rather than reading whichever scrape is the latest now.
    def scraped() -> dict[str, float]:
        return {s["metric"]["instance"]: float(s["value"][1]) for s in topology.query(
            'sum by (instance) (meter_requests_total{job="meter"})'
        )}  # fmt: skip

    try:
        wait_for(lambda: set(scraped()) == set(replicas), 30, "requests of every replica in Prometheus")
    except AssertionError:
        raise AssertionError(f"scraped {scraped()}, replicas {replicas}") from None
    assert all(v > 0 for v in scraped().values()), scraped()
    print(f"test body: {time.monotonic() - started:.1f} s")


def quota_burst(topology: Topology, requests: int) -> list[tuple[int, str, str | None]]:
    """``requests`` chat completions with the rate-limited team's key through the load balancer, one
    after the other: (status, answering replica, error code) of each."""
    headers = {"Authorization": f"Bearer {QUOTA_KEY}"}
    body = {"model": "m", "messages": MESSAGES, "max_tokens": 2}
    answers: list[tuple[int, str, str | None]] = []
    with httpx.Client(base_url=topology.lb_url, timeout=10) as client:
        for _ in range(requests):
            response = client.post("/v1/chat/completions", json=body, headers=headers)
            code = response.json()["error"]["code"] if response.status_code == 429 else None
            answers.append((response.status_code, response.headers.get("x-meter-replica", ""), code))
    return answers


def test_a_team_rate_limit_holds_across_replicas(topology: Topology) -> None:
    for done in topology.quota_setup:
        assert done.returncode == 0, f"meter {' '.join(map(str, done.args[3:]))}: {done.stdout}{done.stderr}"
    answers = quota_burst(topology, 3 * QUOTA_RPM)  # well within one 60-second window
    statuses = Counter(status for status, _, _ in answers)
    # One counter in Redis for the whole team: QUOTA_RPM admitted in all, not QUOTA_RPM per replica.
    assert statuses == {200: QUOTA_RPM, 429: 2 * QUOTA_RPM}, statuses
    assert {code for status, _, code in answers if status == 429} == {"rate_limit_exceeded"}
    assert len({replica for status, replica, _ in answers if status == 200}) >= 2
    assert len({replica for status, replica, _ in answers if status == 429}) >= 2


def test_up_sh_refuses_a_second_topology_in_the_same_state_dir(topology: Topology) -> None:
    done = subprocess.run(
        ["bash", str(LOCAL / "up.sh"), "--state-dir", str(topology.state_dir), "--python", sys.executable],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0 and "already running" in done.stderr, done.stderr
    status = topology.script("replica.sh", "--state-dir", str(topology.state_dir), "status")
    assert re.search(r"replica 1 .* running", status), status


def test_every_dashboard_query_returns_data(topology: Topology) -> None:
    # Varied traffic (errors, aborts, every endpoint) and a team past its rate limit, so that every
    # panel has something to show.
    traffic_started = time.time()
    assert drive_traffic(topology.lb_url + "/v1", seconds=4) > 50
    quota_burst(topology, 2 * QUOTA_RPM)
    wait_for(  # two scrapes after the last request, so that rate() has what it needs everywhere
        lambda: all(
            float(s["value"][1]) > traffic_started + 4 + 2 * SCRAPE_INTERVAL
            for s in topology.query('timestamp(up{job="meter"})')
        ),
        20,
        "two scrapes after the traffic",
    )
    wait_for(
        lambda: all(
            g.get("lastEvaluation", "0001").startswith("20") for g in topology.api("rules")["groups"]
        ),
        20,
        "a rule evaluation",
    )
    rules = [rule for group in topology.api("rules")["groups"] for rule in group["rules"]]
    assert len(rules) == len(alert_rules()) and all(r["health"] == "ok" for r in rules)

    # Every dashboard query returns data (or is explained: a metric this build cannot have yet).
    exposition = httpx.get(f"http://{topology.replica_address(1)}/metrics", timeout=10).text
    pending = pending_metrics(exposition)
    failures, explained = [], []
    for expression in dashboard_expressions():
        try:
            result = topology.query(expression.expr)
        except PromQLError as exc:
            failures.append(f"{expression.source}: invalid: {exc}")
            continue
        if result:
            continue
        metrics = referenced_metrics(expression.expr)
        empty = sorted(m for m in metrics if not topology.query(f'count({{__name__="{m}"}})'))
        if empty and all(m in pending for m in empty):
            explained.append(expression.source)
        else:
            failures.append(f"{expression.source}: no data (metrics without data: {empty})")
    assert not failures, "\n".join(failures)
    with_data = len(dashboard_expressions()) - len(explained)
    assert with_data >= 25
    print(f"\ndashboard queries with data: {with_data}; without (pending): {explained}")
