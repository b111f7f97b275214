"""What a request costs: prices, the reservation estimate, the actual spend, and micro-USD rounding.

Admission reserves an :class:`Estimate` (:func:`estimate`) before forwarding and settles the
:class:`Spend` (:func:`actual_spend`) once the response has told what it used.

Rule 1 (money is exact): prices and costs are ``Decimal``; the stores count integer micro-USD. A
        reservation rounds *up* (:func:`to_micros`), so admission sees a cost at least as large as
        the exact one; budget limits round *down* (:class:`~meter.quota.policy.Limits`). Settled spend
        rounds to the *nearest* micro-USD, half to even (:meth:`Spend.cost_micros`): rounding every
        request up would overcount a cheap request by up to a micro-USD (~17% of a 30-token request at
        $0.20 per 1M tokens) and drift away from the exact sums in the database, from which restarts
        seed the counters. Why micro-USD here and nano-USD in records (meter.billing.rating): Redis
        keeps the counters as Lua numbers, doubles exact only below 2^53 — $9 billion in micro-USD,
        only $9 million in nano-USD, which a large team's budget period can pass.
Rule 2 ("not reported" is not zero): settling a request whose usage is unknown charges its whole
        estimate, never nothing (:func:`actual_spend`).

This module is pure: it imports nothing from redis, litestar, httpx or SQLAlchemy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import ROUND_CEILING, ROUND_HALF_EVEN, Decimal
from typing import Protocol

from meter.records import Usage
from meter.tap.request import RequestInfo

MICROS = Decimal(1_000_000)


class Price(Protocol):
    """USD per one million tokens. ``cached_input`` None: cached prompt tokens cost ``input``."""

    @property
    def input(self) -> Decimal: ...

    @property
    def cached_input(self) -> Decimal | None: ...

    @property
    def output(self) -> Decimal: ...


PriceFn = Callable[[str | None], Price | None]


def to_micros(usd: Decimal) -> int:
    """Integer micro-USD, rounded up (Rule 1)."""
    return int((usd * MICROS).to_integral_value(ROUND_CEILING))


def from_micros(micros: int) -> Decimal:
    return Decimal(micros) / MICROS


def cost_usd(price: Price, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> Decimal:
    """Exact cost; ``cached_tokens`` are part of ``prompt_tokens``."""
    cached = min(max(cached_tokens, 0), prompt_tokens)
    cached_price = price.cached_input if price.cached_input is not None else price.input
    return (
        (prompt_tokens - cached) * price.input + cached * cached_price + completion_tokens * price.output
    ) / MICROS


@dataclass(frozen=True, slots=True)
class Estimate:
    """What admission reserves for one request."""

    prompt_tokens: int
    completion_tokens: int
    cost_usd: Decimal
    model: str | None = None
    cost_micros: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "cost_micros", to_micros(self.cost_usd))

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def requested(self) -> tuple[int, ...]:
        """What the request asks of each limit, by LimitKind rank."""
        total = self.prompt_tokens + self.completion_tokens
        return (self.cost_micros, total, self.prompt_tokens, self.completion_tokens, 1, total, 1)


ZERO_ESTIMATE = Estimate(0, 0, Decimal(0))
# Chat templates add a few tokens per message (role markers, separators: 4-7 for Llama 3 and ChatML);
# the text estimate (ceil(chars / 4)) knows nothing of them, and the reservation must not fall short.
TEMPLATE_TOKENS_PER_MESSAGE = 8
_OUTPUT_CAPS = ("max_completion_tokens", "max_tokens", "max_output_tokens")


def _count(value: object) -> int | None:
    """A token cap or choice count as a lenient upstream reads it (pydantic's lax mode, say): an
    integer, a float with no fraction, or a string of digits. None for anything else, or negative."""
    if type(value) is int:
        return value if value >= 0 else None
    if type(value) is float and value.is_integer() and value >= 0:
        return int(value)
    if type(value) is str and 0 < len(value) <= 20 and value.strip().isdigit():
        return int(value)
    return None


def estimate(
    info: RequestInfo, price: Price | None, default_max_tokens: int, *, endpoint: str | None = None
) -> Estimate:
    """A conservative reservation for a request: the prompt estimate from the body (plus
    ``TEMPLATE_TOKENS_PER_MESSAGE`` per chat message) plus the output cap
    (``max_completion_tokens``, ``max_tokens`` or ``max_output_tokens``; ``default_max_tokens`` when
    absent) times ``n``, all priced at the full input and output price. Embeddings reserve no output.
    An empty body reserves nothing (it still counts as a request); a body meter cannot read (a file
    upload, a compressed or malformed body) reserves ``default_max_tokens`` of output, at least one,
    so no layout passes a token limit unreserved. Unpriced models reserve $0 (their tokens still
    count against token budgets and ``tpm``)."""
    body = info.json
    if body is None:
        if not info.unreadable_bytes:
            return Estimate(0, 0, Decimal(0), info.model)
        completion = max(default_max_tokens, 1)
        cost = cost_usd(price, 0, completion) if price is not None else Decimal(0)
        return Estimate(0, completion, cost, info.model)
    prompt = info.prompt_tokens_estimate or 0
    messages = body.get("messages")
    if type(messages) is list:  # the chat template wraps every message in tokens of its own
        prompt += TEMPLATE_TOKENS_PER_MESSAGE * len(messages)
    if endpoint is not None and endpoint.endswith("/embeddings"):
        completion = 0
    else:
        cap = next(
            (v for v in (_count(body.get(name)) for name in _OUTPUT_CAPS) if v is not None),
            default_max_tokens,
        )
        n = _count(body.get("n"))
        completion = cap * (n if n is not None and n > 1 else 1)
    cost = cost_usd(price, prompt, completion) if price is not None else Decimal(0)
    return Estimate(prompt, completion, cost, info.model)


@dataclass(frozen=True, slots=True)
class Spend:
    """What a request actually used (or a rollup's period total, for seeding)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cost_usd: Decimal = Decimal(0)

    @property
    def cost_micros(self) -> int:
        return int((self.cost_usd * MICROS).to_integral_value(ROUND_HALF_EVEN))


def actual_spend(estimate: Estimate, usage: Usage | None, cost: Decimal | None, price: Price | None) -> Spend:
    """The spend to settle. "Not reported is not zero": ``usage`` None (consumption unknown, e.g. a
    stream cut before any usage) charges the whole estimate; a missing field falls back to the
    estimate's value. ``cost`` None is computed from the tokens and ``price`` (the estimate's cost
    when the model is unpriced). Pass ``Usage(prompt_tokens=0, completion_tokens=0)`` for a request
    that consumed nothing (the upstream refused it)."""
    if usage is None:
        return Spend(
            estimate.prompt_tokens, estimate.completion_tokens, estimate.total_tokens, estimate.cost_usd
        )
    prompt = usage.prompt_tokens if usage.prompt_tokens is not None else estimate.prompt_tokens
    if usage.completion_tokens is not None:
        completion = usage.completion_tokens
    elif usage.total_tokens is not None and usage.prompt_tokens is not None:
        completion = max(usage.total_tokens - usage.prompt_tokens, 0)
    else:
        completion = estimate.completion_tokens
    total = usage.total_tokens if usage.total_tokens is not None else prompt + completion
    if cost is None:
        if price is not None:
            cost = cost_usd(price, prompt, completion, usage.cached_tokens or 0)
        else:
            cost = estimate.cost_usd
    return Spend(prompt, completion, total, cost)
