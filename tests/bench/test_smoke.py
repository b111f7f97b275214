"""The benchmark runs end to end: ``python -m bench.run --quick --baseline --quota local`` (with one
``--meter-env`` setting, one ``--variant`` and one ``--quota-variant``) starts the simulator, the bare
pass-through, meter, a second meter with the variant's setting, and two meters with quota limits (the
second with the quota variant's setting) whose counters live in a Redis the bench starts itself;
drives all six, and reports every section with numbers that make sense.

Nothing here asserts a speed: timings on a shared two-core machine are for the report, not for a test.
What is asserted is what a reader of the report relies on: each section is there, every request was
answered without error (through the pass-through too, streams included), percentiles are ordered, and
meter wrote one record per request it forwarded.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from bench.report import SECTIONS
from tests.support.paths import ROOT

pytestmark = pytest.mark.slow
VARIANT = "meter[uvicorn,aiohttp]+quota[METER_QUOTA_SETTLE_LINGER=0]"
PLAIN_VARIANT = "meter[uvicorn,aiohttp][METER_WRITER_FLUSH_INTERVAL=0.02]"
COMPARED = "meter[uvicorn,aiohttp][@HEAD]"  # --compare-source HEAD


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, Any]]:
    out = tmp_path_factory.mktemp("bench") / "results.json"
    done = subprocess.run(
        [
            *(sys.executable, "-m", "bench.run", "--quick", "--baseline", "--quota", "local"),
            *("--meter-env", "METER_WRITER_BATCH_SIZE=50", "--json", str(out)),
            *("--quota-variant", "METER_QUOTA_SETTLE_LINGER=0"),
            *("--variant", "METER_WRITER_FLUSH_INTERVAL=0.02"),
            *("--compare-source", "HEAD"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert done.returncode == 0, f"bench failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout, json.loads(out.read_text())


def test_report_has_every_section(quick_run: tuple[str, dict[str, Any]]) -> None:
    text, _ = quick_run
    for section in SECTIONS:
        assert f"\n{section}  " in text, f"section {section} missing from:\n{text}"
    assert "direct" in text and "meter[uvicorn,aiohttp]" in text and "pass-through" in text
    assert "\nMETER VS PASS-THROUGH  " in text
    assert "\nQUOTA ADMISSION  " in text and "counters in a redis-server the bench started" in text
    assert "PASS" in text or "MISS" in text
    assert "\n  meter env:  METER_WRITER_BATCH_SIZE=50\n" in text
    assert "\n  variant:    a second meter with limits, with METER_QUOTA_SETTLE_LINGER=0 " in text
    assert "\n  compare:    a second meter running the source of git HEAD " in text
    assert "\n  variant:    a second meter, with METER_WRITER_FLUSH_INTERVAL=0.02 " in text


def _ordered(summary: dict[str, Any]) -> None:
    assert summary["n"] > 0
    assert 0 < summary["p50"] <= summary["p90"] <= summary["p99"] <= summary["max"] < 60_000


def test_every_target_was_measured_without_errors(quick_run: tuple[str, dict[str, Any]]) -> None:
    _, results = quick_run
    targets = {t["name"]: t for t in results["targets"]}
    assert set(targets) == {
        "direct",
        "pass-through",
        "meter[uvicorn,aiohttp]",
        "meter[uvicorn,aiohttp]+quota",
        VARIANT,
        PLAIN_VARIANT,
        COMPARED,
    }
    for target in targets.values():
        for rate, step in target["latency"].items():
            assert step["error_count"] == 0, (target["name"], rate, step["errors"])
            assert step["achieved_rps"] > 0
            _ordered(step["latency_ms"])
        for rate, step in target["stream"].items():
            assert step["error_count"] == 0, (target["name"], rate, step["errors"])
            _ordered(step["ttft_ms"])
            _ordered(step["latency_ms"])
            assert step["ttft_ms"]["p50"] <= step["latency_ms"]["p50"]  # first token before the end
        for key in ("max_requests", "max_streams"):
            assert target[key]["error_count"] == 0, (target["name"], key, target[key]["errors"])
            assert target[key]["achieved_rps"] > 0
            assert target[key]["generator"]


def test_meter_memory_and_records(quick_run: tuple[str, dict[str, Any]]) -> None:
    _, results = quick_run
    meter = next(t for t in results["targets"] if t["kind"] == "meter")
    assert 10 < meter["rss"]["serving_mb"] < 10_000
    assert meter["rss"]["idle_mb"] > 0
    # everything on: one SQLite record per request meter forwarded to the simulator (in batches of at
    # most 50, the run's --meter-env)
    assert results["meta"]["meter_env"] == {"METER_WRITER_BATCH_SIZE": "50"}
    assert meter["requests_seen"] > 0
    assert meter["records_written"] == meter["requests_seen"]
    # the variant is measured against the same meter without limits, and wrote its own database
    quota = {row["target"]: row for row in results["quota"]}
    assert set(quota) == {"meter[uvicorn,aiohttp]+quota", VARIANT}
    assert {row["base"] for row in quota.values()} == {"meter[uvicorn,aiohttp]"}
    variant = next(t for t in results["targets"] if t["name"] == VARIANT)
    assert 0 < variant["records_written"] == variant["requests_seen"]
    # the meter of another source ran (its own process, its own database) in the same rounds
    compared = next(t for t in results["targets"] if t["name"] == COMPARED)
    assert 0 < compared["records_written"] == compared["requests_seen"]
    plain = next(t for t in results["targets"] if t["name"] == PLAIN_VARIANT)
    assert 0 < plain["records_written"] == plain["requests_seen"]
    assert results["meta"]["variant"] == {"METER_WRITER_FLUSH_INTERVAL": "0.02"}


def test_passthrough_forwarded_everything(quick_run: tuple[str, dict[str, Any]]) -> None:
    _, results = quick_run
    passthrough = next(t for t in results["targets"] if t["kind"] == "passthrough")
    assert passthrough["requests_seen"] > 0
    assert 10 < passthrough["rss"]["serving_mb"] < 10_000
    assert passthrough["max_requests"]["cpu_pct"]["meter"] > 0
    assert len(results["baseline"]) == 5  # meter, its variant, the compared source, two with quotas
    for versus in results["baseline"]:
        assert versus["base"] == "pass-through"
        assert versus["throughput_ratio"]["requests"] > 0
        assert versus["own_us_per_request"]["requests"] is not None
        assert versus["own_cpu_us_per_request"]["requests"] is not None


def test_comparison_and_targets(quick_run: tuple[str, dict[str, Any]]) -> None:
    _, results = quick_run
    assert len(results["comparison"]) == 5  # meter, its variant, the compared source, two with limits
    for comparison in results["comparison"]:
        assert comparison["throughput_ratio"]["requests"] > 0
        assert comparison["throughput_ratio"]["streams"] > 0
        names = {check["name"] for check in comparison["checks"]}
        assert {
            "max non-streaming req/s",
            "max streams/s (20 chunks)",
            "peak RSS under load (VmHWM)",
        } <= names
        for check in comparison["checks"]:
            assert check["ok"] in (True, False, None)


@pytest.mark.parametrize("item", ["FOO=1", "METER_WRITER_BATCH_SIZE", "=1"])
def test_meter_env_takes_only_meter_settings(item: str, capsys: pytest.CaptureFixture[str]) -> None:
    from bench.run import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--meter-env", item])
    assert "--meter-env takes METER_NAME=VALUE" in capsys.readouterr().err
    assert parse_args(["--meter-env", "METER_WRITER_BATCH_SIZE=200"]).meter_env == {
        "METER_WRITER_BATCH_SIZE": "200"
    }


def test_a_variant_takes_meter_settings(capsys: pytest.CaptureFixture[str]) -> None:
    from bench.run import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--variant", "FLUSH=0.25"])
    assert "--variant takes METER_NAME=VALUE" in capsys.readouterr().err
    options = parse_args(["--variant", "METER_WRITER_FLUSH_INTERVAL=0.25"])
    assert options.variant == {"METER_WRITER_FLUSH_INTERVAL": "0.25"} and options.quota_variant == {}


def test_a_quota_variant_needs_quota_and_takes_meter_settings(capsys: pytest.CaptureFixture[str]) -> None:
    from bench.run import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--quota-variant", "METER_QUOTA_SETTLE_LINGER=0"])
    assert "--quota-variant needs --quota" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--quota", "local", "--quota-variant", "LINGER=0"])
    assert "--quota-variant takes METER_NAME=VALUE" in capsys.readouterr().err
    options = parse_args(["--quota", "local", "--quota-variant", "METER_QUOTA_SETTLE_LINGER=0"])
    assert options.quota_variant == {"METER_QUOTA_SETTLE_LINGER": "0"} and options.meter_env == {}
