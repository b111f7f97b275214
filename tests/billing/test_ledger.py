"""Billing on real SQLite and PostgreSQL: requests before and after a price change are billed at their
own price, report totals equal the exact sum of per-request costs (rollup and raw paths alike), rerating
is idempotent and corrects the rollup, unpriced usage is counted and never billed as $0; the same
through the admin API and ``meter billing``."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import random
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import click
import pytest
from click.testing import CliRunner
from sqlalchemy import func, insert, select
from sqlalchemy.ext.asyncio import AsyncEngine

from meter.billing.ledger import billing_report, rerate
from meter.billing.prices import from_nanos
from meter.billing.rating import BillingReport, month_range
from meter.cli.main import MANAGEMENT_COMMANDS as COMMANDS
from meter.db import migrate
from meter.db.engine import create_engine
from meter.db.insert import write_batch
from meter.db.models import record_to_row, usage_events, usage_hourly
from meter.records import UsageRecord
from meter.tenancy.identity import KeyFingerprinter
from meter.tenancy.runtime import Tenancy, TenancyConfig
from tests.conftest_db import make_record
from tests.support.admin import AUTH, admin_app, asgi_client

FP = KeyFingerprinter(b"0123456789abcdef0123456789abcdef")
LLAMA = "accounts/fireworks/models/llama-v3p1-8b-instruct"  # sheet: 0.20 in, 0.10 cached, 0.20 out
DEEPSEEK = "accounts/fireworks/models/deepseek-r1"  # sheet: 3.00 in, 1.50 cached, 8.00 out
NOV = datetime(2026, 11, 1, tzinfo=UTC)
CHANGE = datetime(2026, 11, 15, tzinfo=UTC)


def usd(value: str) -> Decimal:
    return Decimal(value)


def cost(prompt: int, cached: int, completion: int, input: str, cached_price: str, output: str) -> Decimal:
    """The expected cost, computed independently of meter (exact, then rounded once to 1e-9)."""
    exact = (
        (prompt - cached) * usd(input) + cached * usd(cached_price) + completion * usd(output)
    ) / 1_000_000
    return exact.quantize(Decimal("1e-9"))


@pytest.fixture
async def tenancy(db_engine: AsyncEngine) -> AsyncIterator[Tenancy]:
    tenancy = Tenancy(FP, TenancyConfig())
    await tenancy.start(db_engine)
    yield tenancy
    await tenancy.stop()


async def stored_cost_nanos(
    engine: AsyncEngine, since: datetime | None = None, until: datetime | None = None
) -> int:
    stmt = select(func.coalesce(func.sum(usage_events.c.cost_nanos), 0))
    if since is not None:
        stmt = stmt.where(usage_events.c.started_at >= since)
    if until is not None:
        stmt = stmt.where(usage_events.c.started_at < until)
    async with engine.connect() as conn:
        return int((await conn.execute(stmt)).scalar_one())


async def both_paths(engine: AsyncEngine, period: str = "day", **filters: Any) -> BillingReport:
    """The report from the hourly rollup, asserted equal to the same report summed from raw events."""
    rolled = await billing_report(engine, period=period, **filters)
    # An unaligned start sends the report to raw events; every record starts after it.
    raw = await billing_report(
        engine, period=period, since=datetime(2000, 1, 1, 0, 0, 1, tzinfo=UTC), **filters
    )
    assert rolled.lines == raw.lines
    return rolled


async def test_requests_before_and_after_a_price_change_are_billed_at_their_own_price(
    db_engine: AsyncEngine, tenancy: Tenancy
) -> None:
    await tenancy.store.add_price(
        "test", model=LLAMA, input="0.30", cached_input="0.15", output="0.60", effective_from=CHANGE
    )
    before = [
        tenancy.price(
            make_record(
                started_at=NOV + timedelta(days=2),
                team="search",
                requested_model=LLAMA,
                prompt_tokens=1000,
                cached_tokens=400,
                completion_tokens=333,
            )
        ),
        tenancy.price(
            make_record(
                started_at=CHANGE - timedelta(microseconds=1),
                team="search",
                requested_model=LLAMA,
                prompt_tokens=10,
                completion_tokens=5,
            )
        ),
    ]
    after = [
        tenancy.price(
            make_record(
                started_at=CHANGE,
                team="search",
                requested_model=LLAMA,
                prompt_tokens=1000,
                cached_tokens=400,
                completion_tokens=333,
            )
        ),
        tenancy.price(
            make_record(
                started_at=CHANGE + timedelta(days=5),
                team="ads",
                requested_model=LLAMA,
                prompt_tokens=7,
                completion_tokens=9,
            )
        ),
    ]
    assert before[0].cost_usd == cost(1000, 400, 333, "0.20", "0.10", "0.20") == Decimal("0.000226600")
    assert after[0].cost_usd == cost(1000, 400, 333, "0.30", "0.15", "0.60") == Decimal("0.000439800")
    assert before[0].price_ref == f"sheet:2025-08-01:{LLAMA}" and after[0].price_ref.startswith("db:")
    await write_batch(db_engine, before + after)

    month = await both_paths(db_engine, "month")
    assert [(line.period, line.team, line.requests, line.cost_usd) for line in month.lines] == [
        ("2026-11", "ads", 1, after[1].cost_usd),
        ("2026-11", "search", 3, before[0].cost_usd + before[1].cost_usd + after[0].cost_usd),
    ]
    expected_total = sum((r.cost_usd for r in before + after), Decimal(0))
    assert month.total_usd == expected_total == from_nanos(await stored_cost_nanos(db_engine))
    days = await both_paths(db_engine, "day", team="search")
    assert [(line.period, line.cost_usd) for line in days.lines] == [
        ("2026-11-03", before[0].cost_usd),
        ("2026-11-14", before[1].cost_usd),
        ("2026-11-15", after[0].cost_usd),
    ]
    assert days.lines[0].prompt_tokens == 1000 and days.lines[0].cached_tokens == 400
    assert days.lines[0].completion_tokens == 333 and days.lines[0].reasoning_tokens is None


async def test_report_totals_equal_the_sum_of_per_record_costs(
    db_engine: AsyncEngine, tenancy: Tenancy
) -> None:
    rng = random.Random(7)
    models = [LLAMA, DEEPSEEK, "accounts/me/models/tuned-70b", "mystery-model", None]
    records: list[UsageRecord] = []
    for _ in range(400):
        missing = rng.random() < 0.1
        prompt = None if missing else rng.randrange(0, 20_000)
        records.append(
            tenancy.price(
                make_record(
                    started_at=NOV
                    + timedelta(seconds=rng.randrange(60 * 86400), microseconds=rng.randrange(10**6)),
                    team=rng.choice(["search", "ads", "unassigned"]),
                    key_fingerprint=rng.choice(["a" * 64, None]),
                    requested_model=rng.choice(models),
                    prompt_tokens=prompt,
                    cached_tokens=None
                    if prompt is None or rng.random() < 0.5
                    else rng.randrange(0, prompt + 1),
                    completion_tokens=None if missing else rng.randrange(0, 4000),
                    reasoning_tokens=None if missing or rng.random() < 0.7 else rng.randrange(0, 100),
                )
            )
        )
    await write_batch(db_engine, records[:250])
    await write_batch(db_engine, records[100:])  # a replay overlapping the first batch counts once

    for period in ("day", "month"):
        report = await both_paths(db_engine, period)
        assert report.total_nanos == sum(r.cost_nanos or 0 for r in records)
        assert report.total_usd == sum((r.cost_usd or Decimal(0) for r in records), Decimal(0))
        assert report.unpriced_requests == sum(
            r.cost_nanos is None and (r.prompt_tokens is not None or r.completion_tokens is not None)
            for r in records
        )
        assert sum(line.requests for line in report.lines) == 400
        for team in ("search", "ads"):
            assert report.team_totals()[team] == from_nanos(
                sum(r.cost_nanos or 0 for r in records if r.team == team)
            )
    start, end = month_range("2026-12")
    december = await billing_report(db_engine, since=start, until=end, period="month")
    assert december.total_nanos == sum(r.cost_nanos or 0 for r in records if start <= r.started_at < end)
    assert december.total_nanos == await stored_cost_nanos(db_engine, start, end)
    unpriced = [line for line in december.lines if line.model == "mystery-model"]
    assert unpriced and all(line.cost_nanos == 0 and line.unpriced_requests > 0 for line in unpriced)


async def test_rerate_applies_a_correction_idempotently_and_keeps_the_rollup_exact(
    db_engine: AsyncEngine, tenancy: Tenancy
) -> None:
    records = [
        tenancy.price(
            make_record(
                started_at=NOV + timedelta(hours=h),
                team="search",
                requested_model=LLAMA,
                prompt_tokens=1000 + h,
                completion_tokens=100,
            )
        )
        for h in range(30)
    ] + [
        tenancy.price(
            make_record(
                started_at=NOV + timedelta(hours=h),
                team="ads",
                requested_model="mystery-model",
                prompt_tokens=50,
                completion_tokens=5,
            )
        )
        for h in range(4)
    ]
    await write_batch(db_engine, records)
    before = await both_paths(db_engine, "month")
    assert before.unpriced_requests == 4

    # The sheet's llama price was wrong: a correction with the same effective date wins over it.
    await tenancy.store.add_price(
        "test",
        model=LLAMA,
        input="0.22",
        output="0.22",
        cached_input="0.11",
        effective_from=datetime(2025, 8, 1, tzinfo=UTC),
    )
    await tenancy.store.add_price("test", model="mystery-model", input="1", output="2", effective_from=NOV)
    since, until = NOV, NOV + timedelta(days=2)

    dry = await rerate(db_engine, tenancy.prices.catalog, since=since, until=until, dry_run=True, chunk=7)
    assert (dry.examined, dry.changed, dry.newly_priced) == (34, 34, 4)
    assert (await both_paths(db_engine, "month")).lines == before.lines  # nothing written

    done = await rerate(db_engine, tenancy.prices.catalog, since=since, until=until, actor="test", chunk=7)
    expected_llama = sum(
        cost(1000 + h, 0, 100, "0.22", "0.11", "0.22") - cost(1000 + h, 0, 100, "0.20", "0.10", "0.20")
        for h in range(30)
    )
    expected_mystery = 4 * cost(50, 0, 5, "1", "1", "2")
    assert (done.examined, done.changed, done.newly_priced, done.newly_unpriced) == (34, 34, 4, 0)
    assert done.delta_usd == expected_llama + expected_mystery
    changes = {(c["team"], c["model"]): c for c in done.to_json()["changes"]}
    assert changes[("ads", "mystery-model")]["delta_usd"] == str(expected_mystery)

    after = await both_paths(db_engine, "month")
    assert after.unpriced_requests == 0
    assert after.total_nanos == await stored_cost_nanos(db_engine) == before.total_nanos + done.delta_nanos
    async with db_engine.connect() as conn:
        refs = {r for (r,) in await conn.execute(select(usage_events.c.price_ref).distinct())}
        hourly_cost = (await conn.execute(select(func.sum(usage_hourly.c.cost_nanos)))).scalar_one()
    assert all(ref.startswith("db:") for ref in refs) and int(hourly_cost) == after.total_nanos

    again = await rerate(db_engine, tenancy.prices.catalog, since=since, until=until, actor="test")
    assert (again.examined, again.changed, again.delta_nanos) == (34, 0, 0)
    assert (await both_paths(db_engine, "month")).lines == after.lines
    audited = await tenancy.store.audit(target="billing")
    assert [e.action for e in audited] == ["billing.rerate"]  # the no-op run and the dry run are not audited
    assert audited[0].detail["changed"] == 34


async def test_existing_records_are_counted_unpriced_by_the_migration_then_rerated(db_url: str) -> None:
    await migrate.upgrade(db_url, "0001")
    engine = create_engine(db_url)
    try:
        rows = []
        for h in range(5):
            row = record_to_row(
                make_record(
                    started_at=NOV + timedelta(hours=h),
                    team="search",
                    requested_model=LLAMA,
                    prompt_tokens=100,
                    completion_tokens=10,
                )
            )
            del row["cost_nanos"], row["price_ref"]
            rows.append(row)
        no_usage = record_to_row(make_record(started_at=NOV, team="search", requested_model=LLAMA))
        del no_usage["cost_nanos"], no_usage["price_ref"]
        async with engine.begin() as conn:  # written by a meter before rollups and prices
            await conn.execute(insert(usage_events), [*rows, no_usage])
        await migrate.upgrade(db_url, "head")
        report = await both_paths(engine, "month")
        assert (report.unpriced_requests, report.total_nanos) == (5, 0)
        tenancy = Tenancy(FP, TenancyConfig())
        await tenancy.start(engine)
        try:
            result = await rerate(engine, tenancy.prices.catalog, since=NOV, until=NOV + timedelta(days=1))
        finally:
            await tenancy.stop()
        assert (result.examined, result.newly_priced) == (6, 5)
        report = await both_paths(engine, "month")
        assert report.unpriced_requests == 0 and report.total_usd == 5 * cost(
            100, 0, 10, "0.20", "0.10", "0.20"
        )
    finally:
        await engine.dispose()


async def test_billing_through_the_admin_api(db_engine: AsyncEngine, tenancy: Tenancy) -> None:
    records = [
        tenancy.price(
            make_record(
                started_at=NOV + timedelta(days=d),
                team=team,
                requested_model=LLAMA,
                prompt_tokens=1000,
                completion_tokens=100,
            )
        )
        for d in range(3)
        for team in ("search", "ads")
    ]
    await write_batch(db_engine, records)
    async with asgi_client(admin_app(db_engine, tenancy)) as client:
        answer = (await client.get("/admin/v1/billing", params={"month": "2026-11"}, headers=AUTH)).json()
        assert answer["period"] == "month" and answer["since"] == "2026-11-01T00:00:00+00:00"
        assert [(d["team"], d["requests"], d["cost_usd"]) for d in answer["data"]] == [
            ("ads", 3, str(3 * cost(1000, 0, 100, "0.20", "0.10", "0.20"))),
            ("search", 3, str(3 * cost(1000, 0, 100, "0.20", "0.10", "0.20"))),
        ]
        assert Decimal(answer["total_usd"]) == sum(Decimal(d["cost_usd"]) for d in answer["data"])
        assert answer["teams"] == {"ads": "0.000660000", "search": "0.000660000"}
        daily = (
            await client.get(
                "/admin/v1/billing", params={"month": "2026-11", "period": "day", "team": "ads"}, headers=AUTH
            )
        ).json()
        assert [d["period"] for d in daily["data"]] == ["2026-11-01", "2026-11-02", "2026-11-03"]
        bad = await client.get("/admin/v1/billing", params={"month": "November"}, headers=AUTH)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "month"

        await client.post(
            "/admin/v1/prices",
            json={
                "model": LLAMA,
                "input": "0.40",
                "output": "0.40",
                "effective_from": "2026-11-02T00:00:00Z",
            },
            headers=AUTH,
        )
        body = {"since": "2026-11-01T00:00:00Z", "until": "2026-12-01T00:00:00Z"}
        rerated = (await client.post("/admin/v1/billing/rerate", json=body, headers=AUTH)).json()
        assert (rerated["examined"], rerated["changed"]) == (6, 4)  # the first day keeps its price
        assert Decimal(rerated["delta_usd"]) == 4 * (
            cost(1000, 0, 100, "0.40", "0.40", "0.40") - cost(1000, 0, 100, "0.20", "0.10", "0.20")
        )
        again = (await client.post("/admin/v1/billing/rerate", json=body, headers=AUTH)).json()
        assert again["changed"] == 0 and again["delta_usd"] == "0.000000000"


def test_billing_through_the_cli(db_url: str) -> None:
    async def seed() -> None:
        await migrate.upgrade(db_url)
        engine = create_engine(db_url)
        tenancy = Tenancy(FP, TenancyConfig())
        await tenancy.start(engine)
        try:
            await write_batch(
                engine,
                [
                    tenancy.price(
                        make_record(
                            started_at=NOV + timedelta(days=d, hours=3),
                            team="search",
                            requested_model=LLAMA,
                            prompt_tokens=500,
                            completion_tokens=50,
                        )
                    )
                    for d in range(2)
                ]
                + [
                    tenancy.price(
                        make_record(
                            started_at=NOV,
                            team="ads",
                            requested_model="mystery",
                            prompt_tokens=5,
                            completion_tokens=5,
                        )
                    )
                ],
            )
        finally:
            await tenancy.stop()
            await engine.dispose()

    asyncio.run(seed())

    @click.group()
    def cli() -> None:
        pass

    for command in COMMANDS:
        cli.add_command(command)
    runner = CliRunner()
    env = {"METER_DATABASE_URL": db_url, "METER_KEY_SECRET": "0123456789abcdef0123456789abcdef"}

    def run(*args: str) -> Any:
        result = runner.invoke(cli, list(args), env=env)
        assert result.exit_code == 0, (args, result.output, result.exception)
        return result

    each = cost(500, 0, 50, "0.20", "0.10", "0.20")
    table = run("billing", "report", "--month", "2026-11")
    lines = table.stdout.splitlines()
    assert lines[0].split() == [
        "period",
        "team",
        "model",
        "requests",
        "prompt_tokens",
        "completion_tokens",
        "cached_tokens",
        "reasoning_tokens",
        "cost_usd",
        "unpriced_requests",
    ]
    assert lines[-1].split() == ["total", "3", "-", "-", "-", "-", f"{2 * each:f}", "1"]
    assert "1 request(s) used tokens but had no price" in table.stderr
    rows = list(
        csv.DictReader(
            io.StringIO(
                run("billing", "report", "--month", "2026-11", "--period", "day", "--format", "csv").stdout
            )
        )
    )
    assert [(r["period"], r["team"], r["cost_usd"]) for r in rows] == [
        ("2026-11-01", "ads", "0.000000000"),
        ("2026-11-01", "search", str(each)),
        ("2026-11-02", "search", str(each)),
    ]
    as_json = json.loads(run("billing", "report", "--month", "2026-11", "--format", "json").stdout)
    assert Decimal(as_json["total_usd"]) == 2 * each and as_json["unpriced_requests"] == 1

    run("prices", "set", "mystery", "--input", "1", "--output", "1", "--effective-from", "2026-01-01")
    out = run("billing", "rerate", "--since", "2026-11-01", "--until", "2026-12-01").stdout
    assert out.startswith("examined 3 request(s); changed 1 (1 newly priced, 0 newly unpriced)")
    assert "total delta 0.000010000 USD" in out
    again = run(
        "billing", "rerate", "--since", "2026-11-01", "--until", "2026-12-01", "--format", "json"
    ).stdout
    assert json.loads(again)["changed"] == 0
    final = json.loads(run("billing", "report", "--month", "2026-11", "--format", "json").stdout)
    assert final["unpriced_requests"] == 0 and Decimal(final["total_usd"]) == 2 * each + Decimal("0.00001")
