"""Pure pricing: exact Decimal cost, one rounding, dated rows, size-tier fallback, sheet validation."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meter.billing.prices import (
    Price,
    PriceCatalog,
    PriceRow,
    compute_cost,
    default_price_rows,
    from_nanos,
    model_size,
    parse_price_sheet,
    size_tier,
    to_nanos,
)
from meter.records import Usage

T0 = datetime(2026, 1, 1, tzinfo=UTC)
T1 = datetime(2026, 6, 1, tzinfo=UTC)


def test_cost_bills_cached_prompt_at_cached_price_and_rounds_once():
    price = Price(input=Decimal("0.90"), output=Decimal("0.90"), cached_input=Decimal("0.45"))
    usage = Usage(prompt_tokens=1000, completion_tokens=333, cached_tokens=400)
    # (600 * 0.90 + 400 * 0.45 + 333 * 0.90) / 1e6 = 0.0010197
    assert compute_cost(usage, price) == Decimal("0.001019700")
    tiny = compute_cost(Usage(prompt_tokens=1, completion_tokens=0), Price(Decimal("0.0075"), Decimal(0)))
    assert tiny == Decimal("0.000000008")  # 7.5 nano-USD rounds half-even to 8


def test_nothing_counted_is_unpriced_not_zero():
    assert compute_cost(Usage(), Price(Decimal(1), Decimal(1))) is None
    assert compute_cost(Usage(prompt_tokens=0, completion_tokens=0), Price(Decimal(1), Decimal(1))) == 0


@given(st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 10**6)), max_size=50))
def test_totals_of_stored_nanos_equal_sum_of_costs(pairs):
    price = Price(Decimal("0.22"), Decimal("0.88"), Decimal("0.11"))
    costs = [compute_cost(Usage(prompt_tokens=p, completion_tokens=c), price) for p, c in pairs]
    nanos = [to_nanos(c) for c in costs if c is not None]
    assert from_nanos(sum(nanos)) == sum((c for c in costs if c is not None), Decimal(0))


def test_dated_rows_apply_from_their_start():
    catalog = PriceCatalog(
        [
            PriceRow("m", Price(Decimal(1), Decimal(2)), T0),
            PriceRow("m", Price(Decimal(3), Decimal(4)), T1),
        ]
    )
    assert catalog.lookup("m", datetime(2025, 12, 31, tzinfo=UTC)) is None
    assert catalog.lookup("m", T0).price.input == 1
    assert catalog.lookup("m", datetime(2026, 5, 31, 23, 59, tzinfo=UTC)).price.input == 1
    assert catalog.lookup("m", T1).price.input == 3


def test_full_and_short_model_names_match_and_tiers_fill_gaps():
    catalog = PriceCatalog(default_price_rows())
    now = datetime(2026, 11, 1, tzinfo=UTC)
    full = catalog.lookup("accounts/fireworks/models/llama-v3p1-8b-instruct", now)
    short = catalog.lookup("llama-v3p1-8b-instruct", now)
    assert full is not None and full == short and full.price.input == Decimal("0.20")
    tiered = catalog.lookup("accounts/acme/models/my-finetune-70b", now)
    assert tiered is not None and tiered.model == "tier:over-16b"
    assert catalog.lookup("accounts/acme/models/mystery", now) is None
    assert catalog.lookup(None, now) is None


@pytest.mark.parametrize(
    ("name", "tier"),
    [
        ("llama-v3p2-3b-instruct", "under-4b"),
        ("phi-3-mini-3p8b", "under-4b"),
        ("llama-v3p1-8b-instruct", "4b-16b"),
        ("qwen2p5-72b-instruct", "over-16b"),
        ("mixtral-8x7b-instruct", "moe-up-to-56b"),
        ("mixtral-8x22b-instruct", "moe-56b-176b"),
        ("qwen3-30b-a3b", "moe-up-to-56b"),
        ("nomic-embed-text-v1.5", "embedding-up-to-150m"),
        ("gte-large-335m", "embedding-150m-350m"),
        ("gpt-4o", None),
    ],
)
def test_size_tiers(name, tier):
    assert size_tier(name) == tier


def test_model_size_reads_moe_totals():
    assert model_size("mixtral-8x22b") is not None and model_size("mixtral-8x22b").billions == 176


def test_shipped_sheet_is_valid_and_dated():
    rows = default_price_rows()
    assert len(rows) > 20
    assert all(r.effective_from.tzinfo is not None and r.source for r in rows)


@pytest.mark.parametrize(
    ("sheet", "message"),
    [
        (
            {"effective_from": "2026-01-01T00:00:00Z", "models": {"m": {"input": 0.1, "output": "1"}}},
            "strings",
        ),
        (
            {"effective_from": "2026-01-01T00:00:00Z", "models": {"m": {"input": "-1", "output": "1"}}},
            "non-negative",
        ),
        ({"effective_from": "2026-01-01T00:00:00Z", "models": {"m": {"input": "1"}}}, "required"),
        (
            {
                "effective_from": "2026-01-01T00:00:00Z",
                "models": {"m": {"input": "1", "output": "1", "x": "1"}},
            },
            "unknown",
        ),
        ({"effective_from": "2026-01-01", "models": {}}, "UTC offset"),
    ],
)
def test_bad_sheets_fail_naming_the_entry(sheet, message):
    with pytest.raises(ValueError, match=message):
        parse_price_sheet(sheet)
