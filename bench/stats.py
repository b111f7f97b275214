"""Percentiles and the merging of rounds. Pure: lists and dicts in, dicts out.

A step runs in rounds that alternate between targets (rule 2 of :mod:`bench`). Open-loop rounds are
merged by pooling their raw samples, so the percentiles are those of the whole step; closed-loop rounds
each give one throughput, and the step reports their median with the spread.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Sequence
from typing import Any

PERCENTILES = (50, 90, 99, 99.9)


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile of an ascending sequence (None when empty)."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def summarize(values: Sequence[float]) -> dict[str, float | int | None]:
    """Count, percentiles, mean and max of ``values`` (kept in their unit)."""
    ordered = sorted(values)
    out: dict[str, float | int | None] = {"n": len(ordered)}
    for q in PERCENTILES:
        p = percentile(ordered, q)
        out[f"p{q:g}"] = None if p is None else round(p, 4)
    out["mean"] = round(sum(ordered) / len(ordered), 4) if ordered else None
    out["max"] = round(ordered[-1], 4) if ordered else None
    return out


def _errors(rounds: Sequence[dict[str, Any]]) -> Counter[str]:
    errors: Counter[str] = Counter()
    for r in rounds:
        errors.update(r.get("errors") or {})
        if r.get("failed"):
            errors["generator_failed"] += 1
    return errors


def merge_open(rounds: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One open-loop step from its rounds (each carrying raw ``samples``, milliseconds)."""
    pooled: dict[str, list[float]] = {"latency": [], "ttft": [], "lag": []}
    completed = 0
    window = 0.0
    for r in rounds:
        for key, values in (r.get("samples") or {}).items():
            pooled[key].extend(values)
        completed += r.get("completed_in_window", 0)
        window += r.get("window_s", 0.0)
    errors = _errors(rounds)
    return {
        "rounds": len(rounds),
        "sent": sum(r.get("sent", 0) for r in rounds),
        "ok": len(pooled["latency"]),
        "errors": dict(errors),
        "error_count": sum(errors.values()),
        "achieved_rps": round(completed / window, 2) if window else None,
        "latency_ms": summarize(pooled["latency"]),
        "ttft_ms": summarize(pooled["ttft"]) if pooled["ttft"] else None,
        "lag_ms": summarize(pooled["lag"]) if pooled["lag"] else None,
        "generator": rounds[0].get("generator") if rounds else None,
        "by_round": [_round_summary(r) for r in rounds],
        "error_samples": {k: v for r in rounds for k, v in (r.get("error_samples") or {}).items()},
    }


def _round_summary(r: dict[str, Any]) -> dict[str, Any]:
    """A round at a glance (kept in the JSON to diagnose a noisy step)."""
    return {
        "achieved_rps": r.get("achieved_rps"),
        "p50_ms": (r.get("latency_ms") or {}).get("p50"),
        "p99_ms": (r.get("latency_ms") or {}).get("p99"),
        "lag_p99_ms": (r.get("lag_ms") or {}).get("p99"),
        "errors": r.get("errors") or {},
    }


def merge_closed(rounds: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One closed-loop step: the median round's throughput, with min and max."""
    rates = [r["achieved_rps"] for r in rounds if r.get("achieved_rps") is not None]
    errors = _errors(rounds)

    def median_of(key: str) -> float | None:
        values = [v for r in rounds if (v := (r.get("latency_ms") or {}).get(key)) is not None]
        return round(statistics.median(values), 4) if values else None

    return {
        "rounds": len(rounds),
        "achieved_rps": round(statistics.median(rates), 1) if rates else None,
        "rps_by_round": [round(r, 1) for r in rates],
        "ok": sum(r.get("ok") or 0 for r in rounds),
        "errors": dict(errors),
        "error_count": sum(errors.values()),
        "latency_ms": {"p50": median_of("p50"), "p99": median_of("p99")},
        "generator": rounds[0].get("generator") if rounds else None,
        "connections": rounds[0].get("connections") if rounds else None,
    }
