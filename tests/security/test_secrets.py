"""Passwords and tokens in the URLs meter is given never show in what it prints: errors and CLI
output."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from meter.redact import mask_url, mask_urls_in
from tests.support.processes import free_port

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


# -- the CLI --------------------------------------------------------------------------------------


def _meter_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("METER_")}
    environment.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "meter", *args], env=environment, capture_output=True, text=True, timeout=60
    )


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


def test_cli_masks_a_url_it_refuses() -> None:
    done = _meter_cli("usage", env={"METER_DATABASE_URL": f"mysql://meter:{DB_PASSWORD}@db/meter"})
    assert done.returncode == 2 and "mysql://meter:***@db/meter" in done.stderr
    assert_no_secret(done.stdout + done.stderr)
