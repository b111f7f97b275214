from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from meter.app import MeterApp, create_app
from meter.settings import load_settings
from meter.simulator import Simulator, SimulatorConfig, create_simulator
from tests.support.durable import durable_event_ids
from tests.support.serve import RunningServer, serve_in_thread
from tests.support.upstreams import ScriptedUpstream

pytest_plugins = ["tests.conftest_db"]


def wait_for(condition: Callable[[], Any], timeout: float = 10.0, message: str = "condition") -> Any:
    """Poll a condition with a deadline (waiting on an outcome, never sleeping a guessed time)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {message}")
        time.sleep(0.005)


@dataclass
class SimHandle:
    server: RunningServer
    sim: Simulator

    @property
    def url(self) -> str:
        return self.server.url


@dataclass
class MeterHandle:
    server: RunningServer
    app: MeterApp
    db_path: Path
    journal_root: Path

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def base_url(self) -> str:
        return f"{self.server.url}/v1"

    def rows(self, expected: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Wait until ``expected`` records are in the database, then return all of them (oldest first)."""

        def read() -> list[dict[str, Any]] | None:
            with sqlite3.connect(self.db_path) as conn:
                conn.row_factory = sqlite3.Row
                rows = [dict(r) for r in conn.execute("SELECT * FROM usage_events ORDER BY event_id")]
            return rows if len(rows) >= expected else None

        rows = wait_for(read, timeout, f"{expected} usage rows")
        assert len(rows) == expected, f"expected exactly {expected} rows, found {len(rows)}"
        return rows

    def durable(self) -> list[str]:
        """Event ids of the records meter has made durable so far (journal or database), at once."""
        return durable_event_ids(self.journal_root, self.db_path)


@pytest.fixture
def simulator() -> Iterator[SimHandle]:
    sim = create_simulator(SimulatorConfig())
    with serve_in_thread(sim) as server:
        yield SimHandle(server, sim)


@pytest.fixture
def scripted() -> Iterator[tuple[ScriptedUpstream, RunningServer]]:
    upstream = ScriptedUpstream()
    with serve_in_thread(upstream) as server:
        yield upstream, server


@pytest.fixture
def start_meter(tmp_path: Path) -> Iterator[Callable[..., MeterHandle]]:
    with ExitStack() as stack:

        def start(upstream_url: str, **overrides: Any) -> MeterHandle:
            n = len(stack._exit_callbacks)
            db_path = tmp_path / f"meter-{n}.db"
            environ = {
                "METER_DATABASE_URL": f"sqlite:///{db_path}",
                "METER_UPSTREAM_URL": upstream_url,
                "METER_JOURNAL_DIR": str(tmp_path / f"journal-{n}"),
            }
            settings = load_settings(environ, **overrides)
            app = create_app(settings, registry=CollectorRegistry())
            # served as `meter serve` serves it: meter's HTTP protocol with its connection limits
            server = stack.enter_context(serve_in_thread(app, lifespan="on", settings=settings))
            assert settings.journal_dir is not None
            return MeterHandle(server, app, db_path, Path(settings.journal_dir))

        yield start


@pytest.fixture
def meter(start_meter: Callable[..., MeterHandle], simulator: SimHandle) -> MeterHandle:
    return start_meter(simulator.url)


# --- unit or integration ----------------------------------------------------------------------------------
#
# Every test is marked `unit` or `integration` here (pyproject.toml registers both; `pytest -m unit` runs
# the fast tests alone). A test is `unit` unless it lives in e2e/, is marked `slow`, `postgres` or
# `integration`, or uses (itself or through another fixture) one of SERVICE_FIXTURES: the fixtures that
# start a server or a process, or hand out a database or Redis. A test that starts a server or a process,
# or talks to Redis, without such a fixture carries `@pytest.mark.integration` itself (or its module a
# `pytestmark`); a new fixture of that kind joins SERVICE_FIXTURES.

SERVICE_FIXTURES = frozenset(
    {
        # servers on loopback ports (this file)
        "simulator",
        "scripted",
        "start_meter",
        "meter",
        # the database contract fixtures, SQLite and PostgreSQL (tests/conftest_db.py)
        "db_sqlite_url",
        "db_postgres_url",
        "db_url",
        "db_engine",
        # the machine's Redis (tests/quota/conftest.py; its `make_store` marks its Redis case)
        "redis_handle",
        # fixtures of one module
        "served",  # the simulator (tests/simulator/test_app.py)
        "upstream",  # the simulator (tests/security/test_slow_clients.py)
        "edge",  # meter (tests/security/test_slow_clients.py)
        "hostile",  # a raw TCP upstream (tests/security/test_hostile_upstream.py)
        "canary",  # a listener meter must never reach (tests/security/test_request_targets.py)
        "silent_server",  # a server that never answers (tests/db/test_engine.py)
        "hold",  # processes holding a journal's lock (tests/journal/test_store.py)
        "redis_prefix",  # the machine's Redis (tests/cli/test_quota.py)
        "render",  # Helm, a process when the helm binary is installed (tests/deploy/test_config.py)
    }
)
WHOLE_PRODUCT = Path(__file__).parent / "e2e"  # real processes and servers, the openai SDK
NOT_UNIT_MARKS = ("slow", "postgres", "integration")


def is_unit(item: pytest.Item) -> bool:
    return not (
        item.path.is_relative_to(WHOLE_PRODUCT)
        or any(item.get_closest_marker(name) for name in NOT_UNIT_MARKS)
        or SERVICE_FIXTURES.intersection(getattr(item, "fixturenames", ()))
    )


@pytest.hookimpl(tryfirst=True)  # before `-m` selects by the markers
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        item.add_marker(pytest.mark.unit if is_unit(item) else pytest.mark.integration)
