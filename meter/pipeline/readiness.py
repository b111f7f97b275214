"""Readiness of the usage pipeline: whether this process can take traffic without losing usage
records (``/readyz``, via :meth:`~meter.pipeline.pump.Pipeline.readiness`).

Rule 1: ready while the journal can absorb a database outage: the pump runs, the journal accepts and
        fsyncs appends, and its disk has ``min_free_bytes`` free.
Rule 2: a database outage alone leaves the process ready (the reason says so, with the backlog); the
        caller may add its own database ping, as meter.app does.

Failure policy: a journal disk whose free space cannot be read counts as not ready.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def judge_readiness(status: dict[str, Any], directory: Path, *, min_free_bytes: int) -> dict[str, Any]:
    """``{"ready", "reason", "pipeline"}`` from a :meth:`~meter.pipeline.pump.Pipeline.status` snapshot
    and the free space of the journal ``directory``'s disk, which is added to ``status`` as
    ``disk_free_bytes``."""
    problems: list[str] = []
    if not status["running"]:
        problems.append("usage pipeline not running")
    if not status["journal_ok"]:
        problems.append(f"journal failing: {status['journal_error']}")
    try:
        free = free_bytes(directory)
    except OSError as exc:
        problems.append(f"journal disk unreadable: {exc}")
        free = 0
    else:
        if free < min_free_bytes:
            problems.append(f"journal disk almost full ({free} bytes free)")
    status["disk_free_bytes"] = free
    if problems:
        reason = "; ".join(problems)
    elif status["database_ok"] is False:
        reason = (
            f"database unavailable ({status['last_error']}); journal absorbing "
            f"{status['pending']} events, oldest {status['oldest_pending_age_s']}s"
        )
    else:
        reason = "ok"
    return {"ready": not problems, "reason": reason, "pipeline": status}


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged process can still write on ``path``'s filesystem."""
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize
