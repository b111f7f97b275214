"""Closed-loop maximum throughput with ``wrk`` (Debian package ``wrk``), when it is installed.

wrk is C with an epoll loop: one thread drives tens of thousands of requests per second, so it is
never the bottleneck for a Python server, while a Python generator sharing a core with the simulator
is. A Lua script sets the POST body and headers. wrk reads a streamed (chunked) response to its end,
so streams/s is measured the same way as requests/s. Its duration is whole seconds.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def available() -> str | None:
    """wrk's version line, or None if wrk is not installed."""
    path = shutil.which("wrk")
    if path is None:
        return None
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    first = (out.stdout or out.stderr).splitlines()
    return first[0].strip() if first else "wrk"


def lua_script(body: str, key: str) -> str:
    # A Lua long bracket needs no escaping as long as the body holds no "]==]".
    assert "]==]" not in body
    return (
        'wrk.method = "POST"\n'
        f"wrk.body = [==[{body}]==]\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
        f'wrk.headers["Authorization"] = "Bearer {key}"\n'
    )


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if not match:
        raise ValueError(f"unexpected wrk time {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse(output: str) -> dict[str, Any]:
    """Requests/s, completed requests, errors and latency percentiles from ``wrk --latency``."""
    rps = re.search(r"Requests/sec:\s+([\d.]+)", output)
    if rps is None:
        raise ValueError(f"no Requests/sec in wrk output:\n{output}")
    done = re.search(r"(\d+) requests in ([\d.]+\w+)", output)
    errors: dict[str, int] = {}
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    if non2xx:
        errors["non_2xx"] = int(non2xx.group(1))
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    if socket_errors:
        for name, value in zip(("connect", "read", "write", "timeout"), socket_errors.groups(), strict=True):
            if int(value):
                errors[f"socket_{name}"] = int(value)
    latency: dict[str, float | None] = {}
    for q in ("50", "90", "99"):
        match = re.search(rf"^\s+{q}(?:\.000)?%\s+(\S+)", output, re.MULTILINE)
        latency[f"p{q}"] = round(_ms(match.group(1)), 4) if match else None
    return {
        "achieved_rps": float(rps.group(1)),
        "ok": int(done.group(1)) - errors.get("non_2xx", 0) if done else None,
        "errors": errors,
        "error_count": sum(errors.values()),
        "latency_ms": latency,
    }


def run(
    url: str, body: str, key: str, *, connections: int, duration: float, cpus: frozenset[int] | None
) -> dict[str, Any]:
    """One closed-loop run; ``duration`` is rounded to whole seconds (at least 1)."""
    seconds = max(1, round(duration))
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(lua_script(body, key))
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", script.name, url]

    def pin() -> None:
        if cpus is not None:
            os.sched_setaffinity(0, cpus)

    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30, preexec_fn=pin)
    finally:
        Path(script.name).unlink(missing_ok=True)
    if out.returncode != 0:
        raise RuntimeError(f"wrk failed ({out.returncode}): {out.stderr or out.stdout}")
    result = parse(out.stdout)
    result.update(generator="wrk", connections=connections, duration_s=seconds)
    return result
