"""The journal's on-disk format: segment files of frames, positions, the checkpoint and lock files.
Directory layout::

    DIR/LOCK                 flock'ed while a process owns DIR (meter.journal.store); holds its owner
    DIR/checkpoint           {"segment": S, "offset": O}: everything before (S, O) is consumed
    DIR/00000001.seg ...     append-only segment files of frames
    DIR/dead-letter.jsonl    what the database refused (meter.pipeline.deadletter)

A segment file (``00000001.seg``, ...) is a sequence of frames ``[u32 length][u32 crc32][payload]``
(little endian). ``crc32`` covers the four length bytes and the payload, so a corrupt length is
caught too. The payload is a usage record's JSON (:mod:`meter.journal.payload`), so its first byte is
``{`` (or the fallback mark), which is what lets a reader find the next frame after damage
(:mod:`meter.journal.reader`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

logger = logging.getLogger(__name__)

MAX_PAYLOAD = 16 * 1024 * 1024  # a usage record is ~1 KiB; anything near this is garbage
SEGMENT_SUFFIX = ".seg"
CHECKPOINT_FILE = "checkpoint"
LOCK_FILE = "LOCK"
DEAD_LETTER_FILE = "dead-letter.jsonl"

HEADER = struct.Struct("<II")
LENGTH = struct.Struct("<I")
_SEGMENT_RE = re.compile(r"^(\d+)\.seg$")

ReadMode = Literal["records", "payloads", "count"]


def encode_frame(payload: bytes) -> bytes:
    length = LENGTH.pack(len(payload))
    return length + LENGTH.pack(zlib.crc32(payload, zlib.crc32(length))) + payload


# -- positions and what readers return --------------------------------------------------------------


@dataclass(frozen=True, slots=True, order=True)
class Position:
    """A place in a journal: byte ``offset`` of segment number ``segment``."""

    segment: int
    offset: int


def segment_name(number: int) -> str:
    return f"{number:08d}{SEGMENT_SUFFIX}"


def list_segments(directory: Path) -> list[int]:
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    return sorted(int(m.group(1)) for name in names if (m := _SEGMENT_RE.match(name)))


def read_checkpoint(directory: Path) -> Position | None:
    try:
        data = json.loads((directory / CHECKPOINT_FILE).read_text())
        return Position(int(data["segment"]), int(data["offset"]))
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as exc:
        # The file is replaced atomically, so this is damage from outside. Starting from the oldest
        # segment replays records the database already has, which idempotent writes make harmless.
        logger.error(
            "unreadable journal checkpoint in %s (%s); reading from the oldest segment", directory, exc
        )
        return None


def file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def read_lock_holder(fd: int) -> str | None:
    try:
        text = os.pread(fd, 512, 0).decode("utf-8", "replace").strip()
    except OSError:
        return None
    return text or None
