"""The JSON form of a usage record: the journal's frame payload, what the PostgreSQL writer sends
as is, and the ``record`` of a dead-letter line.

Invariants:

Rule 1: a payload is ``orjson.dumps(record)``: one JSON object whose keys are the
        :class:`~meter.records.UsageRecord` field names; datetimes are ISO 8601 (with their offset,
        or none for a naive one), enums their value, Decimals exact strings, and non-finite floats
        ``null``.
Rule 2: a record orjson cannot encode (an int beyond 64 bits, a string with a lone surrogate, a
        foreign type) is encoded by the standard library instead and marked by a leading
        ``b"\\x01"``; nothing is refused for its content here, the database decides.
Rule 3: :func:`decode_record` inverts :func:`encode_record` for every value the record can hold,
        except non-finite floats in an orjson payload (``null``, as Rule 1 says). Keys a newer meter
        wrote are ignored; enum values this version does not know stay plain strings.
Rule 4: :func:`storable_payload` returns a payload PostgreSQL can ingest with the same adjustments
        :func:`meter.db.models.make_storable` makes for other backends (NUL characters become
        U+FFFD, non-finite numbers null); the common case returns the payload unchanged.

Pure: no I/O.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import MISSING, fields
from datetime import datetime
from decimal import Decimal
from typing import Any

import orjson

from meter.records import Outcome, UsageRecord, UsageSource

FALLBACK_MARK = b"\x01"
RECORD_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(UsageRecord))
_FIELD_SET = frozenset(RECORD_FIELDS)
_REQUIRED = frozenset(
    f.name for f in fields(UsageRecord) if f.default is MISSING and f.default_factory is MISSING
)
_DEFAULTS: dict[str, Any] = {f.name: f.default for f in fields(UsageRecord) if f.default is not MISSING}
_DECIMAL_FIELDS = tuple(f.name for f in fields(UsageRecord) if "Decimal" in str(f.type))  # as strings
_STARTED_AT = b'"started_at":"'
_ESCAPED_NUL = b"\\u0000"


def encode_record(record: UsageRecord) -> bytes:
    """The payload for ``record`` (Rules 1-2)."""
    try:
        return orjson.dumps(record, default=_orjson_default)
    except TypeError:
        values = {name: getattr(record, name) for name in RECORD_FIELDS}
        return FALLBACK_MARK + _stdlib_dumps(values)


def _stdlib_dumps(values: dict[str, Any]) -> bytes:
    return json.dumps(values, default=_json_default, ensure_ascii=True, separators=(",", ":")).encode()


def _orjson_default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return str(value)  # exact; money is never a float (STYLE 7)
    raise TypeError


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)  # a foreign type: keep what it says; the database will judge it


def json_text(payload: bytes) -> bytes:
    """The JSON document of a payload (without the fallback mark)."""
    return payload[1:] if payload[:1] == FALLBACK_MARK else payload


def decode_row(payload: bytes) -> dict[str, Any]:
    """The payload's fields as a dict with every record field (defaults filled in) and
    ``started_at`` as a datetime; enums stay strings. Raises ``ValueError`` if it is not a record."""
    if payload[:1] == b"{":
        data = orjson.loads(payload)
    elif payload[:1] == FALLBACK_MARK:
        data = json.loads(payload[1:])
    else:
        raise ValueError(f"payload starts with {payload[:1]!r}, not a JSON object")
    if not isinstance(data, dict):
        raise ValueError("payload is not a JSON object")
    if data.keys() != _FIELD_SET:
        missing = _REQUIRED - data.keys()
        if missing:
            raise ValueError(f"payload lacks {', '.join(sorted(missing))}")
        data = {name: data[name] if name in data else _default(name) for name in RECORD_FIELDS}
    started_at = data["started_at"]
    if not isinstance(started_at, str):
        raise ValueError("started_at is not a string")
    data["started_at"] = datetime.fromisoformat(started_at)
    if data["upstream_metrics"] is None:
        data["upstream_metrics"] = {}
    return data


def _default(name: str) -> Any:
    return {} if name == "upstream_metrics" else _DEFAULTS[name]


def decode_record(payload: bytes) -> UsageRecord:
    """The :class:`UsageRecord` in ``payload`` (Rule 3). Raises ``ValueError`` if it is not one."""
    values = decode_row(payload)
    with contextlib.suppress(ValueError):
        values["outcome"] = Outcome(values["outcome"])
    with contextlib.suppress(ValueError):
        values["usage_source"] = UsageSource(values["usage_source"])
    for name in _DECIMAL_FIELDS:
        if isinstance(values[name], str):
            values[name] = Decimal(values[name])
    try:
        return UsageRecord(**values)
    except TypeError as exc:  # pragma: no cover - decode_row guarantees the keys
        raise ValueError(f"payload is not a usage record: {exc}") from None


def payload_started_at(payload: bytes) -> datetime:
    """``started_at`` of a payload without decoding all of it. Raises ``ValueError``."""
    start = payload.find(_STARTED_AT)
    if start != -1:
        start += len(_STARTED_AT)
        end = payload.find(b'"', start)
        if end != -1:
            return datetime.fromisoformat(payload[start:end].decode())
    started_at: datetime = decode_row(payload)["started_at"]
    return started_at


def storable_payload(payload: bytes) -> bytes:
    """``payload`` as PostgreSQL can store it (Rule 4). Raises ``ValueError`` for a payload that is
    not a record (the caller treats it as a record the database refuses)."""
    if payload[:1] == b"{" and _ESCAPED_NUL not in payload:
        return payload  # orjson already wrote NaN and infinities as null
    row = decode_row(payload)
    for name, value in row.items():
        if isinstance(value, str) and "\x00" in value:
            row[name] = value.replace("\x00", "\ufffd")
        elif isinstance(value, float) and not math.isfinite(value):
            row[name] = None
    row["started_at"] = row["started_at"].isoformat()
    metrics = row["upstream_metrics"]
    if isinstance(metrics, dict):
        row["upstream_metrics"] = {
            str(k): (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()
        }
    try:
        return orjson.dumps(row)
    except TypeError:
        return _stdlib_dumps(row)  # a big int or a lone surrogate: PostgreSQL will refuse it, rightly
