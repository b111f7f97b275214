"""Errors the simulator answers with, real ones and injected ones, in Fireworks' error shape.

Shape: ``{"error": {"object": "error", "type": ..., "code": ..., "message": ...}}``, the same body for a
plain error response and for an error event in the middle of a stream (``data: {"error": {...}}``).

Injection is chosen per request, by the header ``x-sim-error: <value>`` or by a model whose last path
segment is ``sim-error-<value>`` (``sim-error-429``, ``accounts/fireworks/models/sim-error-503``); the
header wins. ``<value>`` is one of the status codes in :data:`INJECTABLE` or ``midstream``: a stream
that sends :data:`MIDSTREAM_TOKENS` tokens, then an error event, and ends without ``[DONE]``. A
non-streamed request asked to fail mid-stream gets the 500 the stream would have carried.

This module is pure: it imports nothing but orjson.
"""

from __future__ import annotations

from dataclasses import dataclass

import orjson

MIDSTREAM_TOKENS = 3
RETRY_AFTER_SECONDS = 1
ERROR_MODEL_PREFIX = "sim-error-"


@dataclass(frozen=True, slots=True)
class Fault:
    status: int
    type: str
    code: str
    message: str

    def body(self) -> bytes:
        return orjson.dumps(self.payload())

    def payload(self) -> dict[str, dict[str, str]]:
        return {"error": {"object": "error", "type": self.type, "code": self.code, "message": self.message}}


@dataclass(frozen=True, slots=True)
class Injection:
    """An error to inject: ``midstream`` means "start streaming, then fail with ``fault``"."""

    fault: Fault
    midstream: bool = False


INJECTABLE: dict[int, Fault] = {
    fault.status: fault
    for fault in (
        Fault(400, "invalid_request_error", "invalid_request_error", "Simulated bad request"),
        Fault(401, "authentication_error", "unauthorized", "The API key you provided is invalid."),
        Fault(403, "permission_denied_error", "permission_denied", "Simulated permission denied"),
        Fault(404, "not_found_error", "not_found", "Model not found, inaccessible, and/or not deployed"),
        Fault(413, "invalid_request_error", "request_too_large", "Simulated request too large"),
        Fault(422, "invalid_request_error", "unprocessable_entity", "Simulated unprocessable request"),
        Fault(429, "rate_limit_error", "rate_limit_exceeded", "Simulated rate limit exceeded"),
        Fault(500, "internal_server_error", "internal_server_error", "Simulated internal server error"),
        Fault(502, "bad_gateway", "bad_gateway", "Simulated bad gateway"),
        Fault(503, "service_unavailable", "service_overloaded", "Simulated service overloaded"),
        Fault(504, "timeout", "gateway_timeout", "Simulated gateway timeout"),
    )
}

MIDSTREAM = Injection(
    Fault(500, "internal_server_error", "internal_server_error", "Simulated failure mid-stream"),
    midstream=True,
)


def parse_injection(value: str) -> Injection:
    """``"429"`` -> that status's fault, ``"midstream"`` -> :data:`MIDSTREAM`; ValueError otherwise."""
    value = value.strip().lower()
    if value == "midstream":
        return MIDSTREAM
    fault = INJECTABLE.get(int(value)) if value.isdigit() else None
    if fault is None:
        choices = ", ".join([*map(str, INJECTABLE), "midstream"])
        raise ValueError(f"unknown simulated error {value!r}; expected one of {choices}")
    return Injection(fault)


def model_injection(model: str) -> str | None:
    """The ``<value>`` of a ``sim-error-<value>`` model (its last path segment), else None."""
    name = model.rpartition("/")[2]
    return name[len(ERROR_MODEL_PREFIX) :] if name.startswith(ERROR_MODEL_PREFIX) else None


def invalid_request(message: str) -> Fault:
    return Fault(400, "invalid_request_error", "invalid_request_error", message)


MISSING_AUTH = Fault(401, "authentication_error", "unauthorized", "Missing or malformed Authorization header")
UNKNOWN_PATH = Fault(404, "not_found_error", "not_found", "Not found")
METHOD_NOT_ALLOWED = Fault(405, "invalid_request_error", "method_not_allowed", "Method not allowed")
