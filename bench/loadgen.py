"""The Python load generator: a separate process driven by JSON lines on stdin, answering on stdout.

One job per line, one result per line::

    {"mode": "open", "url": ..., "stream": false, "rate": 1000, "duration": 3, "warmup": 0.5}
    {"mode": "closed", "url": ..., "stream": true, "connections": 64, "duration": 3, "warmup": 0.5}

Open loop: request ``i`` is due at ``t0 + i / rate`` whatever happened to the others; its latency (and
a stream's time to first token) is measured from that due time, not from when it was actually sent, so
a server (or a generator) that falls behind is charged for the wait (rule 1 of :mod:`bench`). The
generator's own lateness is reported as ``lag_ms`` so a reader can tell whether it kept up.

Closed loop: ``connections`` workers each send the next request as soon as the last one finished.
Throughput is the completions inside the measurement window divided by its length.

Requests due in the first ``warmup`` seconds are sent but not measured (connections are opened then).
A stream counts as OK only if it ended with ``data: [DONE]``; its time to first token is when the
first ``"content":"`` delta arrived. Everything runs on uvloop; times come from ``perf_counter``
(uvloop's ``loop.time()`` is cached per loop iteration and has millisecond resolution).
"""

from __future__ import annotations

import asyncio
import gc
import json
import sys
import time
from collections import Counter
from typing import Any

import aiohttp

from bench.stats import summarize

CONTENT_MARK = b'"content":"'
DONE_MARK = b"data: [DONE]"


class _Tally:
    """Samples of one job. Times are ``perf_counter`` seconds."""

    def __init__(self, window_start: float, window_end: float) -> None:
        self.window_start = window_start
        self.window_end = window_end
        self.latencies: list[float] = []
        self.ttfts: list[float] = []
        self.lags: list[float] = []
        self.errors: Counter[str] = Counter()
        self.error_samples: dict[str, str] = {}  # the first error of each kind, for the JSON
        self.sent = 0  # measured requests sent
        self.completed_in_window = 0  # OK completions (measured or not) inside the window

    def result(self, raw: bool) -> dict[str, Any]:
        """Counters and summaries in milliseconds; with ``raw`` also every sample (ms, 0.1 us steps),
        so that rounds can be pooled (:func:`bench.stats.merge_open`)."""
        window = self.window_end - self.window_start
        ms = {
            "latency": [round(v * 1000, 4) for v in self.latencies],
            "ttft": [round(v * 1000, 4) for v in self.ttfts],
            "lag": [round(v * 1000, 4) for v in self.lags],
        }
        result: dict[str, Any] = {
            "sent": self.sent,
            "ok": len(self.latencies),
            "errors": dict(self.errors),
            "error_count": sum(self.errors.values()),
            "error_samples": self.error_samples,
            "window_s": window,
            "completed_in_window": self.completed_in_window,
            "achieved_rps": round(self.completed_in_window / window, 2) if window > 0 else None,
            "latency_ms": summarize(ms["latency"]),
            "ttft_ms": summarize(ms["ttft"]) if self.ttfts else None,
            "lag_ms": summarize(ms["lag"]) if self.lags else None,
        }
        if raw:
            result["samples"] = ms
        return result


async def _one(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    stream: bool,
    origin: float,
    measured: bool,
    tally: _Tally,
) -> None:
    """One request; latency and TTFT are taken from ``origin`` (the due time in open loop)."""
    first: float | None = None
    try:
        async with session.post(url, data=body) as response:
            if response.status != 200:
                kind = f"http_{response.status}"
                text = await response.read()
                tally.errors[kind] += 1
                tally.error_samples.setdefault(kind, text[:300].decode("utf-8", "replace"))
                return
            if stream:
                tail = b""
                async for chunk in response.content.iter_any():
                    if first is None and CONTENT_MARK in tail + chunk:
                        first = time.perf_counter()
                    tail = (tail + chunk)[-64:]
                end = time.perf_counter()
                if DONE_MARK not in tail:
                    tally.errors["truncated_stream"] += 1
                    return
            else:
                payload = await response.read()
                end = time.perf_counter()
                if not payload:
                    tally.errors["empty_body"] += 1
                    return
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        kind = type(exc).__name__
        tally.errors[kind] += 1
        tally.error_samples.setdefault(kind, str(exc)[:300])
        return
    if tally.window_start <= end <= tally.window_end:
        tally.completed_in_window += 1
    if measured:
        tally.latencies.append(end - origin)
        if stream:
            if first is None:
                tally.errors["no_content"] += 1
            else:
                tally.ttfts.append(first - origin)


def _session(job: dict[str, Any], limit: int) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=limit, limit_per_host=limit),
        timeout=aiohttp.ClientTimeout(total=job.get("timeout", 10.0)),
        headers={"content-type": "application/json", "authorization": f"Bearer {job['key']}"},
        auto_decompress=False,
    )


async def open_loop(job: dict[str, Any]) -> dict[str, Any]:
    rate: float = job["rate"]
    duration: float = job["duration"]
    warmup: float = job.get("warmup", 0.0)
    body = job["body"].encode()
    interval = 1.0 / rate
    total = int(rate * (warmup + duration))
    warm = int(rate * warmup)
    t0 = time.perf_counter() + 0.02
    tally = _Tally(t0 + warmup, t0 + warmup + duration)
    pending: set[asyncio.Task[None]] = set()
    loop = asyncio.get_running_loop()
    async with _session(job, job.get("max_connections", 1024)) as session:
        for i in range(total):
            due = t0 + i * interval
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            measured = i >= warm
            if measured:
                tally.sent += 1
                tally.lags.append(max(0.0, time.perf_counter() - due))
            task = loop.create_task(_one(session, job["url"], body, job["stream"], due, measured, tally))
            pending.add(task)
            task.add_done_callback(pending.discard)
        await _drain(pending, job.get("timeout", 10.0), tally)
    return tally.result(job.get("raw", False))


async def closed_loop(job: dict[str, Any]) -> dict[str, Any]:
    duration: float = job["duration"]
    warmup: float = job.get("warmup", 0.0)
    connections: int = job["connections"]
    body = job["body"].encode()
    t0 = time.perf_counter()
    tally = _Tally(t0 + warmup, t0 + warmup + duration)

    async def worker(session: aiohttp.ClientSession) -> None:
        while True:
            start = time.perf_counter()
            if start >= tally.window_end:
                return
            await _one(session, job["url"], body, job["stream"], start, start >= tally.window_start, tally)

    async with _session(job, connections) as session:
        workers = {asyncio.ensure_future(worker(session)) for _ in range(connections)}
        await _drain(workers, duration + warmup + job.get("timeout", 10.0), tally)
    result = tally.result(False)
    result["connections"] = connections
    return result


async def _drain(tasks: set[asyncio.Task[None]], timeout: float, tally: _Tally) -> None:
    if not tasks:
        return
    _, late = await asyncio.wait(set(tasks), timeout=timeout)
    for task in late:
        task.cancel()
    if late:
        tally.errors["unfinished"] += len(late)
        await asyncio.wait(late)


def main() -> None:
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        print(json.dumps({"ready": True}), flush=True)
        for line in sys.stdin:
            if not line.strip():
                continue
            job = json.loads(line)
            if job.get("mode") == "quit":
                break
            started = time.perf_counter()
            # No collector pauses while measuring: a full collection of the generator's own objects
            # (10-20 ms) would be charged to whichever target was being measured. A job's garbage is
            # collected after it.
            gc.collect()
            gc.disable()
            try:
                result = runner.run(open_loop(job) if job["mode"] == "open" else closed_loop(job))
            except Exception as exc:  # report, do not die: the orchestrator decides
                result = {"failed": f"{type(exc).__name__}: {exc}"}
            finally:
                gc.enable()
                gc.collect()
            result["generator"] = "python-aiohttp"
            result["wall_s"] = round(time.perf_counter() - started, 3)
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
