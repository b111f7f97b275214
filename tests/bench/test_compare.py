"""The benchmark's pure comparison and report (:mod:`bench.compare`, :mod:`bench.report`) on small
hand-made results documents: meter against the ``--baseline`` pass-through, and the report without it.
"""

from __future__ import annotations

from typing import Any

import pytest

from bench import compare, report


def _closed(rps: float, cpu: float | None) -> dict[str, Any]:
    step: dict[str, Any] = {
        "achieved_rps": rps,
        "rps_by_round": [rps],
        "latency_ms": {"p50": 1.0, "p99": 2.0},
        "errors": {},
        "error_count": 0,
        "generator": "wrk",
        "connections": 64,
        "cpu_pct": {"simulator": 40.0, "other": 1.0},
    }
    if cpu is not None:
        step["cpu_pct"]["meter"] = cpu
        step["cpu_us_per_request"] = round(cpu / 100 / rps * 1e6, 1)  # as measured: CPU s / answered
        step["rss_mb"] = 50.0
    return step


def _target(
    name: str, kind: str, max_rps: float, max_streams: float, p50: float, ttft_p50: float, cpu: float | None
) -> dict[str, Any]:
    return {
        "name": name,
        "kind": kind,
        "server": "uvicorn",
        "client": "aiohttp",
        "quota": False,
        "latency": {"500": {"achieved_rps": 500.0, "latency_ms": {"p50": p50, "p99": p50 * 2}}},
        "stream": {"500": {"achieved_rps": 500.0, "ttft_ms": {"p50": ttft_p50, "p99": ttft_p50 * 3}}},
        "max_requests": _closed(max_rps, cpu),
        "max_streams": _closed(max_streams, cpu),
    }


def _results(passthrough_cpu: float | None = 98.0) -> dict[str, Any]:
    targets = [
        _target("direct", "direct", 10_000.0, 3_000.0, 0.5, 0.6, None),
        _target("meter[uvicorn,aiohttp]", "meter", 1_000.0, 800.0, 1.5, 1.1, 99.0),
    ]
    if passthrough_cpu is not None:
        targets.insert(1, _target("pass-through", "passthrough", 2_500.0, 1_600.0, 0.9, 0.8, passthrough_cpu))
    return {
        "meta": {
            "started_at": "2026-12-03 00:00:00Z",
            "elapsed_s": 1.0,
            "command": "python -m bench.run",
            "cpus": 2,
            "pinning": "meter on cpu 1",
            "simulator": "sim",
            "stream_chunks": 20,
            "duration_s": 3.0,
            "rounds": 3,
            "warmup_s": 0.3,
            "rates": [500],
            "stream_rates": [500],
            "connections": 64,
            "open_generator": "python",
            "closed_generator": "wrk",
            "baseline": "pass-through" if passthrough_cpu is not None else None,
        },
        "targets": targets,
    }


@pytest.mark.parametrize(
    ("meter_rps", "passthrough_rps", "expected"),
    [
        (1_000.0, 2_500.0, 600.0),  # 1,000 µs per request against 400
        (2_000.0, 2_000.0, 0.0),
        (1_010.0, 2_100.0, 513.9),  # the README's older side-by-side figures
        (None, 2_000.0, None),
        (1_000.0, None, None),
        (0.0, 2_000.0, None),
    ],
)
def test_own_cost_is_the_difference_of_cpu_time_per_request(
    meter_rps: float | None, passthrough_rps: float | None, expected: float | None
) -> None:
    assert compare.own_cost_us(meter_rps, passthrough_rps) == expected


def test_meter_versus_passthrough() -> None:
    results = compare.analyse(_results())
    (versus,) = results["baseline"]
    assert versus["target"] == "meter[uvicorn,aiohttp]"
    assert versus["base"] == "pass-through"
    assert versus["max_rps"]["requests"] == {"meter": 1_000.0, "passthrough": 2_500.0}
    assert versus["throughput_ratio"] == {"requests": 0.4, "streams": 0.5}
    assert versus["own_us_per_request"] == {"requests": 600.0, "streams": 625.0}
    # from CPU time: 990 - 392 µs per request, 1237.5 - 612.5 per stream
    assert versus["own_cpu_us_per_request"] == {"requests": 598.0, "streams": 625.0}
    assert versus["latency"]["500"] == {"added_p50_ms": 0.6, "added_p99_ms": 1.2}
    assert versus["ttft"]["500"] == {"added_p50_ms": 0.3, "added_p99_ms": 0.9}
    # the comparison with direct is unchanged by the pass-through's presence
    assert results["comparison"] == compare.analyse(_results(passthrough_cpu=None))["comparison"]
    assert not any("pass-through" in w for w in results["warnings"])


def test_without_passthrough_there_is_no_baseline() -> None:
    results = compare.analyse(_results(passthrough_cpu=None))
    assert results["baseline"] == []
    (comparison,) = results["comparison"]
    assert comparison["throughput_ratio"] == {"requests": 0.1, "streams": 0.2667}
    text = report.render(results)
    assert "METER VS PASS-THROUGH" not in text
    assert "pass-through" not in text


def test_a_passthrough_that_did_not_saturate_its_core_is_flagged() -> None:
    results = compare.analyse(_results(passthrough_cpu=60.0))
    flagged = [w for w in results["warnings"] if w.startswith("pass-through @")]
    assert len(flagged) == 2
    assert "60%" in flagged[0] and "understated" in flagged[0]


def test_report_shows_the_passthrough_and_meter_against_it() -> None:
    text = report.render(compare.analyse(_results()))
    assert "\nMETER VS PASS-THROUGH  " in text
    rows = [line.split() for line in text.splitlines() if line.startswith("  meter[uvicorn,aiohttp]")]
    assert ["meter[uvicorn,aiohttp]", "max", "req/s", "1000", "2500", "0.400", "600", "598"] in rows
    assert ["meter[uvicorn,aiohttp]", "max", "streams/s", "800", "1600", "0.500", "625", "625"] in rows
    throughput = text.split("\nTHROUGHPUT")[1].split("\nMEMORY")[0]
    assert "  pass-through " in throughput


def test_hypervisor_steal_is_shown_as_the_part_of_other_cpu_it_was() -> None:
    results = _results()
    meter = results["targets"][-1]
    meter["max_requests"]["cpu_pct"].update(other=40.0, steal=35.0)
    analysed = compare.analyse(results)
    (warning,) = [w for w in analysed["warnings"] if w.startswith("other processes")]
    assert "up to 40% of a core" in warning and "35% of it hypervisor steal" in warning
    text = report.render(analysed)
    throughput = text.split("\nTHROUGHPUT")[1].split("\nMEMORY")[0]
    (row,) = [
        line for line in throughput.splitlines() if line.startswith("  meter[uvicorn,aiohttp]      req/s")
    ]
    assert "40% (35)" in row
    direct = next(
        line for line in throughput.splitlines() if line.startswith("  direct ") and "req/s" in line
    )
    assert "1%" in direct and "(" not in direct  # no steal measured: no parentheses


def test_own_cost_by_cpu_time_survives_an_unsaturated_core() -> None:
    """Steal or a capped load leaves meter's core unsaturated: 1e6/max then overstates meter's own
    cost, while CPU time per request does not move."""
    results = _results()
    meter = results["targets"][-1]
    meter["max_requests"].update(achieved_rps=500.0, cpu_us_per_request=990.0)  # half the rate, same work
    meter["max_requests"]["cpu_pct"]["meter"] = 49.5
    (versus,) = compare.analyse(results)["baseline"]
    assert versus["own_us_per_request"]["requests"] == 1600.0
    assert versus["own_cpu_us_per_request"]["requests"] == 598.0
