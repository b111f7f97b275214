"""The price catalog meter bills with: shipped sheet + price file + database rows, effective dating,
precedence, short-name overrides, size-tier fallback, price refs; adding prices through the store, the
admin API and the CLI on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import click
import pytest
from click.testing import CliRunner
from sqlalchemy.ext.asyncio import AsyncEngine

from meter.billing.catalog import parse_usd
from meter.billing.prices import Price, PriceRow, default_price_rows, load_price_file
from meter.billing.rating import PricedCatalog, pick_row, price_record
from meter.cli.main import MANAGEMENT_COMMANDS as COMMANDS
from meter.db import migrate
from meter.errors import RequestError
from meter.tenancy.identity import KeyFingerprinter
from meter.tenancy.runtime import Tenancy, TenancyConfig
from tests.conftest_db import make_record
from tests.support.admin import AUTH, admin_app, asgi_client

FP = KeyFingerprinter(b"0123456789abcdef0123456789abcdef")
LLAMA = "accounts/fireworks/models/llama-v3p1-8b-instruct"
T0 = datetime(2026, 1, 1, tzinfo=UTC)
T1 = datetime(2026, 6, 1, tzinfo=UTC)


def row(
    model: str, input: str, output: str, at: datetime, *, cached: str | None = None, id: int | None = None
) -> PriceRow:
    return PriceRow(
        model=model,
        price=Price(Decimal(input), Decimal(output), None if cached is None else Decimal(cached)),
        effective_from=at,
        id=id,
    )


# -- pure ------------------------------------------------------------------------------------------


def test_shipped_sheet_is_dated_and_sourced():
    rows = default_price_rows()
    assert {r.effective_from for r in rows} == {datetime(2025, 8, 1, tzinfo=UTC)}
    assert {r.source for r in rows} == {"fireworks.ai/pricing, 2025-08"}
    catalog = PricedCatalog(rows)
    llama = catalog.lookup(LLAMA, T0)
    assert llama is not None and catalog.ref(llama) == f"sheet:2025-08-01:{LLAMA}"
    tier = catalog.lookup("accounts/me/models/my-finetune-13b", T0)  # no row of its own: size tier
    assert tier is not None and tier.model == "tier:4b-16b"
    assert catalog.lookup("some-model-without-size", T0) is None


def test_later_sources_override_from_their_effective_date():
    sheet = [row(LLAMA, "0.20", "0.20", T0)]
    file = [row(LLAMA, "0.25", "0.25", T1)]
    db = [row("llama-v3p1-8b-instruct", "0.30", "0.30", T1, id=7)]  # a short name covers the full one
    catalog = PricedCatalog(sheet, file, db)
    before, after = datetime(2026, 5, 31, 23, 59, tzinfo=UTC), T1
    assert catalog.lookup(LLAMA, before).price.input == Decimal("0.20")
    chosen = catalog.lookup(LLAMA, after)
    assert chosen.price.input == Decimal("0.30") and catalog.ref(chosen) == "db:7"  # db beats file on a tie
    assert catalog.lookup("llama-v3p1-8b-instruct", after).price.input == Decimal("0.30")
    without_db = PricedCatalog(sheet, file)
    chosen = without_db.lookup(LLAMA, after)
    assert catalog.ref(chosen) == f"file:2026-06-01T00:00:00+00:00:{LLAMA}"
    # A correction: same model and effective_from, a higher id.
    corrected = catalog.with_db_rows([*db, row("llama-v3p1-8b-instruct", "0.29", "0.29", T1, id=9)])
    assert corrected.ref(corrected.lookup(LLAMA, after)) == "db:9"


def test_lookups_are_memoised_per_hour_only_when_no_row_starts_inside_it():
    change = datetime(2026, 6, 1, 10, 30, tzinfo=UTC)
    catalog = PricedCatalog([row(LLAMA, "0.20", "0.20", T0)], db=[row(LLAMA, "0.30", "0.30", change, id=1)])
    for minute, price in [(10, "0.20"), (29, "0.20"), (30, "0.30"), (59, "0.30"), (10, "0.20"), (30, "0.30")]:
        at = datetime(2026, 6, 1, 10, minute, tzinfo=UTC)
        assert catalog.lookup(LLAMA, at).price.input == Decimal(price), minute
    for hour, price in [(9, "0.20"), (11, "0.30"), (9, "0.20"), (11, "0.30")]:
        assert catalog.lookup(LLAMA, datetime(2026, 6, 1, hour, 59, tzinfo=UTC)).price.input == Decimal(price)


def test_price_record_prefers_the_answering_models_own_row_and_rounds_once():
    catalog = PricedCatalog(
        [row(LLAMA, "0.20", "0.20", T0, cached="0.10"), row("tier:over-16b", "0.90", "0.90", T0)]
    )
    record = make_record(
        started_at=T1,
        requested_model="my-alias-70b",  # would fall to the over-16b tier
        response_model=LLAMA,  # what answered has its own row
        prompt_tokens=1000,
        cached_tokens=400,
        completion_tokens=333,
    )
    # (600 * 0.20 + 400 * 0.10 + 333 * 0.20) / 1e6 = 0.0002266 USD = 226600 nano-USD
    assert price_record(record, catalog) == (226_600, f"sheet:2026-01-01:{LLAMA}")
    only_alias = make_record(
        started_at=T1, requested_model="my-alias-70b", prompt_tokens=10, completion_tokens=0
    )
    assert pick_row(catalog, only_alias).model == "tier:over-16b"
    tiny = make_record(started_at=T1, requested_model=LLAMA, prompt_tokens=1, completion_tokens=0)
    assert price_record(tiny, catalog) == (200, f"sheet:2026-01-01:{LLAMA}")  # 0.20 USD / 1M = 200 nano-USD
    unknown = make_record(started_at=T1, requested_model="mystery", prompt_tokens=10, completion_tokens=1)
    assert price_record(unknown, catalog) == (None, None)
    before_any_row = make_record(
        started_at=datetime(2025, 1, 1, tzinfo=UTC),
        requested_model=LLAMA,
        prompt_tokens=10,
        completion_tokens=1,
    )
    assert price_record(before_any_row, catalog) == (None, None)
    no_usage = make_record(started_at=T1, requested_model=LLAMA)
    assert price_record(no_usage, catalog) == (None, None)


def test_operator_prices_are_validated():
    assert parse_usd("0.000000001", "input") == Decimal("1E-9")
    assert parse_usd(3, "input") == Decimal(3)
    for bad, message in [
        (0.1, "decimal string"),
        ("0.0000000001", "9 decimal places"),
        ("-1", "between"),
        ("NaN", "between"),
        ("abc", "not a number"),
        (True, "decimal string"),
    ]:
        with pytest.raises(RequestError, match=message):
            parse_usd(bad, "input")


def test_price_file_overrides_via_tenancy(tmp_path):
    path = tmp_path / "prices.toml"
    path.write_text(
        'effective_from = "2026-03-01T00:00:00Z"\nsource = "contract 2026"\n'
        "[models]\n"
        '"accounts/fireworks/models/llama-v3p1-8b-instruct" = { input = "0.15", output = "0.15" }\n'
    )
    tenancy = Tenancy(FP, TenancyConfig(price_file_rows=load_price_file(str(path))))
    old = tenancy.price(
        make_record(started_at=T0, requested_model=LLAMA, prompt_tokens=1_000_000, completion_tokens=0)
    )
    new = tenancy.price(
        make_record(started_at=T1, requested_model=LLAMA, prompt_tokens=1_000_000, completion_tokens=0)
    )
    assert (old.cost_usd, old.price_ref) == (Decimal("0.2"), f"sheet:2025-08-01:{LLAMA}")
    assert (new.cost_usd, new.price_ref) == (Decimal("0.15"), f"file:2026-03-01T00:00:00+00:00:{LLAMA}")


# -- the database, the API and the CLI ------------------------------------------------------------


@pytest.fixture
async def tenancy(db_engine: AsyncEngine) -> AsyncIterator[Tenancy]:
    tenancy = Tenancy(FP, TenancyConfig())
    await tenancy.start(db_engine)
    yield tenancy
    await tenancy.stop()


async def test_price_rows_in_the_database_reach_every_replica(
    db_engine: AsyncEngine, tenancy: Tenancy
) -> None:
    other = Tenancy(FP, TenancyConfig())
    await other.start(db_engine)
    try:
        added = await tenancy.store.add_price(
            "test", model="llama-v3p1-8b-instruct", input="0.123456789", output="0.5", effective_from=T1
        )
        assert added.id is not None and added.price.input == Decimal("0.123456789")
        assert tenancy.prices.catalog.ref(tenancy.prices.catalog.lookup(LLAMA, T1)) == f"db:{added.id}"
        assert other.prices.catalog.lookup(LLAMA, T1).price.input == Decimal("0.20")  # not yet
        await other.refresh()
        chosen = other.prices.catalog.lookup(LLAMA, T1)
        assert (chosen.price.input, chosen.price.output, chosen.price.cached_input) == (
            Decimal("0.123456789"),
            Decimal("0.5"),
            None,
        )
        with pytest.raises(RequestError, match="unknown tier"):
            await tenancy.store.add_price("test", model="tier:huge", input="1", output="1", effective_from=T1)
        entries = await tenancy.store.audit(target=f"price:{added.id}")
        assert entries[0].action == "price.add" and entries[0].detail["input"] == "0.123456789"
    finally:
        await other.stop()


async def test_prices_through_the_admin_api(db_engine: AsyncEngine, tenancy: Tenancy) -> None:
    async with asgi_client(admin_app(db_engine, tenancy)) as client:
        added = await client.post(
            "/admin/v1/prices",
            json={
                "model": LLAMA,
                "input": "0.18",
                "cached_input": "0.09",
                "output": "0.18",
                "effective_from": "2026-06-01T00:00:00Z",
                "source": "contract",
            },
            headers=AUTH,
        )
        assert added.status_code == 201, added.text
        assert added.json()["ref"] == f"db:{added.json()['id']}"
        float_price = await client.post(
            "/admin/v1/prices",
            json={"model": LLAMA, "input": 0.1, "output": "1", "effective_from": "2026-06-01T00:00:00Z"},
            headers=AUTH,
        )
        assert float_price.status_code == 400
        listed = (await client.get("/admin/v1/prices", params={"model": LLAMA}, headers=AUTH)).json()["data"]
        assert [(p["input"], p["ref"].split(":")[0]) for p in listed] == [("0.20", "sheet"), ("0.18", "db")]
        at = {"model": LLAMA, "at": "2026-05-01"}
        assert (await client.get("/admin/v1/prices/lookup", params=at, headers=AUTH)).json()[
            "input"
        ] == "0.20"
        at["at"] = "2026-06-02"
        assert (await client.get("/admin/v1/prices/lookup", params=at, headers=AUTH)).json()[
            "input"
        ] == "0.18"
        missing = await client.get("/admin/v1/prices/lookup", params={"model": "mystery"}, headers=AUTH)
        assert missing.status_code == 404 and "unpriced" in missing.json()["error"]["message"]


def test_prices_through_the_cli(db_url: str, tmp_path: Any) -> None:
    asyncio.run(migrate.upgrade(db_url))

    @click.group()
    def cli() -> None:
        pass

    for command in COMMANDS:
        cli.add_command(command)
    runner = CliRunner()
    env = {"METER_DATABASE_URL": db_url, "METER_KEY_SECRET": "0123456789abcdef0123456789abcdef"}

    def run(*args: str, ok: bool = True) -> Any:
        result = runner.invoke(cli, list(args), env=env)
        assert (result.exit_code == 0) == ok, (args, result.output, result.exception)
        return result

    out = run(
        "prices",
        "set",
        "llama-v3p1-8b-instruct",
        "--input",
        "0.11",
        "--output",
        "0.22",
        "--effective-from",
        "2026-06-01",
    ).output
    assert out.startswith("price db:")
    bad = run(
        "prices",
        "set",
        "x",
        "--input",
        "0.1234567891",
        "--output",
        "1",
        "--effective-from",
        "2026-06-01",
        ok=False,
    )
    assert "9 decimal places" in bad.output
    sheet = tmp_path / "more.toml"
    sheet.write_text(
        'effective_from = "2026-07-01T00:00:00Z"\n[tiers]\n"under-4b" = { input = "0.05", output = "0.05" }\n'
    )
    assert "1 price row(s) added" in run("prices", "import", str(sheet)).output

    looked = json.loads(run("prices", "lookup", LLAMA, "--at", "2026-06-15", "--format", "json").output)[0]
    assert (looked["input"], looked["output"]) == ("0.11", "0.22") and looked["ref"].startswith("db:")
    tier = json.loads(run("prices", "lookup", "tiny-1b", "--at", "2026-07-02", "--format", "json").output)[0]
    assert (tier["model"], tier["input"]) == ("tier:under-4b", "0.05")
    listed = run("prices", "list", "--model", LLAMA).output
    assert "0.20" in listed and "sheet:2025-08-01" in listed
    assert "unpriced" in run("prices", "lookup", "mystery", ok=False).output
