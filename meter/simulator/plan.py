"""Turn one parsed request into a :class:`Plan`: everything the simulator will answer, decided up front.

Rule 1: planning is pure and total. A body it cannot serve raises :class:`PlanError` carrying the
        Fireworks-style 400 to send; nothing is half-answered.
Rule 2: completion length per choice is the smallest of ``max_completion_tokens``, ``max_tokens`` and
        ``max_output_tokens`` that the body gives (null means absent), finishing with ``"length"``;
        without any, the configured default, finishing with ``"stop"``.
Rule 3: usage covers all choices: ``completion_tokens = n * per-choice tokens``; the prompt is counted
        once. Cached tokens come from the ``x-sim-cached-tokens`` header, capped at the prompt.
Rule 4: the response's ``model`` is the requested one, prefixed ``accounts/fireworks/models/`` when the
        request gave a bare name (Fireworks answers with the full resource path).

Simulator-only request headers (case-insensitive), parsed by :func:`parse_overrides`:
``x-sim-error`` (see :mod:`.faults`), ``x-sim-ttft-ms``, ``x-sim-token-delay-ms`` (non-negative numbers),
``x-sim-cached-tokens`` (non-negative integer).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from .faults import Fault, Injection, invalid_request, model_injection, parse_injection
from .tokens import count_prompt_tokens

FIREWORKS_MODEL_PREFIX = "accounts/fireworks/models/"
DEFAULT_EMBEDDING_DIMENSIONS = 768
MAX_EMBEDDING_DIMENSIONS = 8192
MAX_CHOICES = 128


class Api(enum.Enum):
    CHAT = "chat.completions"
    COMPLETIONS = "completions"
    EMBEDDINGS = "embeddings"
    RESPONSES = "responses"


class PlanError(Exception):
    def __init__(self, fault: Fault) -> None:
        super().__init__(fault.message)
        self.fault = fault


@dataclass(frozen=True, slots=True)
class Overrides:
    """What the ``x-sim-*`` headers of one request ask for; None means "use the configuration"."""

    injection: Injection | None = None
    ttft_ms: float | None = None
    token_delay_ms: float | None = None
    cached_tokens: int | None = None


NO_OVERRIDES = Overrides()


@dataclass(frozen=True, slots=True)
class Plan:
    api: Api
    model: str  # as the response reports it (rule 4)
    prompt_tokens: int
    cached_tokens: int
    n: int
    completion_tokens: int  # per choice
    finish_reason: str
    stream: bool
    include_usage: bool  # stream_options.include_usage: usage on a separate final chunk
    perf_metrics: bool  # perf_metrics_in_response
    injection: Injection | None  # from the model name; the header's is in Overrides
    embedding_inputs: int = 0
    dimensions: int = 0
    base64: bool = False

    @property
    def total_completion_tokens(self) -> int:
        return self.n * self.completion_tokens


def parse_overrides(headers: dict[str, str]) -> Overrides:
    """``headers`` holds only the ``x-sim-*`` headers, lower-cased names. Raises PlanError."""
    try:
        injection = parse_injection(headers["x-sim-error"]) if "x-sim-error" in headers else None
    except ValueError as exc:
        raise PlanError(invalid_request(f"x-sim-error: {exc}")) from None
    return Overrides(
        injection=injection,
        ttft_ms=_header_number(headers, "x-sim-ttft-ms"),
        token_delay_ms=_header_number(headers, "x-sim-token-delay-ms"),
        cached_tokens=_header_count(headers, "x-sim-cached-tokens"),
    )


def _header_number(headers: dict[str, str], name: str) -> float | None:
    if name not in headers:
        return None
    try:
        value = float(headers[name])
    except ValueError:
        value = -1.0
    if not 0.0 <= value < float("inf"):
        raise PlanError(invalid_request(f"{name} must be a non-negative number of milliseconds"))
    return value


def _header_count(headers: dict[str, str], name: str) -> int | None:
    if name not in headers:
        return None
    text = headers[name].strip()
    if not text.isdigit():
        raise PlanError(invalid_request(f"{name} must be a non-negative integer"))
    return int(text)


def response_model(model: str) -> str:
    return model if "/" in model else FIREWORKS_MODEL_PREFIX + model


def plan_request(api: Api, body: Any, *, default_tokens: int, cached_tokens: int | None) -> Plan:
    """The answer to ``body`` (already JSON-decoded) on ``api``. Raises PlanError (rule 1)."""
    if not isinstance(body, dict):
        raise PlanError(invalid_request("Request body must be a JSON object"))
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise PlanError(invalid_request("'model' is required and must be a string"))
    injection = None
    error_value = model_injection(model)
    if error_value is not None:
        try:
            injection = parse_injection(error_value)
        except ValueError as exc:
            raise PlanError(invalid_request(f"model: {exc}")) from None

    _check_input(api, body)
    prompt_tokens = count_prompt_tokens(body)
    cached = min(cached_tokens, prompt_tokens) if cached_tokens else 0

    if api is Api.EMBEDDINGS:
        return _plan_embeddings(body, model, prompt_tokens, cached, injection)

    n = body.get("n", 1) if api is not Api.RESPONSES else 1
    if n is None:
        n = 1
    if type(n) is not int or not 1 <= n <= MAX_CHOICES:
        raise PlanError(invalid_request(f"'n' must be an integer between 1 and {MAX_CHOICES}"))

    limit: int | None = None
    for field in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
        value = body.get(field)
        if value is None:
            continue
        if type(value) is not int or value < 0:
            raise PlanError(invalid_request(f"'{field}' must be a non-negative integer"))
        limit = value if limit is None else min(limit, value)

    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise PlanError(invalid_request("'stream' must be a boolean"))
    options = body.get("stream_options")
    include_usage = isinstance(options, dict) and options.get("include_usage") is True

    return Plan(
        api=api,
        model=response_model(model),
        prompt_tokens=prompt_tokens,
        cached_tokens=cached,
        n=n,
        completion_tokens=default_tokens if limit is None else limit,
        finish_reason="stop" if limit is None else "length",
        stream=stream,
        include_usage=include_usage and api is not Api.RESPONSES,
        perf_metrics=body.get("perf_metrics_in_response") is True,
        injection=injection,
    )


def _check_input(api: Api, body: dict[str, Any]) -> None:
    if api is Api.CHAT:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise PlanError(invalid_request("'messages' must be a non-empty array of message objects"))
    elif api is Api.COMPLETIONS:
        if not isinstance(body.get("prompt"), (str, list)):
            raise PlanError(invalid_request("'prompt' is required and must be a string or an array"))
    else:
        value = body.get("input")
        if not isinstance(value, (str, list)) or (isinstance(value, list) and not value):
            raise PlanError(invalid_request("'input' is required and must be a string or a non-empty array"))


def _plan_embeddings(
    body: dict[str, Any], model: str, prompt_tokens: int, cached: int, injection: Injection | None
) -> Plan:
    value = body["input"]
    if isinstance(value, str) or (isinstance(value, list) and value and isinstance(value[0], int)):
        inputs = 1  # one text, or one already-tokenized text
    else:
        inputs = len(value)
    dimensions = body.get("dimensions")
    if dimensions is None:
        dimensions = DEFAULT_EMBEDDING_DIMENSIONS
    if type(dimensions) is not int or not 1 <= dimensions <= MAX_EMBEDDING_DIMENSIONS:
        raise PlanError(
            invalid_request(f"'dimensions' must be an integer between 1 and {MAX_EMBEDDING_DIMENSIONS}")
        )
    encoding = body.get("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise PlanError(invalid_request("'encoding_format' must be 'float' or 'base64'"))
    return Plan(
        api=Api.EMBEDDINGS,
        model=response_model(model),
        prompt_tokens=prompt_tokens,
        cached_tokens=cached,
        n=1,
        completion_tokens=0,
        finish_reason="stop",
        stream=False,
        include_usage=False,
        perf_metrics=body.get("perf_metrics_in_response") is True,
        injection=injection,
        embedding_inputs=inputs,
        dimensions=dimensions,
        base64=encoding == "base64",
    )
