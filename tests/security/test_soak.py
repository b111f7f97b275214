"""A short soak: abusive clients beside normal ones against a real `meter serve` process. meter stays
ready, its memory stays bounded, and every normal request has its record."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import sqlite3
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from meter.tenancy.identity import KeyFingerprinter
from tests.conftest import wait_for
from tests.security.rawhttp import raw_request
from tests.support.processes import meter_process, simulator_process

pytestmark = pytest.mark.slow

SOAK_SECONDS = 20.0
NORMAL_KEY = "fw_normal_traffic_key_0123456789abcdef"
MODEL = "llama-v3p1-8b-instruct"
MESSAGES = [{"role": "user", "content": "count to three"}]


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def abuse(url: str, stop: threading.Event, counts: dict[str, int]) -> None:
    """One abusive client: every kind of hostile request in turn, until ``stop``."""
    port = int(url.rsplit(":", 1)[1])
    big_model = json.dumps({"model": "x" * (1 << 20), "messages": MESSAGES}).encode()
    attacks: list[tuple[str, bytes, list[tuple[bytes, bytes]], bytes]] = [
        ("steer", b"*@127.0.0.1:22/x", [], b"{}"),
        ("climb", b"/../v1/accounts/x", [], b"{}"),
        (
            "two-auth",
            b"/v1/chat/completions",
            [(b"Authorization", b"Bearer a"), (b"Authorization", b"Bearer b")],
            b"{}",
        ),
        ("virtual-leak", b"/v1/chat/completions?k=mk-0123456789abcdefghijklmnop", [], b"{}"),
        ("big-model", b"/v1/chat/completions", [(b"Content-Type", b"application/json")], big_model),
        ("garbage", b"/v1/chat/completions", [(b"Content-Type", b"application/json")], b"\x00\xff" * 1000),
        ("non-utf8", b"/v1/chat/completions", [(b"x-note", b"\xe9\xe9")], b"{}"),
        ("huge-head", b"/v1/chat/completions", [(b"x-padding", b"a" * 40_000)], b"{}"),
    ]
    i = 0
    while not stop.is_set():
        name, target, headers, body = attacks[i % len(attacks)]
        i += 1
        with contextlib.suppress(OSError, IndexError, ValueError):
            raw_request(url, target, headers=[(b"Authorization", b"Bearer fw-abuser"), *headers], body=body)
            counts[name] = counts.get(name, 0) + 1
        # a client that starts a streamed request and hangs up mid-stream
        with contextlib.suppress(OSError):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                body = json.dumps(
                    {"model": MODEL, "messages": MESSAGES, "stream": True, "max_tokens": 50}
                ).encode()
                sock.sendall(
                    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer fw-abuser\r\n"
                    b"x-sim-token-delay-ms: 20\r\nContent-Type: application/json\r\nContent-Length: "
                    + str(len(body)).encode()
                    + b"\r\n\r\n"
                    + body
                )
                sock.recv(1024)
            counts["hang-up"] = counts.get("hang-up", 0) + 1


def stall(url: str, stop: threading.Event, held: list[socket.socket]) -> None:
    """Clients that never finish, up to 200 at a time: a body that stops halfway, a head that does."""
    port = int(url.rsplit(":", 1)[1])
    stalls = (
        b'POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{"model": ',
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nx-never: ends",
    )
    while not stop.is_set():
        if len(held) < 200:
            with contextlib.suppress(OSError):
                sock = socket.create_connection(("127.0.0.1", port), timeout=5)
                sock.sendall(stalls[len(held) % 2])
                held.append(sock)
        stop.wait(0.02)


async def normal(url: str, deadline: float) -> tuple[int, int]:
    """Normal traffic with the openai SDK until ``deadline``: (requests, successes)."""
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=NORMAL_KEY, max_retries=0, timeout=30)
    sent = ok = 0

    async def one(stream: bool) -> None:
        nonlocal sent, ok
        sent += 1
        if stream:
            chunks = await client.chat.completions.create(
                model=MODEL,
                messages=MESSAGES,
                max_tokens=8,
                stream=True,  # type: ignore[arg-type]
            )
            async for _ in chunks:
                pass
        else:
            await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8)  # type: ignore[arg-type]
        ok += 1

    try:
        while time.monotonic() < deadline:
            await asyncio.gather(*(one(i % 2 == 0) for i in range(8)))
    finally:
        await client.close()
    return sent, ok


def test_meter_stays_ready_bounded_and_complete_under_abuse(tmp_path: Path) -> None:
    db = tmp_path / "soak.db"
    with (
        simulator_process(tmp_path) as simulator,
        meter_process(
            tmp_path,
            simulator.url,
            f"sqlite:///{db}",
            env={"METER_CLIENT_BODY_TIMEOUT": "2", "METER_CLIENT_HEADER_TIMEOUT": "2"},
        ) as meter,
    ):
        assert meter.proc is not None
        pid = meter.proc.pid
        _, warm_up = asyncio.run(normal(meter.url, time.monotonic() + 2))
        baseline = rss_bytes(pid)
        stop = threading.Event()
        counts: dict[str, int] = {}
        held: list[socket.socket] = []
        workers = [
            threading.Thread(target=abuse, args=(meter.url, stop, counts), daemon=True) for _ in range(2)
        ]
        workers.append(threading.Thread(target=stall, args=(meter.url, stop, held), daemon=True))
        for worker in workers:
            worker.start()
        ready_failures: list[str] = []
        peak = baseline

        def watch() -> None:
            nonlocal peak
            while not stop.is_set():
                try:
                    ready = httpx.get(f"{meter.url}/readyz", timeout=5)
                    if ready.status_code != 200:
                        ready_failures.append(ready.text)
                except httpx.HTTPError as exc:
                    ready_failures.append(repr(exc))
                peak = max(peak, rss_bytes(pid))
                stop.wait(0.25)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            sent, ok = asyncio.run(normal(meter.url, time.monotonic() + SOAK_SECONDS))
        finally:
            stop.set()
            for thread in [*workers, watcher]:
                thread.join(30)
            for sock in held:
                sock.close()
        assert ready_failures == []
        assert sent == ok and ok > 50, (sent, ok)
        assert len(counts) >= 9 and min(counts.values()) > 0, counts
        assert peak - baseline < 150 * 1024 * 1024, f"RSS grew {(peak - baseline) >> 20} MiB"
        # The abusive requests were answered (a hostile target never reached port 22, say) and every
        # normal request has exactly its record.
        assert raw_request(meter.url, b"*", method=b"OPTIONS").status == 400

        fingerprint = KeyFingerprinter(b"test-secret-0123456789abcdef").identify(NORMAL_KEY).fingerprint

        def normal_rows() -> int:
            with sqlite3.connect(db) as conn:
                (count,) = conn.execute(
                    "SELECT count(*) FROM usage_events WHERE key_fingerprint = ? AND outcome = 'ok'",
                    (fingerprint,),
                ).fetchone()
            return int(count)

        wait_for(lambda: normal_rows() >= warm_up + ok, timeout=30, message="every normal request's record")
        assert normal_rows() == warm_up + ok
