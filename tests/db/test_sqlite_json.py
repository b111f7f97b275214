"""The SQLite writer's JSON path (one ``json_each`` statement per batch) against the binding path it
replaced (SQLAlchemy executemany): same stored bytes, same records read back, same rollups, and the
records it must not take (values it could store differently) still take the binding path."""

from __future__ import annotations

import dataclasses
import json
import math
import random
import struct
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import select, text
from sqlalchemy.dialects import sqlite
from sqlalchemy.ext.asyncio import AsyncEngine

from meter.db import insert, poison, sqlite_json
from meter.db.insert import write_batch, write_payloads
from meter.db.models import RECORD_FIELDS, make_storable, record_to_row, row_to_record, usage_events
from meter.db.poison import write_isolating
from meter.db.types import UtcDateTime
from meter.journal.payload import FALLBACK_MARK, decode_row, encode_record
from meter.records import UsageRecord
from tests.conftest_db import every_field_record, make_record, migrated_engine
from tests.support.loop_turns import loop_turns
from tests.support.rollups import assert_rollup_equals_raw, dataset

UNICODE = (
    "ünïcödé ✓ 日本語 😀 \U0001f9d1\u200d\U0001f4bb e\u0301 \u202eRTL\u202c \u2028\u2029"
    ' "q" \\ \n\t\r\x01\x1f\x7f'
)
BIG = 2**63 - 1


def edge_records() -> list[UsageRecord]:
    """every_field_record() and records at the edges of each type the JSON path carries."""
    every = every_field_record()
    nothing = make_record(  # None in every nullable field
        **{
            f.name: None
            for f in dataclasses.fields(UsageRecord)
            if f.name not in {"event_id", "started_at", "method", "endpoint", "status_code"}
            and f.name not in {"outcome", "usage_source", "stream", "team", "upstream_metrics"}
            and f.name not in {"request_bytes", "response_bytes"}
        }
    )
    return [
        every,
        dataclasses.replace(every, event_id=make_record().event_id, started_at=datetime(2024, 5, 1)),
        nothing,
        make_record(
            started_at=datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
            method=UNICODE,
            endpoint="/v1/" + UNICODE,
            team=UNICODE,
            key_fingerprint="",
            requested_model="",
            response_model=UNICODE * 20,
            error=UNICODE,
            finish_reason="stop,length,tool_calls",
            price_ref="{}",
            prompt_tokens=BIG,
            completion_tokens=0,
            cached_tokens=-1,
            reasoning_tokens=2**53 + 1,
            total_tokens=-(2**63),
            cost_nanos=BIG,
            request_bytes=BIG,
            response_bytes=0,
            status_code=599,
            stream=False,
            duration_ms=5e-324,
            upstream_headers_ms=1.7976931348623157e308,
            ttft_ms=0.1 + 0.2,
            output_tokens_per_second=1 / 3,
            overhead_ms=-0.0,
            server_ttft_ms=1e23,
            server_processing_ms=9007199254740993.0,
            upstream_metrics={
                UNICODE: 1.5,
                "big": 2**64 - 1,
                "neg": -(2**63),
                "tiny": 2.2250738585072014e-308,
                "none": None,
                "text": UNICODE,
                "flag": True,
            },
        ),
        make_record(
            started_at=datetime(1970, 1, 1, 0, 0, tzinfo=timezone(timedelta(hours=14))),
            upstream_metrics={},
        ),
        make_record(
            started_at=datetime(2024, 3, 10, 1, 59, 59, 1, tzinfo=timezone(-timedelta(hours=9, minutes=30)))
        ),
    ]


@pytest.fixture
async def sqlite_engine(db_sqlite_url: str) -> AsyncIterator[AsyncEngine]:
    async with migrated_engine(db_sqlite_url) as engine:
        yield engine


@pytest.fixture
async def other_sqlite_engine(tmp_path: Any) -> AsyncIterator[AsyncEngine]:
    async with migrated_engine(f"sqlite:///{tmp_path / 'binding.db'}") as engine:
        yield engine


async def stored_records(engine: AsyncEngine) -> dict[str, UsageRecord]:
    async with engine.connect() as conn:
        rows = (await conn.execute(select(usage_events))).all()
    return {row.event_id: row_to_record(row) for row in rows}


async def raw_rows(engine: AsyncEngine, table: str) -> list[tuple[Any, ...]]:
    """Every column of every row as SQLite holds it: storage class and exact value (quote())."""
    async with engine.connect() as conn:
        columns = [row[1] for row in (await conn.execute(text(f"PRAGMA table_info({table})"))).all()]
        cells = ", ".join(f"typeof({c}), quote({c})" for c in columns)
        rows = (await conn.execute(text(f"SELECT {cells} FROM {table} ORDER BY 2, 4, 6, 8, 10, 12"))).all()
    out = []
    for row in rows:
        cells_by_column = dict(zip(columns, zip(row[::2], row[1::2], strict=True), strict=True))
        if "upstream_metrics" in cells_by_column:  # JSON: the same document, spelled differently
            kind, quoted = cells_by_column["upstream_metrics"]
            cells_by_column["upstream_metrics"] = (kind, json.loads(quoted[1:-1].replace("''", "'")))
        out.append(tuple(cells_by_column.items()))
    return out


def expected(record: UsageRecord) -> UsageRecord:
    """What reading ``record`` back returns on any path: UTC times; -0.0 is stored as 0.0."""
    moment = record.started_at
    moment = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    return dataclasses.replace(record, started_at=moment)


# -- the JSON path stores what the binding path stores ------------------------------------------------


def test_edge_records_take_the_json_path() -> None:
    records = edge_records()
    assert sqlite_json.records_document(records) is not None
    payloads = [encode_record(record) for record in records]
    assert all(payload[:1] == b"{" for payload in payloads)
    assert all(sqlite_json._plain_payload_row(payload) is not None for payload in payloads)
    assert sqlite_json.payloads_document(payloads) == sqlite_json.records_document(records)


@pytest.mark.parametrize("via", ["payloads", "records"])
async def test_edge_records_round_trip_and_store_the_same_bytes_as_the_binding_path(
    sqlite_engine: AsyncEngine, other_sqlite_engine: AsyncEngine, via: str
) -> None:
    records = edge_records()
    if via == "payloads":
        assert await write_payloads(sqlite_engine, [encode_record(r) for r in records]) == len(records)
    else:
        assert await write_batch(sqlite_engine, records) == len(records)
    assert await insert._write_rows(other_sqlite_engine, [record_to_row(r) for r in records]) == len(records)

    back = await stored_records(sqlite_engine)
    assert back == {r.event_id: expected(r) for r in records}
    assert all(r.started_at.tzinfo is UTC for r in back.values())
    assert back == await stored_records(other_sqlite_engine)
    for table in ("usage_events", "usage_hourly"):
        assert await raw_rows(sqlite_engine, table) == await raw_rows(other_sqlite_engine, table)


async def test_floats_round_trip_exactly(sqlite_engine: AsyncEngine) -> None:
    rng = random.Random(5)
    floats: list[float] = []
    while len(floats) < 4_000:
        value = struct.unpack("<d", rng.getrandbits(64).to_bytes(8, "little"))[0]
        if math.isfinite(value):
            floats.append(value)
    floats += [rng.uniform(0, 10_000) for _ in range(4_000)]
    records = [
        make_record(duration_ms=a, overhead_ms=b, upstream_metrics={"x": a, "y": b})
        for a, b in zip(floats[::2], floats[1::2], strict=True)
    ]
    assert await write_payloads(sqlite_engine, [encode_record(r) for r in records]) == len(records)
    assert await stored_records(sqlite_engine) == {r.event_id: r for r in records}


# -- idempotency and rollups --------------------------------------------------------------------------


async def test_rollups_equal_raw_sums_after_duplicate_deliveries(sqlite_engine: AsyncEngine) -> None:
    records = dataset(900, seed=11)
    payloads = [encode_record(r) for r in records]
    assert sqlite_json.payloads_document(payloads) is not None
    assert await write_payloads(sqlite_engine, payloads[:300]) == 300
    assert await write_payloads(sqlite_engine, payloads[:300]) == 0  # a whole batch replayed
    assert await write_payloads(sqlite_engine, payloads[200:500]) == 200  # half old, half new
    doubled = payloads[500:600] + payloads[500:600]  # duplicates inside one batch
    assert await write_payloads(sqlite_engine, doubled) == 100
    assert await write_batch(sqlite_engine, records[550:900]) == 300  # records, partly stored
    assert await write_batch(sqlite_engine, records) == 0

    assert await stored_records(sqlite_engine) == {r.event_id: expected(r) for r in records}
    await assert_rollup_equals_raw(sqlite_engine)
    async with sqlite_engine.connect() as conn:
        sums = (await conn.execute(text("SELECT sum(requests), sum(prompt_tokens) FROM usage_hourly"))).one()
    assert tuple(sums) == (900, sum(r.prompt_tokens or 0 for r in records))


async def test_replays_change_nothing_byte_for_byte(
    sqlite_engine: AsyncEngine, other_sqlite_engine: AsyncEngine
) -> None:
    records = dataset(300, seed=12) + edge_records()
    payloads = [encode_record(r) for r in records]
    await write_payloads(sqlite_engine, payloads)
    await write_payloads(sqlite_engine, payloads[::-1])
    await write_batch(sqlite_engine, records[100:])
    await insert._write_rows(other_sqlite_engine, [make_storable(decode_row(p)) for p in payloads])
    for table in ("usage_events", "usage_hourly"):
        assert await raw_rows(sqlite_engine, table) == await raw_rows(other_sqlite_engine, table)


# -- what must take the binding path -------------------------------------------------------------------


def stdlib_payload(record: UsageRecord, **raw: Any) -> bytes:
    """A fallback-marked payload (meter.journal.payload Rule 2) with ``raw`` JSON values."""
    values = {name: getattr(record, name) for name in RECORD_FIELDS}
    values.update(raw)
    return FALLBACK_MARK + json.dumps(values, default=str).encode()


def orjson_payload(record: UsageRecord, **raw: Any) -> bytes:
    """An orjson payload with ``raw`` JSON values (``...``: the key is left out)."""
    values = orjson.loads(encode_record(record))
    values.update(raw)
    return orjson.dumps({name: value for name, value in values.items() if value is not ...})


JSON_PATH, BINDING_PATH = True, False
UNUSUAL_PAYLOADS = {  # name: (payload of a record, whether the JSON path may take it)
    "nul": (lambda r: encode_record(dataclasses.replace(r, error="nul\x00")), BINDING_PATH),
    "u64": (lambda r: encode_record(dataclasses.replace(r, prompt_tokens=2**63)), BINDING_PATH),
    "big": (lambda r: encode_record(dataclasses.replace(r, prompt_tokens=2**70)), BINDING_PATH),
    "inf": (lambda r: stdlib_payload(r, duration_ms=math.inf), BINDING_PATH),
    "nan-metric": (lambda r: stdlib_payload(r, upstream_metrics={"a": math.nan}), BINDING_PATH),
    "stdlib-plain": (lambda r: stdlib_payload(r, error="ünï ✓"), JSON_PATH),
    "null-metrics": (lambda r: orjson_payload(r, upstream_metrics=None), JSON_PATH),
    "nested-metric": (lambda r: orjson_payload(r, upstream_metrics={"a": [1]}), BINDING_PATH),
    "list": (lambda r: orjson_payload(r, error=["x"]), BINDING_PATH),
    "null-outcome": (lambda r: orjson_payload(r, outcome=None), BINDING_PATH),
    "int-stream": (lambda r: orjson_payload(r, stream=1), BINDING_PATH),
    "str-stream": (lambda r: orjson_payload(r, stream="yes"), BINDING_PATH),
    "surrogate": (lambda r: stdlib_payload(r, error="lone \ud800"), BINDING_PATH),
    "extra-key": (lambda r: orjson_payload(r, extra="newer meter"), JSON_PATH),
    "missing-key": (lambda r: orjson_payload(r, team=...), JSON_PATH),
    "bad-date": (lambda r: orjson_payload(r, started_at="2024-13-01T00:00:00+00:00"), BINDING_PATH),
    "date-overflow": (lambda r: orjson_payload(r, started_at="0001-01-01T00:00:00+01:00"), BINDING_PATH),
    "not-a-record": (lambda r: b"[1, 2]", BINDING_PATH),
}


@pytest.mark.parametrize("name", list(UNUSUAL_PAYLOADS))
async def test_unusual_payloads_get_the_binding_paths_outcome(
    sqlite_engine: AsyncEngine, other_sqlite_engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    """A batch with a payload the JSON path is not sure of gets exactly the binding path's outcome:
    the same records stored (the same bytes), the same rejected, or the same error raised."""
    payload, json_path = UNUSUAL_PAYLOADS[name]
    odd = payload(make_record())
    assert (sqlite_json.payloads_document([odd]) is not None) is json_path
    plain = [encode_record(make_record()) for _ in range(5)]
    batch = [*plain[:2], odd, *plain[2:]]
    got = await outcome_of(write_isolating(sqlite_engine, batch))

    async def binding(engine: AsyncEngine, batch: Sequence[bytes]) -> int:  # write_payloads before
        return await insert._write_rows(engine, [make_storable(decode_row(p)) for p in batch])

    monkeypatch.setattr(poison, "write_payloads", binding)
    assert got == await outcome_of(write_isolating(other_sqlite_engine, batch))
    for table in ("usage_events", "usage_hourly"):
        assert await raw_rows(sqlite_engine, table) == await raw_rows(other_sqlite_engine, table)


async def outcome_of(write: Any) -> tuple[Any, ...]:
    try:
        outcome: poison.WriteOutcome = await write
    except Exception as exc:
        return ("raised", type(exc), type(getattr(exc, "orig", None)))
    return (outcome.written, outcome.inserted, [(p, type(e)) for p, e in outcome.rejected])


MOMENT = datetime(2024, 5, 1, tzinfo=UTC)
METRICS = {"a": 1.0}


@pytest.mark.parametrize(
    "record",
    [
        make_record(duration_ms=math.inf),
        make_record(prompt_tokens=2**63),
        make_record(error="lone \udfff"),
        make_record(upstream_metrics={"when": datetime(2024, 1, 1)}),
        make_record(stream=1),  # type: ignore[arg-type]
        make_record(started_at="2024-05-01T00:00:00+00:00"),  # type: ignore[arg-type]
        make_record(error=datetime(2024, 1, 1)),  # type: ignore[arg-type]
        make_record(started_at=MOMENT, error=MOMENT),  # type: ignore[arg-type]
        make_record(upstream_metrics=METRICS, error=METRICS),  # type: ignore[arg-type]
        make_record(started_at=datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=1)))),
    ],
    ids=[
        "inf",
        "u64",
        "surrogate",
        "metric-type",
        "int-stream",
        "str-time",
        "datetime-error",
        "started-at-twice",
        "metrics-twice",
        "date-overflow",
    ],
)
def test_unusual_records_take_the_binding_path(record: UsageRecord) -> None:
    assert sqlite_json.records_document([make_record(), record]) is None


# -- started_at's stored text ------------------------------------------------------------------------


def sqlalchemy_text(moment: datetime) -> str:
    """What SQLAlchemy binds for a UtcDateTime on SQLite (the binding path)."""
    dialect = sqlite.dialect()
    utc = UtcDateTime().process_bind_param(moment, dialect)
    processor = sqlite.DATETIME().bind_processor(dialect)
    assert processor is not None and utc is not None
    stored: str = processor(utc)
    return stored


@settings(max_examples=500, deadline=None)
@given(
    moment=st.datetimes(
        min_value=datetime(2, 1, 1), max_value=datetime(9998, 12, 31), timezones=st.none() | st.timezones()
    )
)
def test_stored_time_text_is_sqlalchemys(moment: datetime) -> None:
    assert sqlite_json.utc_text(moment) == sqlalchemy_text(moment)
    assert sqlite_json._stored_time(moment.isoformat()) == sqlalchemy_text(moment)
    iso = orjson.loads(orjson.dumps(moment))  # as a payload holds it
    assert sqlite_json._stored_time(iso) == sqlalchemy_text(datetime.fromisoformat(iso))


@pytest.mark.parametrize(
    "iso",
    [
        "2024-05-01T12:00:00+00:00",
        "2024-05-01T12:00:00.000001+00:00",
        "2024-05-01 12:00:00.123456+00:00",
        "2024-05-01T12:00:00.123+00:00",
        "2024-05-01T12:00:00.123456Z",
        "2024-05-01T12:00:00Z",
        "2024-05-01T12:00+00:00",
        "2024-05-01T12+00:00",
        "20240501T120000.123456+00:00",
        "2024-05-01T12:00:00,123456+00:00",
        "2024-05-01T12:00:00.123456789+00:00",
        "2024-05-01T12:00:00.123456-00:00",
        "2024-05-01T12:00:00.123456+00:00:00",
        "2024-05-01",
        "2024-05-01T12:00:00.123456",
        "2024-05-01T23:30:00.5-02:30",
    ],
)
def test_stored_time_of_other_iso_spellings(iso: str) -> None:
    assert sqlite_json._stored_time(iso) == sqlalchemy_text(datetime.fromisoformat(iso))


# -- the document is built a slice at a time --------------------------------------------------------


async def test_a_big_batch_document_is_built_in_slices_with_the_loop_turning_between() -> None:
    """A batch of 1,000 records once held the event loop for 12-16 ms while its document was built;
    now other tasks run between slices, and the text is the same as built in one go."""
    records = dataset(10 * insert.DOCUMENT_SLICE + 5, seed=3)
    payloads = [encode_record(r) for r in records]
    async with loop_turns() as turns:
        parts = await insert._in_slices(sqlite_json.payloads_document, payloads)
    assert len(parts) == 11
    document = insert._json_array(parts)
    assert document is not None and document == sqlite_json.payloads_document(payloads)
    assert insert._json_array(await insert._in_slices(sqlite_json.records_document, records)) == document
    assert turns.count >= 10  # one turn before each of the 10 slices after the first
    assert orjson.loads(document)[-1]["event_id"] == records[-1].event_id


async def test_a_record_the_json_path_cannot_take_in_a_late_slice_sends_the_batch_to_binding() -> None:
    records = dataset(3 * insert.DOCUMENT_SLICE, seed=4)
    records[-1] = dataclasses.replace(records[-1], prompt_tokens=BIG + 1)  # beyond 64 bits
    assert insert._json_array(await insert._in_slices(sqlite_json.records_document, records)) is None
    payloads = [encode_record(r) for r in records]
    assert insert._json_array(await insert._in_slices(sqlite_json.payloads_document, payloads)) is None
