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
