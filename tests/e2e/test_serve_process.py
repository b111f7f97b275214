"""The serving process itself: what `meter serve` loads."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import httpx

from tests.support.processes import free_port, meter_process


def test_the_serving_process_does_not_load_pydantic(tmp_path: Path) -> None:
    """litestar adds its pydantic plugins whenever pydantic is importable (here it is: the openai SDK
    brings it); meter keeps them out of its serving process (~8 MB each) and still serves."""
    assert importlib.util.find_spec("pydantic") is not None  # otherwise this test proves nothing
    upstream = f"http://127.0.0.1:{free_port()}"  # nothing listens: the proxy answers 502
    with meter_process(tmp_path, upstream, f"sqlite:///{tmp_path / 'meter.db'}") as meter:
        maps = Path(f"/proc/{meter.proc.pid}/maps").read_text()
        assert "pydantic_core" not in maps
        assert httpx.get(f"{meter.url}/readyz", timeout=10).status_code == 200
        response = httpx.post(f"{meter.url}/v1/chat/completions", json={"model": "m"}, timeout=10)
        assert response.status_code == 502 and response.json()["error"]["code"]
        assert "pydantic_core" not in Path(f"/proc/{meter.proc.pid}/maps").read_text()
