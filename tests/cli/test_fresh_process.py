"""Each command group run as a user runs it: `python -m meter ...` in a fresh interpreter, so nothing
another test imported first can hide an import cycle (`meter prices list` once failed that way)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

COMMANDS = [
    ["prices", "list"],
    ["prices", "lookup", "accounts/fireworks/models/llama-v3p1-8b-instruct"],
    ["usage"],
    ["billing", "report", "--month", "2026-11"],
    ["team", "list"],
    ["key", "list"],
    ["quota", "show", "--team", "nobody"],
    ["audit"],
]


def meter(*args: str, database: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meter", *args, "--database", database],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "METER_KEY_SECRET": "0123456789abcdef0123456789abcdef"},
    )


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c[:2]))
def test_every_command_group_starts_in_a_fresh_process(tmp_path: Path, command: list[str]) -> None:
    database = f"sqlite:///{tmp_path / 'meter.db'}"
    assert meter("db", "upgrade", database=database).returncode == 0
    done = meter(*command, database=database)
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode in (0, 1), done.stderr  # 1: a clean "not found" message, never a crash
