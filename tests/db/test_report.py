"""meter.db.report.render: table, csv and json output as a user reads or parses it."""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest

from meter.db.report import render

ROWS: list[dict[str, Any]] = [
    {"team": "search", "requests": 1200, "prompt_tokens": 35, "duration_ms": 12.5},
    {"team": "ads, west", "requests": 3, "prompt_tokens": None, "duration_ms": None},
]


def test_table_aligns_columns_and_shows_not_reported_as_a_dash() -> None:
    assert render(ROWS, "table") == (
        "team       requests  prompt_tokens  duration_ms\n"
        "---------  --------  -------------  -----------\n"
        "search         1200             35        12.50\n"
        "ads, west         3              -            -\n"
    )


def test_table_lines_up_sparse_rows_and_formats_other_values() -> None:
    rows: list[dict[str, Any]] = [
        {"day": "2024-05-01", "stream": True},
        {"day": "2024-05-02", "at": datetime(2024, 5, 2, tzinfo=UTC), "metrics": {"b": 1, "a": 2}},
    ]
    lines = render(rows, "table").splitlines()
    assert lines[0].split() == ["day", "stream", "at", "metrics"]
    assert lines[2].split() == ["2024-05-01", "yes", "-", "-"]
    assert "2024-05-02T00:00:00+00:00" in lines[3] and '{"a": 2, "b": 1}' in lines[3]
    assert lines[0].index(" at ") + 1 == lines[3].index("2024-05-02T")  # columns start together


def test_table_of_nothing_says_so() -> None:
    assert render([], "table") == "(no rows)\n"


def test_csv_parses_back_with_empty_fields_for_not_reported() -> None:
    text = render(ROWS, "csv")
    parsed = list(csv.reader(io.StringIO(text)))
    assert parsed == [
        ["team", "requests", "prompt_tokens", "duration_ms"],
        ["search", "1200", "35", "12.5"],
        ["ads, west", "3", "", ""],
    ]
    assert render([], "csv") == ""


def test_json_round_trips_with_null_for_not_reported() -> None:
    assert json.loads(render(ROWS, "json")) == ROWS
    rows = [{"at": datetime(2024, 5, 1, tzinfo=UTC), "cost": Decimal("0.10")}]
    assert json.loads(render(rows, "json")) == [{"at": "2024-05-01T00:00:00+00:00", "cost": "0.10"}]
    assert json.loads(render([], "json")) == []


def test_unknown_format_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="'xml'"):
        render(ROWS, "xml")
