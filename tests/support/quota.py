"""What the quota tests share: the machine's Redis with a key prefix per test, the store and clock
values of the contract suite, and an admission over a flat price and a store that counts its calls."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import orjson
import pytest
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis
from redis.exceptions import RedisError

from meter.errors import StoreUnavailable
from meter.quota.admission import Admission, AdmissionConfig
from meter.quota.memory import MemoryStore
from meter.quota.periods import Period
from meter.quota.policy import Limits, Policy, Subject
from meter.quota.redis_store import connect
from meter.quota.spend import Estimate, Spend
from meter.quota.store import QuotaStore, Refusal, Reservation, Settlement, SubjectState
from meter.tap.request import inspect_request

REDIS_URL = "redis://127.0.0.1:6379/0"
T0 = datetime(2025, 3, 14, 12, 0, tzinfo=UTC)
TEAM = Subject("team", "acme")
EST = Estimate(100, 200, Decimal("0.0005"), "m")  # reserves 500 micro-USD, 300 tokens
EST_MICROS = 500


def usd(micros: int) -> Decimal:
    return Decimal(micros) / Decimal(1_000_000)


@dataclass
class RedisHandle:
    client: Redis
    prefix: str


@asynccontextmanager
async def redis_for_test() -> AsyncIterator[RedisHandle]:
    """A client and a key prefix of its own; the prefix's keys are deleted afterwards."""
    client = connect(REDIS_URL, timeout=10.0)
    try:
        await client.ping()
    except (RedisError, OSError) as exc:
        await client.aclose()
        pytest.fail(f"the quota tests need Redis at {REDIS_URL}: {exc!r}")
    prefix = f"meter-test:{uuid.uuid4().hex}:"
    try:
        yield RedisHandle(client, prefix)
    finally:
        keys = [key async for key in client.scan_iter(match=prefix + "*", count=1000)]
        if keys:
            await client.delete(*keys)
        await client.aclose()


StoreFactory = Callable[..., QuotaStore]


# --- admission ----------------------------------------------------------------------------------------

FP = "ab" * 32


@dataclass(frozen=True)
class FlatPrice:
    input: Decimal = Decimal("1")  # USD per 1M tokens
    cached_input: Decimal | None = Decimal("0.5")
    output: Decimal = Decimal("2")


def price(model: str | None) -> FlatPrice | None:
    return FlatPrice() if model == "m" else None


def body(max_tokens: int | None = 200, model: str = "m", **extra: Any) -> bytes:
    payload: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": "x" * 368}], **extra}
    if max_tokens is not None:
        payload["max_tokens"] = max_tokens
    return orjson.dumps(payload)


# 92 + 8 (chat template) = 100 prompt tokens + 200 output tokens = $0.0005 at FlatPrice
INFO = inspect_request(body())


class CountingStore:
    """The real in-memory store, counting calls and failing on demand (for the failure policy)."""

    def __init__(self, inner: QuotaStore | None = None) -> None:
        self.inner = inner or MemoryStore()
        self.name = self.inner.name
        self.tz = self.inner.tz
        self.calls = 0
        self.down = False

    @property
    def ordered(self) -> bool:
        return self.inner.ordered  # (a subclass whose settle awaits first says False)

    def _enter(self) -> None:
        self.calls += 1
        if self.down:
            raise StoreUnavailable(self.name, ConnectionError("down"))

    async def reserve(
        self, policies: Sequence[Policy], estimate: Estimate, now: datetime
    ) -> Reservation | Refusal:
        self._enter()
        return await self.inner.reserve(policies, estimate, now)

    async def settle(self, reservation: Reservation, spend: Spend, now: datetime) -> Settlement:
        self._enter()
        return await self.inner.settle(reservation, spend, now)

    async def status(self, policies: Sequence[Policy], now: datetime) -> tuple[SubjectState, ...]:
        self._enter()
        return await self.inner.status(policies, now)

    async def seed_spent(
        self, subject: Subject, period: Period, period_start: datetime, spend: Spend, now: datetime
    ) -> bool:
        self._enter()
        return await self.inner.seed_spent(subject, period, period_start, spend, now)

    async def aclose(self) -> None:
        await self.inner.aclose()


def make_admission(
    store: QuotaStore,
    team: Limits | None = None,
    key: Limits | None = None,
    *,
    fingerprint: str = FP,
    **config: Any,
) -> tuple[Admission, CollectorRegistry]:
    """``team`` limits apply to team "acme", ``key`` limits to the key ``fingerprint``."""
    registry = CollectorRegistry()

    def lookup(team_name: str, key_fp: str | None) -> tuple[Limits | None, Limits | None]:
        return (team if team_name == "acme" else None, key if key_fp == fingerprint else None)

    admission = Admission(store, lookup, price, registry=registry, config=AdmissionConfig(**config))
    return admission, registry
