"""Passwords and tokens in the URLs meter is given never show in what it prints: log lines (meter's
and its libraries'), errors, ``/readyz`` and CLI output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from meter.redact import mask_url, mask_urls_in
from tests.conftest import SimHandle, wait_for
from tests.support.processes import free_port, meter_process

DB_PASSWORD = "Db-Pa55word-7f3e"
REDIS_PASSWORD = "Redis-Pa55word-91c2"
UPSTREAM_PASSWORD = "Up-Pa55word-c0de"
QUERY_TOKEN = "Query-T0ken-5eed"
SECRETS = (DB_PASSWORD, REDIS_PASSWORD, UPSTREAM_PASSWORD, QUERY_TOKEN)


def assert_no_secret(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text, f"{secret!r} printed:\n{text}"


# -- the rules, on plain values -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql+asyncpg://meter:s3cret@db:5432/meter", "postgresql+asyncpg://meter:***@db:5432/meter"),
        ("redis://:s3cret@cache:6379/0", "redis://:***@cache:6379/0"),
        ("rediss://default:s3cret@cache/0", "rediss://default:***@cache/0"),
        (
            "postgresql://meter@db/meter?sslmode=require&password=s3cret",
            "postgresql://meter@db/meter?sslmode=***&password=***",
        ),
        ("https://s3cret@api.example.com/v1", "https://***@api.example.com/v1"),
        (
            "https://api.example.com/v1?key=s3cret&api-version=1",
            "https://api.example.com/v1?key=***&api-version=***",
        ),
        # Unescaped special characters in a password: masked whatever a driver would make of them.
        ("postgresql://meter:s3/cr@et@db/meter", "postgresql://meter:***@db/meter"),
        ("postgresql://meter:s3?cr#et@db/meter", "postgresql://meter:***@db/meter"),
        ("meter:s3cret@db/meter", "meter:***@db/meter"),  # a URL missing its scheme
        ("sqlite:///var/lib/meter/meter.db", "sqlite:///var/lib/meter/meter.db"),
        ("http://127.0.0.1:8788", "http://127.0.0.1:8788"),
    ],
)
def test_mask_url(url: str, shown: str) -> None:
    assert mask_url(url) == shown
    assert "s3" not in mask_url(url) and mask_url(mask_url(url)) == mask_url(url)


def test_urls_in_text_are_masked_and_json_stays_json() -> None:
    text = "connect to 'postgresql://meter:s3cret@db/meter' failed, retrying redis://:s3cret@cache."
    assert mask_urls_in(text) == (
        "connect to 'postgresql://meter:***@db/meter' failed, retrying redis://:***@cache."
    )
    line = json.dumps({"error": "GET https://api.example.com/v1?key=s3cret", "next": "a@b"})
    assert json.loads(mask_urls_in(line)) == {
        "error": "GET https://api.example.com/v1?key=***",
        "next": "a@b",
    }
    assert mask_urls_in("nothing to see") == "nothing to see"


# -- a real `meter serve` -------------------------------------------------------------------------


@pytest.mark.integration
def test_serve_prints_no_password_and_readyz_names_none(tmp_path: Path) -> None:
    """PostgreSQL unreachable, Redis refusing the password, upstream down: the start-up line, the
    warnings, ``/readyz`` and the request log show every URL masked."""
    database = f"postgresql://meter:{DB_PASSWORD}@127.0.0.1:{free_port()}/meter"
    # An upstream URL carrying credentials is refused at start, and the refusal masks them.
    upstream = f"http://meter:{UPSTREAM_PASSWORD}@127.0.0.1:{free_port()}/v1?key={QUERY_TOKEN}"
    refused = meter_process(tmp_path, upstream, database)
    with pytest.raises(RuntimeError, match="must not carry credentials") as caught:
        refused.start()
    assert "http://meter:***@127.0.0.1:" in str(caught.value)
    assert_no_secret(refused.log.read_text())
    upstream = f"http://127.0.0.1:{free_port()}/v1"
    env = {
        "METER_REDIS_URL": f"redis://:{REDIS_PASSWORD}@127.0.0.1:6379/0",
        "METER_JOURNAL_DIR": str(tmp_path / "journal"),
        "METER_LOG_LEVEL": "info",
    }
    with meter_process(tmp_path, upstream, database, "--log-format", "text", env=env) as meter:
        ready = wait_for(
            lambda: (r := httpx.get(f"{meter.url}/readyz", timeout=5)).json().get("database") and r,
            message="a readiness answer naming the database",
        )
        assert ready.status_code == 503 and ready.json()["database"] != "ok"
        assert_no_secret(ready.text)
        answer = httpx.post(f"{meter.url}/v1/chat/completions", json={"model": "m"}, timeout=10)
        assert answer.status_code >= 500
        assert_no_secret(answer.text)
        wait_for(lambda: "meter.requests" in meter.log.read_text(), message="the request line")
    log = meter.log.read_text()
    assert "recording to postgresql://meter:***@127.0.0.1:" in log  # the start-up line
    assert "forwarding to http://127.0.0.1:" in log
    assert_no_secret(log)


@pytest.mark.parametrize("level", ["info", "debug"])
def test_httpx_upstream_logs_no_query_token(tmp_path: Path, simulator: SimHandle, level: str) -> None:
    """httpx logs every request's full URL at info; meter quiets it below debug, and at debug the
    URL's query values are masked."""
    env = {"METER_UPSTREAM_CLIENT": "httpx", "METER_LOG_LEVEL": level}
    database = f"sqlite:///{tmp_path / 'meter.db'}"
    with meter_process(tmp_path, simulator.url, database, "--log-format", "text", env=env) as meter:
        response = httpx.post(
            f"{meter.url}/v1/chat/completions",
            params={"key": QUERY_TOKEN},
            json={"model": "m-query", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
            headers={"Authorization": "Bearer fw-client-key-1234"},
            timeout=10,
        )
        assert response.status_code == 200
        wait_for(lambda: "model=m-query" in meter.log.read_text(), message="the request line")
    log = meter.log.read_text()
    assert_no_secret(log)
    if level == "info":
        assert "HTTP Request:" not in log
    else:
        assert f"HTTP Request: POST {simulator.url}/v1/chat/completions?key=***" in log


# -- the CLI --------------------------------------------------------------------------------------


def _meter_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("METER_")}
    environment.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "meter", *args], env=environment, capture_output=True, text=True, timeout=60
    )


@pytest.mark.integration
@pytest.mark.parametrize(
    "command",
    [
        ["usage"],
        ["db", "upgrade"],
        ["team", "list"],
        ["billing", "report", "--format", "csv"],
    ],
)
def test_cli_names_an_unreachable_database_without_its_password(command: list[str]) -> None:
    database = f"postgresql://meter:{DB_PASSWORD}@127.0.0.1:{free_port()}/meter"
    done = _meter_cli(
        *command, "--database", database, env={"METER_KEY_SECRET": "cli-secret-0123456789abcdef"}
    )
    assert done.returncode == 1
    assert "database postgresql://meter:***@127.0.0.1:" in done.stderr
    assert "Connect call failed" in done.stderr and "Traceback" not in done.stderr
    assert_no_secret(done.stdout + done.stderr)


@pytest.mark.integration
def test_cli_masks_a_url_it_refuses() -> None:
    done = _meter_cli("usage", env={"METER_DATABASE_URL": f"mysql://meter:{DB_PASSWORD}@db/meter"})
    assert done.returncode == 2 and "mysql://meter:***@db/meter" in done.stderr
    assert_no_secret(done.stdout + done.stderr)
