"""Rendering of report rows (lists of flat dicts from :mod:`meter.db.queries`) as text.

Pure: no I/O, no database. Formats:

* ``table``: aligned plain text with a header row; numbers right-aligned, text left-aligned,
  ``None`` shown as ``-`` (not reported) so it cannot be mistaken for 0. Control characters in a
  cell are escaped (:func:`meter.printable.escape_controls`): a row is one line whatever a model
  name holds.
* ``csv``: RFC 4180 via :mod:`csv` (CRLF line ends), header row first, ``None`` as an empty field.
  A text cell a spreadsheet would run as a formula gets a leading ``'``
  (:func:`meter.printable.csv_text_cell`); numbers, booleans and dates are written as they are.
* ``json``: a JSON array of objects, ``None`` as ``null``; datetimes, dates and Decimals as strings.

Columns are the union of the rows' keys in first-seen order, so sparse rows still line up.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from datetime import date, datetime
from decimal import Decimal
from typing import Any

from meter.printable import csv_text_cell, escape_controls

FORMATS: tuple[str, ...] = ("table", "csv", "json")
NOT_REPORTED = "-"


def render(rows: list[dict[str, Any]], fmt: str) -> str:
    """``rows`` as text in ``fmt`` (one of :data:`FORMATS`)."""
    renderers: dict[str, Callable[[list[dict[str, Any]]], str]] = {
        "table": _table,
        "csv": _csv,
        "json": _json,
    }
    try:
        renderer = renderers[fmt]
    except KeyError:
        raise ValueError(f"unknown report format {fmt!r}; choose from {list(FORMATS)}") from None
    return renderer(rows)


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(key for row in rows for key in row))


def _cell(value: Any) -> str:
    if value is None:
        return NOT_REPORTED
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.2f}"
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, dict | list):
        return json.dumps(value, sort_keys=True, default=_json_default)
    return escape_controls(str(value))


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float | Decimal) and not isinstance(value, bool)


def _table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(no rows)\n"
    columns = _columns(rows)
    cells = [[_cell(row.get(column)) for column in columns] for row in rows]
    widths = [max(len(column), *(len(line[i]) for line in cells)) for i, column in enumerate(columns)]
    numeric = [
        any(_is_number(row.get(c)) for row in rows)
        and all(_is_number(row.get(c)) or row.get(c) is None for row in rows)
        for c in columns
    ]

    def line(values: list[str]) -> str:
        parts = [
            value.rjust(width) if right else value.ljust(width)
            for value, width, right in zip(values, widths, numeric, strict=True)
        ]
        return "  ".join(parts).rstrip()

    header = line(columns)
    rule = "  ".join("-" * width for width in widths)
    return "\n".join([header, rule, *(line(values) for values in cells)]) + "\n"


def _csv(rows: list[dict[str, Any]]) -> str:
    columns = _columns(rows)
    buffer = io.StringIO()
    # CRLF, as RFC 4180 says: the writer then also quotes a cell holding a lone "\r", which with "\n"
    # line ends it would leave bare, ending the row there for any reader.
    writer = csv.writer(buffer, lineterminator="\r\n")
    if columns:
        writer.writerow(columns)
    for row in rows:
        writer.writerow(["" if row.get(c) is None else _csv_cell(row.get(c)) for c in columns])
    return buffer.getvalue()


def _csv_cell(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict | list):
        return json.dumps(value, sort_keys=True, default=_json_default)  # starts with { or [
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, int | float | Decimal):
        return str(value)
    return csv_text_cell(str(value))


def _json(rows: list[dict[str, Any]]) -> str:
    return json.dumps(rows, indent=2, default=_json_default) + "\n"


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")
