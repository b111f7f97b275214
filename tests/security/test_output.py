"""Values a client chose (a model name, a team name) cannot break a row of a CLI table, drive the
terminal, or run as a spreadsheet formula in a CSV export."""

from __future__ import annotations

import asyncio
import csv
import io
from decimal import Decimal
from pathlib import Path

import pytest
from click.testing import CliRunner

from meter.cli.main import main
from meter.db.insert import write_batch
from meter.db.report import render
from tests.conftest_db import make_record, migrated_engine

FORMULA = '=HYPERLINK("http://x","y")'
# A model name that would start a forged record, colour the terminal and reorder what it shows.
FORGED = (
    "m\n2026-01-01 00:00:00,000 INFO meter.requests: 200 POST /forged"
    "\r\x1b[31mred\x1b]0;title\x07\x85\u2028\u202e"
)


# -- CLI tables and CSV ---------------------------------------------------------------------------


MODELS = [FORMULA, "+1+2", "-2+3", "@SUM(A1:A2)", "\tx", "\rx", FORGED, "plain-model"]


@pytest.fixture
def database(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'meter.db'}"

    async def fill() -> None:
        async with migrated_engine(url) as engine:
            records = [
                make_record(requested_model=model, team=model, prompt_tokens=3, completion_tokens=1)
                for model in MODELS
            ]
            await write_batch(engine, records)

    asyncio.run(fill())
    return url


def _cli(*args: str) -> str:
    result = CliRunner().invoke(main, list(args), env={"METER_DATABASE_URL": None})
    assert result.exit_code == 0, (result.output, result.exception)
    return result.output


def test_usage_csv_neutralises_formulas_and_parses_back(database: str) -> None:
    text = _cli("usage", "--database", database, "--group-by", "model", "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(text)))
    models = {row["requested_model"] for row in rows}
    neutralised = {"'" + FORMULA, "'+1+2", "'-2+3", "'@SUM(A1:A2)", "'\tx", "'\rx"}
    assert len(rows) == len(MODELS) and models >= neutralised | {"plain-model"}
    # (click drops CSI colour codes from what it echoes to a pipe; the rest of FORGED is kept.)
    assert any(model.startswith("m\n2026-01-01") for model in models)
    assert all(row["requests"] == "1" and row["prompt_tokens"] == "3" for row in rows)


def test_billing_csv_neutralises_formulas(database: str) -> None:
    text = _cli("billing", "report", "--database", database, "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(text)))
    assert {row["model"] for row in rows} >= {"'" + FORMULA, "'@SUM(A1:A2)"}
    assert {row["team"] for row in rows} >= {"'" + FORMULA, "'-2+3"}
    assert all(Decimal(row["cost_usd"]) == 0 and row["requests"] == "1" for row in rows)


def test_numbers_meter_writes_stay_numbers() -> None:
    rows = [
        {"model": "-1+1", "delta_usd": Decimal("-1.5"), "delta_text": "-0.25", "count": -3, "ratio": -0.5}
    ]
    (row,) = csv.DictReader(io.StringIO(render(rows, "csv")))
    assert row == {
        "model": "'-1+1",
        "delta_usd": "-1.5",
        "delta_text": "-0.25",
        "count": "-3",
        "ratio": "-0.5",
    }


def test_usage_table_keeps_one_line_per_row(database: str) -> None:
    text = _cli("usage", "--database", database, "--group-by", "model")
    lines = text.removesuffix("\n").split("\n")
    assert len(lines) == 2 + len(MODELS)  # header, rule, one line per model
    assert len(text.splitlines()) == len(lines) and "\x1b" not in text and "\u202e" not in text
    assert any(line.startswith("m\\n2026-01-01 00:00:00,000 INFO") for line in lines)
    assert any(line.startswith(FORMULA) for line in lines)  # a table is not a spreadsheet


def test_audit_and_key_tables_keep_one_line_per_row(tmp_path: Path) -> None:
    database = f"sqlite:///{tmp_path / 'meter.db'}"
    _cli("team", "create", "search", "--description", "line one\nline two\x1b[2J", "--database", database)
    for command in (["team", "list"], ["audit"]):
        text = _cli(*command, "--database", database)
        assert len(text.splitlines()) == 3, text  # header, rule, one row
        assert "line one\\nline two\\x1b[2J" in text or command == ["audit"]
        assert "\x1b" not in text
