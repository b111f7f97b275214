"""``meter team|key|audit`` on SQLite and PostgreSQL: the same lifecycle as the admin API, keys never on
the command line, errors as exit codes with a message."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from typing import Any

import click
import pytest
from click.testing import CliRunner, Result

from meter.cli.main import MANAGEMENT_COMMANDS as COMMANDS
from meter.db import migrate

SECRET = "0123456789abcdef0123456789abcdef"


@click.group()
def cli() -> None:
    """The management commands, as `meter` carries them (main.add_command)."""


for command in COMMANDS:
    cli.add_command(command)


@pytest.fixture
def run(db_url: str) -> Any:
    asyncio.run(migrate.upgrade(db_url))  # `meter db upgrade`: the CLI migrates only SQLite by itself
    runner = CliRunner()
    env = {"METER_DATABASE_URL": db_url, "METER_KEY_SECRET": SECRET}

    def invoke(*args: str, input: str | None = None, ok: bool = True) -> Result:
        result = runner.invoke(cli, list(args), env=env, input=input)
        if ok:
            assert result.exit_code == 0, (args, result.output, result.exception)
        return result

    return invoke


def test_team_and_key_lifecycle_through_the_cli(run: Any, db_url: str) -> None:
    assert "team search created" in run("team", "create", "search", "--label", "cost-center=42").output
    run("team", "create", "ads", "--description", "Ads")
    taken = run("team", "create", "search", ok=False)
    assert taken.exit_code == 1 and "already exists" in taken.output
    bad = run("team", "create", "search", "--label", "nolabel", ok=False)
    assert bad.exit_code == 2 and "NAME=VALUE" in bad.output

    teams = json.loads(run("team", "list", "--format", "json").output)
    assert [(t["name"], t["labels"]) for t in teams] == [("ads", ""), ("search", "cost-center=42")]
    run("team", "update", "ads", "--description", "Advertising", "--label", "tier=gold")
    shown = json.loads(run("team", "show", "ads", "--format", "json").output)[0]
    assert shown["description"] == "Advertising" and shown["labels"] == {"tier": "gold"}

    issued = run("key", "issue", "search", "--name", "ci", "--expires-in", "30d")
    virtual = issued.stdout.strip().splitlines()[-1]
    assert virtual.startswith("mk-") and len(virtual) > 35

    provider = "fw_provider_key_from_stdin_7777"
    registered = run("key", "register", "ads", input=provider + "\n")
    assert "registered to team ads" in registered.output and provider not in registered.output
    run("key", "register", "ads", "--fingerprint", "ef" * 32, "--suffix", "...efef")
    dup = run("key", "register", "search", input=provider + "\n", ok=False)
    assert dup.exit_code == 1 and "already registered" in dup.output

    keys = json.loads(run("key", "list", "--format", "json").output)
    assert [(k["team"], k["kind"], k["status"]) for k in keys] == [
        ("search", "virtual", "active"),
        ("ads", "passthrough", "active"),
        ("ads", "passthrough", "active"),
    ]
    assert keys[0]["suffix"] == "..." + virtual[-4:] and keys[1]["suffix"] == "...7777"
    assert keys[0]["expires_at"] is not None
    table = run("key", "list", "--team", "ads").output
    assert "...7777" in table and "...efef" in table and virtual not in table

    run("key", "move", str(keys[1]["id"]), "search")
    assert "revoked" in run("key", "revoke", str(keys[0]["id"])).output
    keys = json.loads(run("key", "list", "--format", "json").output)
    assert [(k["team"], k["status"]) for k in keys] == [
        ("search", "revoked"),
        ("search", "active"),
        ("ads", "active"),
    ]
    missing = run("key", "revoke", "999", ok=False)
    assert missing.exit_code == 1 and "no key with id 999" in missing.output

    refused = run("team", "delete", "ads", ok=False)
    assert refused.exit_code == 1 and "active key" in refused.output
    assert "1 key registration(s) removed" in run("team", "delete", "ads", "--force").output

    audit = json.loads(run("audit", "--format", "json").output)
    assert {e["actor"].split(":")[0] for e in audit} == {"cli"}
    assert audit[0]["action"] == "team.delete" and len(audit) == 9
    if db_url.startswith("sqlite"):
        path = db_url.split(":///", 1)[1]
        with open(path, "rb") as handle:
            raw = handle.read()
        for wal in (path + "-wal",):
            try:
                with open(wal, "rb") as handle:
                    raw += handle.read()
            except FileNotFoundError:
                pass
        assert virtual.encode() not in raw and provider.encode() not in raw
        with sqlite3.connect(path) as conn:
            assert conn.execute("SELECT count(*) FROM api_keys").fetchone() == (2,)
