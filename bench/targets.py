"""The benchmark's targets: the simulator (``direct``), each ``meter serve`` process, and with
``--baseline`` the bare pass-through (:mod:`bench.passthrough`); what the bench reads from a running
meter (writer backlog) and from a stopped one (records in its SQLite file).

Every meter gets its own port and SQLite file, ``METER_KEY_SECRET`` and ``METER_UPSTREAM_CLIENT`` in its
environment and no other ``METER_*`` variable (an unknown one would stop it at start-up).
"""

from __future__ import annotations

import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import procs

REPO = Path(__file__).resolve().parent.parent  # where ``python -m bench.passthrough`` is found


@dataclass
class Target:
    name: str
    kind: str  # "direct", "meter" or "passthrough"
    url: str
    server: str | None = None
    client: str | None = None
    process: procs.Process | None = None
    db_path: Path | None = None
    results: dict[str, Any] = field(default_factory=dict)
    sim_requests: int = 0
    quota: bool = False  # limits on the bench key, counters in Redis (the admission benchmark)
    variant: str = ""  # the settings of a --variant or --quota-variant meter, as text


def _meter_env(client: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("METER_")}
    env["METER_KEY_SECRET"] = "bench-secret-" + "0" * 32
    env["METER_UPSTREAM_CLIENT"] = client
    env["METER_LOG_LEVEL"] = "warning"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _meter_command(*names: str) -> list[str]:
    return [sys.executable, "-m", "meter", *names]


def start_simulator(workdir: Path, pinning: procs.Pinning) -> tuple[procs.Process, str]:
    port = procs.free_port()
    process = procs.start(
        "simulator", _meter_command("simulate", "--port", str(port)), workdir, cpus=pinning.load
    )
    url = f"http://127.0.0.1:{port}"
    procs.wait_http(f"{url}/_sim/stats", process)
    return process, url


ADMIN_TOKEN = "bench-admin-token-" + "0" * 16


def start_meter(
    workdir: Path,
    pinning: procs.Pinning,
    sim_url: str,
    server: str,
    client: str,
    *,
    redis_url: str | None = None,
    meter_env: dict[str, str] | None = None,
    variant: dict[str, str] | None = None,
    source: tuple[str, Path] | None = None,
) -> Target:
    """``redis_url``: the quota target: counters in that Redis, limits set by :func:`set_limits`.
    ``meter_env``: ``METER_*`` settings of the run's ``--meter-env`` (every meter gets them);
    ``variant``: a ``--variant``'s or ``--quota-variant``'s settings, on top, which name the target;
    ``source``: ``(git ref, directory)`` of another version of meter (:func:`export_source`) to run
    instead of this checkout's, which names the target too."""
    label = ",".join(f"{k}={v}" for k, v in (variant or {}).items())
    if source is not None:
        label = f"@{source[0]}"
    name = f"meter[{server},{client}]" + ("+quota" if redis_url else "") + (f"[{label}]" if label else "")
    port = procs.free_port()
    slug = "".join(c if c.isalnum() else "-" for c in label)
    db_path = (
        workdir / f"bench-{server}-{client}{'-quota' if redis_url else ''}{'-' + slug if label else ''}.db"
    )
    argv = _meter_command(
        "serve",
        "--port",
        str(port),
        "--upstream",
        sim_url,
        "--database",
        f"sqlite:///{db_path}",
        "--log-level",
        "warning",
    )
    env = {**_meter_env(client), **(meter_env or {}), **(variant or {})}
    if source is not None:  # ahead of the editable install on sys.path: that version's meter is imported
        env["PYTHONPATH"] = str(source[1])
    if redis_url is not None:
        env["METER_REDIS_URL"] = redis_url
        env["METER_QUOTA_PREFIX"] = f"meter-bench:{os.getpid()}:{port}:"
        env["METER_ADMIN_TOKEN"] = ADMIN_TOKEN
    process = procs.start(name, argv, workdir, env=env, cpus=pinning.meter)
    target = Target(name, "meter", f"http://127.0.0.1:{port}", server, client, process, db_path)
    target.quota = redis_url is not None
    target.variant = label
    return target


def export_source(ref: str, workdir: Path) -> Path:
    """``meter/`` and ``migrations/`` as they are at git ``ref``, extracted under ``workdir`` (what
    ``--compare-source`` runs)."""
    dest = workdir / f"source-{ref.replace('/', '_')}"
    dest.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", ref, "meter", "migrations"], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


PASSTHROUGH = "pass-through"


def start_passthrough(workdir: Path, pinning: procs.Pinning, sim_url: str) -> Target:
    """The floor: meter's stack with nothing observed or recorded, on meter's CPU. Ready once a request
    forwarded through it reaches the simulator (it has no ``/readyz``)."""
    port = procs.free_port()
    argv = [sys.executable, "-m", "bench.passthrough", "--upstream", sim_url, "--port", str(port)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = procs.start("passthrough", argv, workdir, env=env, cpus=pinning.meter, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    procs.wait_http(f"{url}/_sim/stats", process)
    return Target(PASSTHROUGH, "passthrough", url, "uvicorn", "aiohttp", process)


def start_redis(workdir: Path, pinning: procs.Pinning) -> tuple[procs.Process, str]:
    """A private Redis for ``--quota local``, pinned with the simulator and the load generators: in a
    deployment Redis runs on its own host, so here it must not take meter's core (the machine's shared
    Redis runs wherever the kernel puts it, meter's core included)."""
    server = shutil.which("redis-server")
    if server is None:
        raise SystemExit("--quota local needs redis-server on PATH (apt-get install redis-server)")
    port = procs.free_port()
    argv = [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    process = procs.start("redis", [*argv, "--dir", str(workdir)], workdir, cpus=pinning.load)
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    break
        except OSError:
            pass
        if time.monotonic() > deadline or not process.alive():
            raise SystemExit(f"redis-server did not start:\n{process.log_tail()}")
        time.sleep(0.1)
    return process, f"redis://127.0.0.1:{port}/0"


def set_limits(target: Target, key: str) -> None:
    """Put the bench key in a team and give both every kind of limit, high enough that nothing is
    refused: each request then pays a full reserve and settle (two subjects, every counter)."""
    team = {
        "budget_usd": "1000000",
        "budget_period": "month",
        "tokens_budget": 10**12,
        "rpm": 10**9,
        "tpm": 10**12,
        "max_concurrent": 100_000,
    }
    procs.send_json("POST", f"{target.url}/admin/v1/teams", {"name": "bench"}, ADMIN_TOKEN)
    created = procs.send_json(
        "POST", f"{target.url}/admin/v1/teams/bench/keys", {"kind": "passthrough", "key": key}, ADMIN_TOKEN
    )
    procs.send_json("PUT", f"{target.url}/admin/v1/teams/bench/limits", team, ADMIN_TOKEN)
    procs.send_json(
        "PUT",
        f"{target.url}/admin/v1/keys/{created['id']}/limits",
        {"budget_usd": "1000000", "rpm": 10**9},
        ADMIN_TOKEN,
    )


def writer_pending(target: Target) -> float:
    for line in procs.get_text(f"{target.url}/metrics").splitlines():
        if line.startswith("meter_writer_pending_events "):
            return float(line.split()[1])
    return 0.0


def wait_writer_idle(target: Target, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while writer_pending(target) > 0 and time.monotonic() < deadline:
        time.sleep(0.05)


def rss_summary(results: dict[str, Any]) -> dict[str, Any]:
    """Peak RSS over the steps (each step's VmHWM is measured from a reset at its start)."""
    steps = [(f"{rate} req/s", step) for rate, step in results.get("latency", {}).items()]
    steps += [(f"{rate} streams/s", step) for rate, step in results.get("stream", {}).items()]
    steps += [("max req/s", results.get("max_requests")), ("max streams/s", results.get("max_streams"))]
    measured = [(name, step) for name, step in steps if step and step.get("rss_mb") is not None]
    if not measured:
        return {}
    name, worst = max(measured, key=lambda item: item[1]["rss_mb"])
    closed = [step["rss_mb"] for label, step in measured if label.startswith("max")]
    return {
        "serving_mb": worst["rss_mb"],
        "total_mb": max(step["rss_total_mb"] for _, step in measured),
        "peak_step": name,
        "closed_loop_mb": max(closed) if closed else None,
        "idle_mb": results.get("idle_rss_mb"),
        "processes": worst.get("processes"),
    }


def count_records(db_path: Path) -> int | None:
    try:
        with sqlite3.connect(db_path) as conn:
            row = conn.execute("SELECT count(*) FROM usage_events").fetchone()
            return int(row[0])
    except sqlite3.Error:
        return None
