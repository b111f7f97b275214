"""Real `meter serve` / `meter simulate` processes for signal and crash tests."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def meter_command() -> list[str]:
    return [sys.executable, "-m", "meter"]


class Process:
    def __init__(
        self, args: Sequence[str], *, env: dict[str, str], port: int, log: Path, ready_path: str
    ) -> None:
        self.args = list(args)
        self.env = env
        self.port = port
        self.log = log
        self.ready_path = ready_path
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> Process:
        handle = self.log.open("ab")
        # Own process group: kill() then takes uvicorn's worker processes down too, never orphaning them.
        self.proc = subprocess.Popen(
            self.args, env=self.env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.args} exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                if httpx.get(self.url + self.ready_path, timeout=0.5).status_code < 500:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"{self.args} did not become ready:\n{self.log.read_text()}")

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)  # the server only: it stops its workers itself

    def wait(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # the server and any workers it spawned
        if self.proc.poll() is None:
            self.proc.wait(10)

    def __enter__(self) -> Process:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.kill()


def simulator_process(tmp: Path, *extra: str) -> Process:
    port = free_port()
    return Process(
        [*meter_command(), "simulate", "--port", str(port), *extra],
        env=dict(os.environ),
        port=port,
        log=tmp / f"simulator-{port}.log",
        ready_path="/_sim/stats",
    )


def meter_process(
    tmp: Path,
    upstream: str,
    database_url: str,
    *extra: str,
    env: dict[str, str] | None = None,
    port: int | None = None,
) -> Process:
    port = port or free_port()
    environment = {k: v for k, v in os.environ.items() if not k.startswith("METER_")}
    environment.update({"METER_KEY_SECRET": "test-secret-0123456789abcdef", "METER_LOG_LEVEL": "warning"})
    environment.update(env or {})
    return Process(
        [
            *meter_command(),
            "serve",
            "--port",
            str(port),
            "--upstream",
            upstream,
            "--database",
            database_url,
            *extra,
        ],
        env=environment,
        port=port,
        log=tmp / f"meter-{port}.log",
        ready_path="/healthz",
    )


__all__ = ["Process", "free_port", "meter_process", "signal", "simulator_process"]
