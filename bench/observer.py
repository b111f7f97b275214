"""Observer microbenchmark: what meter's tap (:class:`~meter.tap.observer.ResponseObserver`) costs per
response, in microseconds, for the shapes the simulator (and Fireworks) send:

* ``chat stream``: 20 chunks, each one ``data: {...}\\n\\n`` event: the role chunk, 17 one-token
  content chunks, the finish chunk with usage, ``data: [DONE]``;
* ``chat stream, aborted``: the same stream cut after its 10th chunk (usage is then estimated from the
  content relayed);
* ``chat stream, 4 events a chunk``: the 20 events arriving 4 to a chunk (a slower reader);
* ``chat stream, one read``: the 20 events in one chunk (a fast upstream under load: with the
  simulator's default timing, most streams reach meter in one or two reads);
* ``chat body``: a non-streamed chat completion (one JSON body, one chunk);
* ``responses stream``: a Responses API stream, one named event a chunk (4 opening events, 12 deltas,
  4 closing events with ``response.completed``).

Each figure is the median over ``--repeat`` runs of the mean over ``--number`` responses: create the
observer with the simulator's response headers, feed every chunk, ``finish()``.

    .venv/bin/python -m bench.observer
    .venv/bin/python -m bench.observer --repeat 9 --number 5000
    valgrind --tool=callgrind .venv/bin/python -m bench.observer --only "chat stream" --number 2000

Timings on a shared machine are noisy; compare before/after in the same run, or count instructions
with callgrind (``--only`` and a fixed ``--number`` make the counts comparable).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from meter.simulator.plan import Api, Plan
from meter.simulator.shapes import (
    DONE,
    ChunkTemplates,
    ResponseEvents,
    chat_body,
    fireworks_headers,
)
from meter.simulator.tokens import token_bytes
from meter.tap.observer import Observation, ResponseObserver

IDENT = "0f3c5a7e9b1d4f6a8c2e4b6d8f0a1c3e"
CREATED = 1_732_252_800


def _plan(api: Api, tokens: int) -> Plan:
    return Plan(
        api=api,
        model="accounts/fireworks/models/llama-v3p1-8b-instruct",
        prompt_tokens=23,
        cached_tokens=0,
        n=1,
        completion_tokens=tokens,
        finish_reason="stop",
        stream=True,
        include_usage=False,
        perf_metrics=False,
        injection=None,
    )


def _headers(plan: Plan, *, stream: bool) -> dict[str, str]:
    pairs = [
        (b"content-type", b"text/event-stream" if stream else b"application/json"),
        (b"x-request-id", IDENT.encode()),
        *fireworks_headers(plan, 0.08, 0.08 if stream else 0.4, 3),
    ]
    return {name.decode().lower(): value.decode() for name, value in pairs}


def chat_stream() -> tuple[str, dict[str, str], list[bytes]]:
    plan = _plan(Api.CHAT, 17)
    chunks = ChunkTemplates(plan, IDENT, CREATED)
    body = [chunks.role(0), *(chunks.token(0, token_bytes(i)) for i in range(17)), chunks.finish(0, None)]
    return "/v1/chat/completions", _headers(plan, stream=True), [*body, DONE]


def chat_stream_batched() -> tuple[str, dict[str, str], list[bytes]]:
    endpoint, headers, chunks = chat_stream()
    return endpoint, headers, [b"".join(chunks[i : i + 4]) for i in range(0, len(chunks), 4)]


def chat_stream_one_read() -> tuple[str, dict[str, str], list[bytes]]:
    endpoint, headers, chunks = chat_stream()
    return endpoint, headers, [b"".join(chunks)]


def chat_json() -> tuple[str, dict[str, str], list[bytes]]:
    plan = _plan(Api.CHAT, 17)
    return "/v1/chat/completions", _headers(plan, stream=False), [chat_body(plan, IDENT, CREATED, None)]


def responses_stream() -> tuple[str, dict[str, str], list[bytes]]:
    plan = _plan(Api.RESPONSES, 12)
    request = {"model": "llama-v3p1-8b-instruct", "input": "Say hello", "stream": True}
    events = ResponseEvents(plan, request, IDENT, CREATED)
    chunks = [*events.opening(), *(events.delta(token_bytes(i)) for i in range(12)), *events.closing(None)]
    return "/v1/responses", _headers(plan, stream=True), chunks


def observe(
    endpoint: str, headers: dict[str, str], chunks: list[bytes], aborted: bool = False
) -> Observation:
    observer = ResponseObserver(endpoint, status_code=200, headers=headers, prompt_tokens_estimate=20)
    now = 0.0
    for chunk in chunks:
        now += 0.001
        observer.feed(chunk, now)
    return observer.finish(aborted=aborted)


def aborted_chat_stream() -> tuple[str, dict[str, str], list[bytes]]:
    endpoint, headers, chunks = chat_stream()
    return endpoint, headers, chunks[:10]


def scenarios() -> dict[str, Callable[[], Observation]]:
    table = [
        ("chat stream", chat_stream(), False),
        ("chat stream, aborted", aborted_chat_stream(), True),
        ("chat stream, 4 events a chunk", chat_stream_batched(), False),
        ("chat stream, one read", chat_stream_one_read(), False),
        ("chat body", chat_json(), False),
        ("responses stream", responses_stream(), False),
    ]
    return {name: partial(observe, *response, aborted) for name, response, aborted in table}


def measure(fn: Callable[[], Any], number: int, repeat: int) -> float:
    """Median over ``repeat`` runs of the mean µs per call over ``number`` calls."""
    runs = []
    for _ in range(repeat):
        started = time.perf_counter()
        for _ in range(number):
            fn()
        runs.append((time.perf_counter() - started) / number * 1e6)
    return statistics.median(runs)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--number", type=int, default=2000, help="responses per run")
    parser.add_argument("--repeat", type=int, default=7, help="runs (the median is reported)")
    parser.add_argument("--only", action="append", help="run only this scenario (repeatable)")
    args = parser.parse_args()
    table = scenarios()
    names = args.only or list(table)
    for name in names:
        fn = table[name]
        observation = fn()
        assert observation.usage_source in ("reported", "estimated"), observation
        print(f"{name:>30}: {measure(fn, args.number, args.repeat):7.1f} µs per response")


if __name__ == "__main__":
    main()
