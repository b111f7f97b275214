"""The benchmark's processes: simulator, meter, pass-through, load generator; ports, CPU pinning, RSS
and CPU time.

Every process is started in its own session (process group) so that stopping it stops its workers
(uvicorn's with ``--workers``) and nothing else. Pinning is inherited by children.

Pinning (``--pin auto``, the default on two or more CPUs): meter (and the ``--baseline`` pass-through,
measured in its place) gets the last CPU to itself; the simulator and the load generators share the
others. The targets are per meter process, so meter must not compete with its own load for a core;
unpinned, the scheduler puts the simulator or the generator on meter's core and the numbers measure
the mix, not meter (measured while writing this: wrk at 64 connections, meter 1,718 req/s pinned
against 1,356 unpinned). Pinning does not keep other processes of the machine off meter's core: the
bench measures their CPU time instead (``other cpu``).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

PYTHON = sys.executable
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class Pinning:
    meter: frozenset[int] | None  # CPUs for meter's processes (None: not pinned)
    load: frozenset[int] | None  # CPUs for the simulator and the load generators

    @property
    def description(self) -> str:
        if self.meter is None or self.load is None:
            return "none (the scheduler places every process)"
        return f"meter on cpu {_cpus(self.meter)}; simulator + load generators on cpu {_cpus(self.load)}"


def _cpus(cpus: frozenset[int]) -> str:
    return ",".join(str(c) for c in sorted(cpus))


def choose_pinning(mode: str) -> Pinning:
    available = sorted(os.sched_getaffinity(0))
    if mode == "none" or len(available) < 2:
        return Pinning(None, None)
    return Pinning(frozenset(available[-1:]), frozenset(available[:-1]))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Process:
    """A started process (the leader of its own process group) and where its output goes."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def tree(self) -> list[int]:
        """This process and all its descendants (pids)."""
        return [self.pid, *descendants(self.pid)]

    def cpu_seconds(self) -> float:
        """User + system CPU time of the whole tree so far (live processes only)."""
        return sum(_cpu_seconds(pid) for pid in self.tree())

    def stop(self, timeout: float = 15.0) -> None:
        if not self.alive():
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGKILL)
            self.popen.wait(5)


def start(
    name: str,
    argv: Sequence[str],
    log_dir: Path,
    *,
    env: dict[str, str] | None = None,
    cpus: frozenset[int] | None = None,
    cwd: Path | None = None,
) -> Process:
    log_path = log_dir / f"{name}.log"
    log = log_path.open("wb")

    def pin() -> None:
        if cpus is not None:
            os.sched_setaffinity(0, cpus)

    popen = subprocess.Popen(
        list(argv),
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=env,
        start_new_session=True,
        preexec_fn=pin,
        cwd=cwd,
    )
    log.close()
    return Process(name, popen, log_path)


def wait_http(url: str, process: Process, timeout: float = 30.0) -> None:
    """Wait until GET ``url`` answers 200, failing early if the process died."""
    deadline = time.monotonic() + timeout
    while True:
        if not process.alive():
            raise RuntimeError(f"{process.name} exited during start-up:\n{process.log_tail()}")
        with (
            contextlib.suppress(OSError, urllib.error.URLError),
            urllib.request.urlopen(url, timeout=1.0) as answer,
        ):
            if answer.status == 200:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{process.name} not ready at {url} after {timeout:g}s:\n{process.log_tail()}")
        time.sleep(0.05)


def get_json(url: str, timeout: float = 5.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


def send_json(method: str, url: str, body: Any, token: str, timeout: float = 5.0) -> Any:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        method=method,
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def get_text(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        text: str = response.read().decode()
        return text


# /proc readers --------------------------------------------------------------------------------


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rpartition(")")[2].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found: list[int] = []
    stack = [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def _cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime


def machine_busy_seconds() -> tuple[float, float]:
    """CPU time all CPUs spent not idle since boot (``/proc/stat``: everything but idle and iowait),
    and the part of it that was steal: time the hypervisor ran something else on this virtual
    machine's CPUs while they had work (0 on bare metal)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return (user + nice + system + irq + softirq + steal) / CLK_TCK, steal / CLK_TCK


def own_seconds() -> float:
    """CPU time of this process and its reaped children (wrk runs)."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def _status_kb(pid: int, key: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss(process: Process) -> bool:
    """Reset VmHWM of the process tree (``/proc/<pid>/clear_refs``, value 5), so that the next
    :func:`peak_rss` is the peak since now. False if the kernel or permissions do not allow it."""
    done = True
    for pid in process.tree():
        try:
            Path(f"/proc/{pid}/clear_refs").write_text("5")
        except OSError:
            done = False
    return done


def current_rss_mb(process: Process) -> float:
    """Resident memory now (VmRSS) of the processes that serve requests, in MB."""
    children = descendants(process.pid)
    serving = children or [process.pid]
    return round(sum(_status_kb(pid, "VmRSS") or 0 for pid in serving) * 1024 / 1e6, 1)


def peak_rss(process: Process) -> dict[str, Any]:
    """Peak resident memory (VmHWM) of meter's processes, in MB (10^6 bytes).

    ``serving_mb`` sums the processes that serve requests: the worker children when there are any
    (uvicorn runs its app in a child only with ``--workers`` > 1), else the process
    itself. ``total_mb`` adds the supervisor.
    """
    children = descendants(process.pid)
    per_pid = {pid: _status_kb(pid, "VmHWM") for pid in [process.pid, *children]}
    kb = {pid: v for pid, v in per_pid.items() if v is not None}
    serving = [pid for pid in children if pid in kb] or [process.pid]
    return {
        "serving_mb": round(sum(kb.get(pid, 0) for pid in serving) * 1024 / 1e6, 1),
        "total_mb": round(sum(kb.values()) * 1024 / 1e6, 1),
        "processes": len(kb),
        "per_process_mb": {str(pid): round(v * 1024 / 1e6, 1) for pid, v in kb.items()},
    }


# the Python load generator ----------------------------------------------------------------------


class LoadGenerator:
    """``python -m bench.loadgen`` as a child process, one JSON job per call."""

    def __init__(self, cpus: frozenset[int] | None, cwd: Path) -> None:
        def pin() -> None:
            if cpus is not None:
                os.sched_setaffinity(0, cpus)

        self._popen = subprocess.Popen(
            [PYTHON, "-m", "bench.loadgen"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            start_new_session=True,
            preexec_fn=pin,
            cwd=cwd,
        )
        ready = self._read()
        if not ready.get("ready"):
            raise RuntimeError(f"load generator did not start: {ready}")

    @property
    def pid(self) -> int:
        return self._popen.pid

    def cpu_seconds(self) -> float:
        return _cpu_seconds(self._popen.pid)

    def _read(self) -> dict[str, Any]:
        stdout: IO[bytes] | None = self._popen.stdout
        assert stdout is not None
        line = stdout.readline()
        if not line:
            raise RuntimeError("load generator exited")
        result: dict[str, Any] = json.loads(line)
        return result

    def run(self, job: dict[str, Any]) -> dict[str, Any]:
        stdin = self._popen.stdin
        assert stdin is not None
        stdin.write((json.dumps(job) + "\n").encode())
        stdin.flush()
        return self._read()

    def close(self) -> None:
        if self._popen.poll() is None:
            with contextlib.suppress(BrokenPipeError, OSError):
                assert self._popen.stdin is not None
                self._popen.stdin.write(b'{"mode": "quit"}\n')
                self._popen.stdin.close()
            try:
                self._popen.wait(5)
            except subprocess.TimeoutExpired:
                self._popen.kill()
                self._popen.wait(5)


@contextlib.contextmanager
def stopping(processes: list[Process]) -> Iterator[list[Process]]:
    """Stop every process in ``processes`` (in reverse start order) on the way out."""
    try:
        yield processes
    finally:
        for process in reversed(processes):
            process.stop()
