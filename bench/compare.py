"""What meter adds over direct, the targets (PASS/MISS), the server and client verdicts, and the
warnings about a run's quality. Pure: the results document in, dicts and strings out.

"Added" latency is the difference of percentiles at the same offered rate (meter's p99 minus direct's
p99), the usual way to compare two latency distributions measured separately. Throughput ratio is
meter's closed-loop maximum over direct's: the simulator with the same generator and connections.

With a pass-through target (``--baseline``: meter's server and client with nothing observed or
recorded, on meter's core) each meter is also compared with it. At a closed-loop maximum the proxy's
one core is saturated, so 1e6 / max req/s is the CPU time one request costs it; meter's minus the
pass-through's is the CPU meter's own work costs per request (µs), the part a change to meter can
remove. That holds only while the pass-through itself saturates its core: when the load side caps it
first, its cost per request is overstated and meter's own cost understated (a warning says so).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

# The targets, per meter process with everything on.
TARGET_REQUESTS_PER_S = 2500.0
TARGET_STREAMS_PER_S = 1700.0
TARGET_RATE = 1000  # the rate the added-latency targets are stated at
TARGET_ADDED_P50_MS = 0.7
TARGET_ADDED_P99_MS = 3.0
TARGET_ADDED_TTFT_P99_MS = 1.0
TARGET_RSS_MB = 100.0

NOISY_OTHER_CPU_PCT = 15.0  # foreign CPU use (share of one core) above which a step is flagged
SATURATED_CPU_PCT = 85.0  # the pass-through's core below this at a maximum: the load side capped it
BEHIND_LAG_MS = 10.0  # generator lateness (p99) above which an open-loop step is flagged


def get(d: dict[str, Any] | None, *path: str) -> Any:
    for key in path:
        if not isinstance(d, dict):
            return None
        d = d.get(key)
    return d


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(a - b, 4)


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else round(a / b, 4)


def _check(
    name: str,
    value: float | None,
    limit: float,
    *,
    at_least: bool,
    unit: str,
    errors: int = 0,
    note: str = "",
) -> dict[str, Any]:
    if value is None:
        ok: bool | None = None
    else:
        ok = (value >= limit if at_least else value <= limit) and errors == 0
    if errors:
        note = f"{errors} errors; {note}".rstrip("; ")
    return {
        "name": name,
        "value": value,
        "target": f"{'>=' if at_least else '<='} {limit:g} {unit}",
        "ok": ok,
        "note": note,
    }


def _added(base: dict[str, Any], meter: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Added latency and added TTFT of ``meter`` over ``base``, per offered rate."""
    latency = {
        rate: {
            f"added_{q}_ms": _diff(get(step, "latency_ms", q), get(base, "latency", rate, "latency_ms", q))
            for q in ("p50", "p99")
        }
        for rate, step in meter.get("latency", {}).items()
    }
    ttft = {
        rate: {
            f"added_{q}_ms": _diff(get(step, "ttft_ms", q), get(base, "stream", rate, "ttft_ms", q))
            for q in ("p50", "p99")
        }
        for rate, step in meter.get("stream", {}).items()
    }
    return latency, ttft


MAXIMA = {"requests": "max_requests", "streams": "max_streams"}


def _max_ratio(base: dict[str, Any], meter: dict[str, Any]) -> dict[str, float | None]:
    """Closed-loop maximum of ``meter`` over ``base``'s, for requests and streams."""
    return {
        what: _ratio(get(meter, key, "achieved_rps"), get(base, key, "achieved_rps"))
        for what, key in MAXIMA.items()
    }


def own_cost_us(meter_rps: float | None, passthrough_rps: float | None) -> float | None:
    """CPU µs per request that meter spends beyond the pass-through, from the two closed-loop maxima on
    the same saturated core: ``1e6 / meter_rps - 1e6 / passthrough_rps``."""
    if not meter_rps or not passthrough_rps:
        return None
    return round(1e6 / meter_rps - 1e6 / passthrough_rps, 1)


def _difference(minuend: float | None, subtrahend: float | None) -> float | None:
    return None if minuend is None or subtrahend is None else round(minuend - subtrahend, 1)


def versus_passthrough(passthrough: dict[str, Any], meter: dict[str, Any]) -> dict[str, Any]:
    """``meter`` against the bare pass-through: throughput ratio, meter's own CPU per request (µs),
    and the latency it adds over the pass-through at the same offered load."""
    latency, ttft = _added(passthrough, meter)
    return {
        "target": meter["name"],
        "base": passthrough["name"],
        "max_rps": {
            what: {
                "meter": get(meter, key, "achieved_rps"),
                "passthrough": get(passthrough, key, "achieved_rps"),
            }
            for what, key in MAXIMA.items()
        },
        "throughput_ratio": _max_ratio(passthrough, meter),
        "own_us_per_request": {
            what: own_cost_us(get(meter, key, "achieved_rps"), get(passthrough, key, "achieved_rps"))
            for what, key in MAXIMA.items()
        },
        "own_cpu_us_per_request": {
            what: _difference(
                get(meter, key, "cpu_us_per_request"), get(passthrough, key, "cpu_us_per_request")
            )
            for what, key in MAXIMA.items()
        },
        "latency": latency,
        "ttft": ttft,
    }


def compare(direct: dict[str, Any], meter: dict[str, Any]) -> dict[str, Any]:
    """What ``meter`` (one target's results) adds over ``direct``, and its target checks."""
    latency, ttft = _added(direct, meter)
    ratio = _max_ratio(direct, meter)

    checks = []
    for key, limit, label in (
        ("max_requests", TARGET_REQUESTS_PER_S, "max non-streaming req/s"),
        ("max_streams", TARGET_STREAMS_PER_S, "max streams/s (20 chunks)"),
    ):
        direct_max = get(direct, key, "achieved_rps")
        note = ""
        if direct_max is not None and direct_max < limit:
            note = f"direct itself reached only {direct_max:.0f}/s here: the setup cannot show the target"
        checks.append(
            _check(
                label,
                get(meter, key, "achieved_rps"),
                limit,
                at_least=True,
                unit="/s",
                errors=get(meter, key, "error_count") or 0,
                note=note,
            )
        )
    rate = str(TARGET_RATE)
    step_errors = get(meter, "latency", rate, "error_count") or 0
    checks.append(
        _check(
            f"added p50 @ {TARGET_RATE} req/s",
            get(latency, rate, "added_p50_ms"),
            TARGET_ADDED_P50_MS,
            at_least=False,
            unit="ms",
            errors=step_errors,
            note="" if rate in latency else f"rate {TARGET_RATE} not measured (--rates)",
        )
    )
    checks.append(
        _check(
            f"added p99 @ {TARGET_RATE} req/s",
            get(latency, rate, "added_p99_ms"),
            TARGET_ADDED_P99_MS,
            at_least=False,
            unit="ms",
            errors=step_errors,
            note="" if rate in latency else f"rate {TARGET_RATE} not measured (--rates)",
        )
    )
    for stream_rate, added in ttft.items():
        checks.append(
            _check(
                f"added TTFT p99 @ {stream_rate} streams/s",
                added["added_p99_ms"],
                TARGET_ADDED_TTFT_P99_MS,
                at_least=False,
                unit="ms",
                errors=get(meter, "stream", stream_rate, "error_count") or 0,
            )
        )
    rss = meter.get("rss") or {}
    rss_note = f"peak during {rss['peak_step']}" if rss.get("peak_step") else ""
    if rss.get("closed_loop_mb") is not None:
        rss_note += (
            f"; {rss['closed_loop_mb']:.0f} MB at max throughput; {rss.get('idle_mb') or 0:.0f} MB idle"
        )
    checks.append(
        _check(
            "peak RSS under load (VmHWM)",
            rss.get("serving_mb"),
            TARGET_RSS_MB,
            at_least=False,
            unit="MB",
            note=rss_note,
        )
    )
    return {
        "target": meter["name"],
        "latency": latency,
        "ttft": ttft,
        "throughput_ratio": ratio,
        "checks": checks,
    }


def _geomean(values: Iterable[float]) -> float | None:
    values = [v for v in values if v and v > 0]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def choose(meters: Sequence[dict[str, Any]], axis: str, fixed: str) -> list[dict[str, Any]]:
    """Head-to-head of targets that differ only in ``axis`` ("server" or "client"), per value of
    ``fixed``. The winner has the higher geometric mean of max req/s and max streams/s."""
    verdicts = []
    groups: dict[str, list[dict[str, Any]]] = {}
    for m in meters:
        groups.setdefault(m[fixed], []).append(m)
    for fixed_value, group in groups.items():
        if len(group) < 2:
            continue
        scored = []
        for m in group:
            req, streams = get(m, "max_requests", "achieved_rps"), get(m, "max_streams", "achieved_rps")
            scored.append((_geomean([req or 0, streams or 0]) or 0.0, m[axis], req, streams, m))
        scored.sort(key=lambda s: s[0], reverse=True)
        best, runner_up = scored[0], scored[1]
        verdicts.append(
            {
                "axis": axis,
                fixed: fixed_value,
                "winner": best[1],
                "runner_up": runner_up[1],
                "margin_pct": round((best[0] / runner_up[0] - 1) * 100, 1) if runner_up[0] else None,
                "candidates": [
                    {
                        axis: name,
                        "max_rps": req,
                        "max_streams_per_s": streams,
                        "p50_ms": {r: get(s, "latency_ms", "p50") for r, s in m.get("latency", {}).items()},
                        "p99_ms": {r: get(s, "latency_ms", "p99") for r, s in m.get("latency", {}).items()},
                        "ttft_p99_ms": {r: get(s, "ttft_ms", "p99") for r, s in m.get("stream", {}).items()},
                        "rss_mb": get(m, "rss", "serving_mb"),
                    }
                    for _, name, req, streams, m in scored
                ],
            }
        )
    return verdicts


def analyse(results: dict[str, Any]) -> dict[str, Any]:
    targets = results["targets"]
    direct = next(t for t in targets if t["kind"] == "direct")
    meters = [t for t in targets if t["kind"] == "meter"]
    results["comparison"] = [compare(direct, m) for m in meters]
    passthrough = next((t for t in targets if t["kind"] == "passthrough"), None)
    results["baseline"] = [versus_passthrough(passthrough, m) for m in meters] if passthrough else []
    plain = [m for m in meters if not m.get("quota") and not m.get("variant")]  # on meter's defaults
    results["servers"] = choose(plain, "server", "client")
    results["clients"] = choose(plain, "client", "server")
    results["quota"] = [
        {**compare(base, m), "base": base["name"]}
        for m in meters
        if m.get("quota")
        for base in plain
        if (base["server"], base["client"]) == (m["server"], m["client"])
    ]
    results["warnings"] = warnings(results)
    return results


def steps(target: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    steps = [(f"{rate} req/s", step) for rate, step in (target.get("latency") or {}).items()]
    steps += [(f"{rate} streams/s", step) for rate, step in (target.get("stream") or {}).items()]
    steps += [
        (label, target[key])
        for key, label in (("max_requests", "max req/s"), ("max_streams", "max streams/s"))
        if target.get(key)
    ]
    return steps


def warnings(results: dict[str, Any]) -> list[str]:
    """What makes some numbers of this run less trustworthy: other load, a generator that fell behind."""
    out = []
    busiest = max(
        (
            (get(step, "cpu_pct", "other") or 0.0, t["name"], label, get(step, "cpu_pct", "steal") or 0.0)
            for t in results["targets"]
            for label, step in steps(t)
        ),
        default=(0.0, "", "", 0.0),
    )
    if busiest[0] > NOISY_OTHER_CPU_PCT:
        steal = f", {busiest[3]:.0f}% of it hypervisor steal" if busiest[3] else ""
        out.append(
            f"other processes on this machine used up to {busiest[0]:.0f}% of a core during a step "
            f"({busiest[1]}, {busiest[2]}; column 'other cpu'{steal}): such rows are noisy; "
            "rerun on a quiet machine"
        )
    for t in results["targets"]:
        if t["kind"] != "passthrough":
            continue
        for key, label in (("max_requests", "max req/s"), ("max_streams", "max streams/s")):
            cpu = get(t, key, "cpu_pct", "meter")
            if cpu is not None and cpu < SATURATED_CPU_PCT:
                out.append(
                    f"{t['name']} @ {label}: it used {cpu:.0f}% of its core, so the load side capped it: "
                    "its maximum, and meter's own cost per request derived from it, are understated"
                )
    for t in results["targets"]:
        if t["kind"] != "direct":  # behind meter the lag also grows when meter is overloaded: no warning
            continue
        for label, step in steps(t):
            lag = get(step, "lag_ms", "p99")
            if not label.startswith("max") and lag is not None and lag > BEHIND_LAG_MS:
                out.append(
                    f"direct @ {label}: the load side (generator + simulator core) fell behind its schedule "
                    f"(lag p99 {lag:.0f} ms): this rate is beyond what this machine can offer cleanly"
                )
    return out
