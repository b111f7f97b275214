"""SIGTERM: meter stops accepting, lets in-flight streams finish within the grace period, and flushes every
record before it exits."""

from __future__ import annotations

import signal
import sqlite3
import threading
from pathlib import Path

import openai
import pytest

from tests.support.processes import meter_process, simulator_process


@pytest.mark.slow
def test_sigterm_lets_streams_finish_and_flushes_records(tmp_path: Path) -> None:
    db = tmp_path / "meter.db"
    with simulator_process(tmp_path, "--token-delay-ms", "40") as sim:
        meter = meter_process(tmp_path, sim.url, f"sqlite:///{db}").start()
        try:
            client = openai.OpenAI(base_url=meter.url + "/v1", api_key="fw-sigterm", max_retries=0)
            results: list[str] = []
            errors: list[BaseException] = []
            streaming = threading.Barrier(9)

            def stream() -> None:
                try:
                    chunks = client.chat.completions.create(
                        model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=30, stream=True
                    )
                    text = ""
                    for index, chunk in enumerate(chunks):
                        if index == 1:
                            streaming.wait(10)
                        if chunk.choices:
                            text += chunk.choices[0].delta.content or ""
                    results.append(text)
                except BaseException as exc:
                    errors.append(exc)

            threads = [threading.Thread(target=stream) for _ in range(8)]
            for t in threads:
                t.start()
            streaming.wait(10)  # all 8 streams are mid-flight (each takes ~1.2 s)
            meter.signal(signal.SIGTERM)
            for t in threads:
                t.join(30)
            # uvicorn re-raises the captured SIGTERM after its graceful shutdown, so the exit status says so
            assert meter.wait(30) in (0, -signal.SIGTERM)
        finally:
            meter.kill()
    assert not errors, errors
    assert len(results) == 8 and all(r.count("tok") == 30 for r in results)
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT outcome, completion_tokens FROM usage_events").fetchall()
    assert rows == [("ok", 30)] * 8


@pytest.mark.slow
def test_several_workers_share_one_database_and_one_key_secret(tmp_path: Path) -> None:
    db = tmp_path / "meter.db"
    with simulator_process(tmp_path) as sim:
        # no METER_KEY_SECRET: the workers must agree on the one generated beside the database
        meter = meter_process(
            tmp_path, sim.url, f"sqlite:///{db}", "--workers", "2", env={"METER_KEY_SECRET": ""}
        )
        meter.env.pop("METER_KEY_SECRET")
        with meter:
            for i in range(40):
                client = openai.OpenAI(base_url=meter.url + "/v1", api_key="fw-workers-key", max_retries=0)
                client.chat.completions.create(model=f"m{i % 3}", messages=[{"role": "user", "content": "x"}])
            meter.signal(signal.SIGTERM)
            meter.wait(30)
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT COUNT(*), COUNT(DISTINCT key_fingerprint) FROM usage_events").fetchone()
    assert rows == (40, 1)
    assert (tmp_path / "meter.key").exists()
