"""``meter quota set|clear|show|status`` on SQLite and PostgreSQL: limits replaced whole, validated with
the option named, audited as the CLI user; status from the database's rollups, or from Redis's live
counters when METER_REDIS_URL is set (the output says which)."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import click
import pytest
import redis
from click.testing import CliRunner, Result

from meter.cli.main import MANAGEMENT_COMMANDS as COMMANDS
from meter.db import migrate
from meter.db.engine import create_engine
from meter.db.insert import write_batch
from meter.quota.policy import Limits, Policy, Subject
from meter.quota.redis_store import RedisStore, connect
from meter.quota.spend import Estimate
from meter.quota.store import Reservation
from tests.conftest_db import make_record
from tests.support.quota import REDIS_URL

SECRET = "0123456789abcdef0123456789abcdef"


@click.group()
def cli() -> None:
    """The management commands, as `meter` carries them (main.add_command)."""


for command in COMMANDS:
    cli.add_command(command)


@pytest.fixture
def env(db_url: str) -> dict[str, str]:
    asyncio.run(migrate.upgrade(db_url))  # `meter db upgrade`
    return {"METER_DATABASE_URL": db_url, "METER_KEY_SECRET": SECRET}


@pytest.fixture
def run(env: dict[str, str]) -> Any:
    runner = CliRunner()

    def invoke(*args: str, ok: bool = True, extra_env: dict[str, str] | None = None) -> Result:
        result = runner.invoke(cli, list(args), env={**env, **(extra_env or {})})
        if ok:
            assert result.exit_code == 0, (args, result.output, result.exception)
        return result

    return invoke


def issue_key(run: Any, team: str) -> dict[str, Any]:
    run("key", "issue", team)
    keys = json.loads(run("key", "list", "--team", team, "--format", "json").output)
    key: dict[str, Any] = keys[-1]
    return key


def test_set_show_and_clear(run: Any) -> None:
    run("team", "create", "search")
    key = issue_key(run, "search")

    out = run("quota", "set", "--team", "search", "--budget-usd", "25.00", "--period", "week", "--rpm", "600")
    assert "limits of team search set: budget_usd=25.00 rpm=600 period=week" in out.output
    shown = json.loads(run("quota", "show", "--team", "search", "--format", "json").output)
    assert shown == {
        "team": "search",
        "limits": Limits.from_dict({"budget_usd": "25.00", "budget_period": "week", "rpm": 600}).to_dict(),
    }
    table = run("quota", "show", "--team", "search").output
    assert "budget_usd" in table and "25.00" in table and "week" in table

    # set replaces the whole set: the budget and rpm are gone.
    run("quota", "set", "--team", "search", "--max-concurrent", "3", "--soft-ratio", "0.5")
    shown = json.loads(run("quota", "show", "--team", "search", "--format", "json").output)["limits"]
    assert (shown["budget_usd"], shown["rpm"], shown["max_concurrent"], shown["soft_ratio"]) == (
        None,
        None,
        3,
        "0.5",
    )

    run("quota", "set", "--key", str(key["id"]), "--tokens-budget", "1000000", "--tpm", "50000")
    shown_key = json.loads(run("quota", "show", "--key", str(key["id"]), "--format", "json").output)
    assert (shown_key["key_id"], shown_key["suffix"], shown_key["team"]) == (
        key["id"],
        key["suffix"],
        "search",
    )
    assert shown_key["limits"]["tokens_budget"] == 1_000_000 and "fingerprint" not in shown_key
    listed = json.loads(run("key", "list", "--format", "json").output)
    assert listed[0]["limits"] == "tokens_budget=1000000 tpm=50000 period=month"
    teams = json.loads(run("team", "list", "--format", "json").output)
    assert teams[0]["limits"] == "max_concurrent=3"

    assert "limits of team search cleared" in run("quota", "clear", "--team", "search").output
    assert "team search has no limits" in run("quota", "show", "--team", "search").output
    run("quota", "clear", "--key", str(key["id"]))
    assert (
        json.loads(run("quota", "show", "--key", str(key["id"]), "--format", "json").output)["limits"] is None
    )

    audit = json.loads(run("audit", "--format", "json").output)
    limits_entries = [(e["action"], e["target"]) for e in reversed(audit) if e["action"].endswith(".limits")]
    assert limits_entries == [
        ("team.limits", "team:search"),
        ("team.limits", "team:search"),
        ("key.limits", f"key:{key['id']}"),
        ("team.limits", "team:search"),
        ("key.limits", f"key:{key['id']}"),
    ]
    assert {e["actor"].split(":")[0] for e in audit} == {"cli"}


def test_invalid_input(run: Any) -> None:
    run("team", "create", "search")
    for args, hint, message in [
        (("--rpm", "-1"), "--rpm", "rpm must be a non-negative integer"),
        (("--budget-usd", "ten"), "--budget-usd", "budget_usd must be a decimal number"),
        (("--budget-usd", "-1"), "--budget-usd", "budget_usd must not be negative"),
        (("--rpm", "5", "--soft-ratio", "2"), "--soft-ratio", "soft_ratio must be a Decimal in (0, 1]"),
        (("--period", "day"), None, "give at least one limit"),
        (("--rpm", "many"), "--rpm", "'many' is not a valid integer"),
    ]:
        result = run("quota", "set", "--team", "search", *args, ok=False)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output and (hint is None or hint in result.output), (args, result.output)
    both = run("quota", "set", "--team", "search", "--key", "1", "--rpm", "1", ok=False)
    assert both.exit_code == 2 and "exactly one of --team or --key" in both.output
    neither = run("quota", "show", ok=False)
    assert neither.exit_code == 2 and "exactly one of --team or --key" in neither.output
    missing = run("quota", "set", "--team", "nobody", "--rpm", "1", ok=False)
    assert missing.exit_code == 1 and "no team named 'nobody'" in missing.output
    missing_key = run("quota", "clear", "--key", "999", ok=False)
    assert missing_key.exit_code == 1 and "no key with id 999" in missing_key.output
    assert json.loads(run("quota", "show", "--team", "search", "--format", "json").output)["limits"] is None


def test_status_from_the_database(run: Any, db_url: str) -> None:
    run("team", "create", "search")
    run("team", "create", "ads")
    key = issue_key(run, "search")
    run("quota", "set", "--team", "search", "--budget-usd", "10", "--tokens-budget", "1000", "--rpm", "60")
    run("quota", "set", "--key", str(key["id"]), "--completion-tokens-budget", "100")

    async def record_usage() -> None:
        engine = create_engine(db_url)
        now = datetime.now(UTC)
        try:
            await write_batch(
                engine,
                [
                    make_record(
                        started_at=now,
                        team="search",
                        key_fingerprint=key["fingerprint"],
                        prompt_tokens=100,
                        completion_tokens=20,
                        total_tokens=120,
                        cost_nanos=250_000_000,
                        price_ref="db:1",
                    ),
                    make_record(
                        started_at=now,
                        team="search",
                        key_fingerprint=None,
                        prompt_tokens=30,
                        completion_tokens=0,
                        total_tokens=30,
                        cost_nanos=1,
                        price_ref="db:1",
                    ),
                    make_record(
                        started_at=now,
                        team="ads",
                        prompt_tokens=999,
                        completion_tokens=999,
                        total_tokens=1998,
                        cost_nanos=999,
                        price_ref="db:1",
                    ),
                ],
            )
        finally:
            await engine.dispose()

    asyncio.run(record_usage())
    result = run("quota", "status", "--team", "search", "--key", str(key["id"]), "--format", "json")
    status = json.loads(result.output)
    assert status["source"] == "database" and key["fingerprint"] not in result.output
    team, key_state = status["data"]
    assert team["subject"] == {"kind": "team", "team": "search"}
    limits = {limit["kind"]: limit for limit in team["limits"]}
    assert limits["budget_usd"]["used"] == "0.25"  # the store's micro-USD, rounded to the nearest
    assert (limits["budget_usd"]["limit"], limits["budget_usd"]["remaining"]) == ("10", "9.75")
    assert limits["budget_usd"]["reserved"] is None  # unknown to the database, not 0
    assert (limits["budget_tokens"]["used"], limits["budget_tokens"]["remaining"]) == (150, 850)
    assert limits["rpm"]["used"] is None and limits["rpm"]["remaining"] is None
    assert [(lim["kind"], lim["used"]) for lim in key_state["limits"]] == [("budget_completion_tokens", 20)]

    table = run("quota", "status").output  # every subject with limits
    assert table.startswith("source: database rollups")
    assert "team search" in table and f"key {key['id']} ({key['suffix']}, team search)" in table
    assert "ads" not in table and key["fingerprint"] not in table
    no_limits = run("quota", "status", "--team", "ads").output
    assert "team ads" in no_limits and "(no limits)" in no_limits


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    prefix = f"meter-test:{uuid.uuid4().hex}:"
    yield prefix
    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(match=prefix + "*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


def test_status_from_redis(run: Any, redis_prefix: str) -> None:
    run("team", "create", "search")
    run("quota", "set", "--team", "search", "--budget-usd", "10", "--rpm", "60", "--max-concurrent", "5")
    limits = Limits(budget_usd=Decimal("10"), rpm=60, max_concurrent=5)

    async def admit_one() -> Reservation:
        store = RedisStore(connect(REDIS_URL), prefix=redis_prefix)
        try:
            reservation = await store.reserve(
                [Policy(Subject("team", "search"), limits)],
                Estimate(100, 200, Decimal("0.5")),
                datetime.now(UTC),
            )
            assert isinstance(reservation, Reservation)
            return reservation
        finally:
            await store.aclose()

    asyncio.run(admit_one())
    # The password in the URL is never shown (meter.redact). The test server has no password: its
    # default user takes any (AUTH default sekrit), where a password alone (AUTH sekrit) is refused.
    redis_env = {
        "METER_REDIS_URL": "redis://default:sekrit@127.0.0.1:6379/0",
        "METER_QUOTA_PREFIX": redis_prefix,
    }
    result = run("quota", "status", "--team", "search", "--format", "json", extra_env=redis_env)
    status = json.loads(result.output)
    assert status["source"] == "redis" and status["redis"] == "redis://default:***@127.0.0.1:6379/0"
    assert "sekrit" not in result.output
    by_kind = {limit["kind"]: limit for limit in status["data"][0]["limits"]}
    assert (by_kind["budget_usd"]["used"], by_kind["budget_usd"]["reserved"]) == ("0", "0.5")
    assert (by_kind["rpm"]["used"], by_kind["rpm"]["remaining"]) == (1, 59)
    assert by_kind["rpm"]["resets_at"] is not None
    assert (by_kind["concurrency"]["used"], by_kind["concurrency"]["remaining"]) == (1, 4)
    table = run("quota", "status", "--team", "search", extra_env=redis_env).output
    assert table.startswith("source: live counters in Redis (redis://default:***@127.0.0.1:6379/0)")

    down = run(
        "quota",
        "status",
        "--team",
        "search",
        ok=False,
        extra_env={"METER_REDIS_URL": "redis://127.0.0.1:1/0"},
    )
    assert down.exit_code == 1 and "Redis at redis://127.0.0.1:1/0 cannot be reached" in down.output
