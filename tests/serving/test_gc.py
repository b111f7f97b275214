"""The collector settings of meter's long-running processes (run in a child: they are process-wide)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration  # a child process per test

PROBE = """
import gc, json, sys
from meter.serving.gc import settle_collector
defaults = gc.get_threshold()
settle_collector(*([None] if sys.argv[1] == "keep" else []))
print(json.dumps({"frozen": gc.get_freeze_count(), "defaults": defaults, "now": gc.get_threshold()}))
"""


def probe(mode: str) -> dict[str, list[int] | int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    result: dict[str, list[int] | int] = json.loads(out.stdout)
    return result


def test_the_server_setting_freezes_start_up_objects_and_raises_the_thresholds() -> None:
    result = probe("server")
    assert isinstance(result["frozen"], int) and result["frozen"] > 1000  # modules, functions, ...
    assert result["now"] == [50_000, 50, 100]


def test_the_simulator_setting_freezes_but_keeps_the_interpreter_thresholds() -> None:
    result = probe("keep")
    assert isinstance(result["frozen"], int) and result["frozen"] > 1000
    assert result["now"] == result["defaults"]
