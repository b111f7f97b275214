"""The dead-letter file: where a usage record goes when it cannot go to the database, so that it is
never lost silently (meter.pipeline.delivery, Rule 1; meter.pipeline.pump, Rule 3).

One JSON object per line, appended and fsynced before the journal checkpoint moves past the record::

    {"at": "...", "kind": "rejected", "reason": "DataError: ...", "event_id": "...", "record": {...}}
    {"at": "...", "kind": "expired", "reason": "started before the raw-event retention ...", ...}
    {"at": "...", "kind": "corrupt", "reason": "frame checksum mismatch", "journal": "...",
     "segment": 3, "offset": 1234, "length": 712, "data_base64": "..."}

``kind`` is ``rejected`` (the database refused the record's content), ``expired`` (older than the
raw-event retention, see meter.pipeline.retention Rule 2) or ``corrupt`` (bytes the journal reader skipped).
``record`` is the record's JSON exactly as journaled (meter.journal.payload), so a fixed-up line can be fed
back; a payload that is not JSON at all is kept as ``data_base64`` instead.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any

import orjson

from meter.journal.payload import json_text
from meter.journal.reader import CorruptFrame

KINDS = ("rejected", "corrupt", "expired")


def record_line(at: str, kind: str, reason: str, payload: bytes) -> bytes:
    """A line for a record (``rejected`` or ``expired``); ``payload`` as the journal holds it."""
    head: dict[str, Any] = {"at": at, "kind": kind, "reason": reason}
    document = json_text(payload)
    try:
        record = orjson.loads(document)
    except orjson.JSONDecodeError:
        try:
            record = json.loads(document)  # the standard library's encoding (big ints, NaN)
        except ValueError:
            head["data_base64"] = base64.b64encode(payload).decode()
            return orjson.dumps(head) + b"\n"
    head["event_id"] = record.get("event_id") if isinstance(record, dict) else None
    return orjson.dumps(head)[:-1] + b',"record":' + document + b"}\n"


def corrupt_line(at: str, journal: Path, frame: CorruptFrame) -> bytes:
    """A line for bytes the journal reader skipped."""
    return (
        orjson.dumps(
            {
                "at": at,
                "kind": "corrupt",
                "reason": frame.reason,
                "journal": str(journal),
                "segment": frame.segment,
                "offset": frame.offset,
                "length": frame.length,
                "data_base64": base64.b64encode(frame.data).decode(),
            }
        )
        + b"\n"
    )


def append_lines(path: Path, lines: list[bytes]) -> None:
    """Append ``lines`` in one write and fsync them. Blocking; raises ``OSError``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
    try:
        data = b"".join(lines)
        if os.write(fd, data) != len(data):
            raise OSError(f"short write to the dead-letter file {path}")
        os.fsync(fd)
    finally:
        os.close(fd)


def read_lines(path: Path) -> list[dict[str, Any]]:
    """Every line of a dead-letter file, parsed (for ``meter journal status`` and tests)."""
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]
