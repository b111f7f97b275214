"""Nothing lost, nothing twice: real `meter serve` processes on the machine's PostgreSQL under load, killed,
terminated, and cut off from the database. Every request a client saw complete must be in the database
exactly once (matched by the upstream's response id)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import httpx
import openai
import pytest

from meter.db.migrate import upgrade
from tests.conftest import wait_for
from tests.conftest_db import create_database, drop_database, postgres_url_for, unique_database_name
from tests.support.processes import Process, free_port, meter_process, simulator_process

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

MESSAGES = [{"role": "user", "content": "count to five"}]


@pytest.fixture
def pg_url() -> Iterator[str]:
    name = unique_database_name()
    asyncio.run(create_database(name))
    url = postgres_url_for(name)
    asyncio.run(upgrade(url))
    try:
        yield url
    finally:
        asyncio.run(drop_database(name))


def db_rows(url: str) -> list[asyncpg.Record]:
    async def fetch() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(url.replace("postgresql+asyncpg", "postgresql"))
        try:
            return await conn.fetch(
                "SELECT event_id, response_id, outcome, completion_tokens FROM usage_events"
            )
        finally:
            await conn.close()

    return asyncio.run(fetch())


def rollup_requests(url: str) -> int:
    async def fetch() -> int:
        conn = await asyncpg.connect(url.replace("postgresql+asyncpg", "postgresql"))
        try:
            return int(await conn.fetchval("SELECT COALESCE(SUM(requests), 0) FROM usage_hourly"))
        finally:
            await conn.close()

    return asyncio.run(fetch())


class Load:
    """Client threads sending streaming and non-streaming requests until stopped; remembers the response
    id of every request that completed from the client's point of view, and each request's latency."""

    def __init__(self, base_url: str, threads: int = 6) -> None:
        self.base_url = base_url
        self.completed: list[str] = []
        self.latencies: list[tuple[float, float]] = []  # (finished at, seconds)
        self.failures = 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def _run(self, index: int) -> None:
        client = openai.OpenAI(base_url=self.base_url, api_key=f"fw-load-{index}", max_retries=0, timeout=10)
        n = 0
        while not self._stop.is_set():
            n += 1
            started = time.perf_counter()
            try:
                if n % 2:
                    chunks = list(
                        client.chat.completions.create(
                            model="m", messages=MESSAGES, max_tokens=5, stream=True
                        )
                    )
                    response_id = chunks[-1].id
                else:
                    response_id = client.chat.completions.create(
                        model="m", messages=MESSAGES, max_tokens=5
                    ).id
            except (openai.APIError, httpx.HTTPError):
                self.failures += 1
                time.sleep(0.01)  # the server is down (killed on purpose): don't spin
                continue
            now = time.perf_counter()
            self.latencies.append((now, now - started))
            self.completed.append(response_id)

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(20)


def assert_parity(url: str, completed: list[str]) -> None:
    try:
        rows = wait_for(
            lambda: (r := db_rows(url)) and {x["response_id"] for x in r} >= set(completed) and r,
            timeout=30,
            message="every completed request in the database",
        )
    except AssertionError:
        rows = db_rows(url)
        missing = set(completed) - {r["response_id"] for r in rows}
        raise AssertionError(
            f"{len(missing)} of {len(completed)} completed requests are not in the database "
            f"({len(rows)} rows), e.g. {sorted(missing)[:3]}"
        ) from None
    ids = [r["response_id"] for r in rows if r["response_id"] is not None]
    assert len(ids) == len(set(ids)), "a request was recorded twice"
    assert len({r["event_id"] for r in rows}) == len(rows)
    assert set(completed) <= set(ids)
    assert rollup_requests(url) == len(rows), "rollups must equal the sum of raw events"


def test_row_parity_and_sigterm_under_load(tmp_path: Path, pg_url: str) -> None:
    with simulator_process(tmp_path, "--token-delay-ms", "2") as sim:
        meter = meter_process(tmp_path, sim.url, pg_url).start()
        try:
            with Load(meter.url + "/v1", threads=8) as load:
                wait_for(lambda: len(load.completed) >= 300, timeout=60, message="300 completed requests")
                meter.signal(signal.SIGTERM)  # in-flight requests finish; nothing is lost
                assert meter.wait(40) in (0, -signal.SIGTERM)
        finally:
            meter.kill()
    assert len(load.completed) >= 300
    assert_parity(pg_url, load.completed)


def test_sigkill_mid_load_then_restart_loses_nothing_and_duplicates_nothing(
    tmp_path: Path, pg_url: str
) -> None:
    journal = tmp_path / "journal"
    port = free_port()
    env = {"METER_JOURNAL_DIR": str(journal), "METER_JOURNAL_FSYNC": "always"}
    with simulator_process(tmp_path) as sim:
        first = meter_process(tmp_path, sim.url, pg_url, env=env, port=port).start()
        second: Process | None = None
        try:
            with Load(first.url + "/v1", threads=6) as load:
                wait_for(lambda: len(load.completed) >= 200, timeout=60, message="200 completed requests")
                first.signal(signal.SIGKILL)
                first.wait(10)
                before_restart = len(load.completed)
                second = meter_process(tmp_path, sim.url, pg_url, env=env, port=port).start()
                wait_for(lambda: len(load.completed) >= before_restart + 200, timeout=60, message="more load")
            second.signal(signal.SIGTERM)
            second.wait(40)
        finally:
            first.kill()
            if second is not None:
                second.kill()
    assert_parity(pg_url, load.completed)


class TcpGate:
    """A loopback TCP forwarder to PostgreSQL that a test can close (connections refused and cut) and
    reopen on the same port: a database outage without touching the shared server."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()

    def open(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def close(self) -> None:
        if self._listener is not None:
            # shutdown() wakes the thread blocked in accept(); close() alone would leave it accepting
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
            self._listener = None
        with self._lock:
            for conn in self._conns:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
                conn.close()
            self._conns.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)


def test_database_outage_keeps_serving_then_catches_up(tmp_path: Path, pg_url: str) -> None:
    gate = TcpGate(("127.0.0.1", 5432))
    gate.open()
    gated_url = pg_url.replace("127.0.0.1:5432", f"127.0.0.1:{gate.port}")
    assert gated_url != pg_url
    with simulator_process(tmp_path) as sim:
        meter = meter_process(tmp_path, sim.url, gated_url).start()
        try:
            with Load(meter.url + "/v1", threads=4) as load:
                wait_for(lambda: len(load.completed) >= 150, timeout=60, message="load before the outage")
                outage_start = time.perf_counter()
                gate.close()
                wait_for(
                    lambda: len(load.completed) >= 450 and time.perf_counter() - outage_start > 2,
                    timeout=60,
                    message="load during the outage",
                )
                outage_end = time.perf_counter()
                ready = httpx.get(meter.url + "/readyz").json()
                assert ready["ready"] is True, ready  # the journal absorbs the outage
                assert ready["database"] != "ok"
                assert ready["pipeline"]["pending"] > 0
                gate.open()
                wait_for(
                    lambda: httpx.get(meter.url + "/readyz").json()["database"] == "ok",
                    timeout=30,
                    message="the database to be reachable again",
                )
            wait_for(
                lambda: httpx.get(meter.url + "/readyz").json()["pipeline"]["pending"] == 0,
                timeout=60,
                message="the backlog to drain after recovery",
            )
            meter.signal(signal.SIGTERM)
            meter.wait(40)
        finally:
            meter.kill()
            gate.close()
    assert load.failures == 0
    before = [s for t, s in load.latencies if t < outage_start]
    during = [s for t, s in load.latencies if outage_start + 0.5 < t < outage_end]
    # "unchanged latency": the request path never waits on the database
    print(
        f"median latency: database up {statistics.median(before) * 1000:.2f} ms, "
        f"down {statistics.median(during) * 1000:.2f} ms ({len(before)} / {len(during)} requests)"
    )
    assert statistics.median(during) < statistics.median(before) * 3 + 0.005
    assert_parity(pg_url, load.completed)
