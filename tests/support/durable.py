"""The records a meter has made durable, read where they are durable: its journal's pending frames and
its SQLite database. A record is durable once appended to the journal, before the response's last byte
reaches the client, so a test that got a response finds its record here without waiting."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from meter.journal.frames import Position, list_segments, read_checkpoint
from meter.journal.reader import JournalReader
from meter.records import UsageRecord


def durable_event_ids(journal_root: Path, db_path: Path) -> list[str]:
    """Event ids of every record in the journals under ``journal_root`` or in the database, oldest
    first. The journal is read first: a record the writer moves to the database meanwhile is then
    found in one or the other."""
    ids: set[str] = set()
    for directory in sorted(p for p in journal_root.glob("w*") if p.is_dir()):
        ids.update(record.event_id for record in _pending(directory))
    if db_path.exists():
        with sqlite3.connect(db_path) as conn:
            ids.update(event_id for (event_id,) in conn.execute("SELECT event_id FROM usage_events"))
    return sorted(ids)  # event ids sort by time


def _pending(directory: Path) -> list[UsageRecord]:
    for _ in range(5):  # the writer may delete a consumed segment under the reader: read again
        segments = list_segments(directory)
        if not segments:
            return []
        start = read_checkpoint(directory) or Position(segments[0], 0)
        try:
            with JournalReader(directory, start) as reader:
                return [entry.record for entry in reader]
        except FileNotFoundError:
            continue
    raise AssertionError(f"could not read the journal in {directory}")
