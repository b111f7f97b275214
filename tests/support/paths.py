"""Where things are: the repository's root and the recorded traffic in ``tests/fixtures/``, found from
this file, so that no test depends on how deep in ``tests/`` it lives."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
