"""The simulator's configuration, its counters, and the record of a received request.

Rule 1: :class:`SimulatorConfig` is validated when built; a bad value fails with a message naming the
        field, so a benchmark never runs silently with a default.
Rule 2: every API request lands in exactly one terminal counter of :class:`SimulatorStats`:
        ``requests == completed + errors + cancelled + streams_cancelled + in_flight`` at all times.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import orjson


@dataclass(frozen=True, slots=True)
class SimulatorConfig:
    ttft_ms: float = 0.0  # delay before the first token (also before a non-streamed response)
    token_delay_ms: float = 0.0  # delay between streamed tokens
    completion_tokens: int = 16  # per choice, when the request gives no max_tokens-like limit
    record_requests: int = 1000  # how many received requests `Simulator.received` keeps

    def __post_init__(self) -> None:
        for name in ("ttft_ms", "token_delay_ms"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
                raise ValueError(f"SimulatorConfig.{name} must be a non-negative number, got {value!r}")
        for name in ("completion_tokens", "record_requests"):
            value = getattr(self, name)
            if type(value) is not int or value < 0:
                raise ValueError(f"SimulatorConfig.{name} must be a non-negative integer, got {value!r}")


@dataclass(slots=True)
class SimulatorStats:
    """Counters since start or the last reset (rule 2). ``in_flight`` is a gauge and survives resets."""

    requests: int = 0  # API requests received (everything but /_sim/*)
    completed: int = 0  # answered 2xx to the end, streamed or not
    errors: int = 0  # answered with an error status, or failed mid-stream
    cancelled: int = 0  # non-streamed: the client went away before the answer
    streams_started: int = 0  # streamed requests accepted (before their time to first token)
    streams_cancelled: int = 0  # streams whose client went away before the end
    tokens_generated: int = 0  # completion tokens produced, all choices, including cut-off streams
    in_flight: int = 0

    def snapshot(self) -> dict[str, int]:
        return asdict(self)

    def reset(self) -> None:
        for f in fields(self):
            if f.name != "in_flight":
                setattr(self, f.name, 0)


@dataclass(frozen=True, slots=True)
class ReceivedRequest:
    method: str
    path: str  # as received, e.g. "/inference/v1/chat/completions"
    query_string: str
    headers: list[tuple[str, str]]  # as received (ASGI lower-cases names), latin-1 decoded
    body: bytes

    def header(self, name: str) -> str | None:
        name = name.lower()
        return next((value for key, value in self.headers if key == name), None)

    def json(self) -> Any:
        return orjson.loads(self.body)

    def summary(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "path": self.path,
            "query_string": self.query_string,
            "headers": self.headers,
            "body_length": len(self.body),
        }
