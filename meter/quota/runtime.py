"""Composition of quotas for a running meter: the store the settings ask for, the admission the proxy
calls, and the seeder that rebuilds budget counters from the database.

Store: :class:`~meter.quota.redis_store.RedisStore` when ``METER_REDIS_URL`` is set (one set of
counters for every replica and worker), else :class:`~meter.quota.memory.MemoryStore` (this process
only: with several replicas or ``--workers N`` each one enforces the whole limit on its own).

Seeding (budget state survives restarts): for every subject with a budget, the spend of its current
period is summed from the ``usage_hourly`` rollups and written to the store unless the store already
holds that period's counters (a Redis that other replicas keep current wins). It runs before the
first request is admitted, after every reload of the key directory (a budget just set is seeded within
one refresh interval) and every ``RESEED_INTERVAL`` seconds (a Redis that lost its data, or a new
period, is seeded again). A failure is logged and retried at the next round; the failure policy of
admission decides meanwhile.

Gauges: every ``GAUGE_INTERVAL`` seconds the team gauges (``meter_budget_remaining_usd`` ...) are set
from the store, so they converge on the true counters also when no request moves them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

from prometheus_client import CollectorRegistry
from sqlalchemy.ext.asyncio import AsyncEngine

from meter.billing.prices import Price
from meter.db.engine import describe_error
from meter.quota.admission import Admission, AdmissionConfig
from meter.quota.memory import MemoryStore
from meter.quota.policy import Limits, Subject
from meter.quota.seeding import period_spend
from meter.quota.store import QuotaStore
from meter.settings import Settings
from meter.tenancy.runtime import Tenancy

log = logging.getLogger("meter.quota")

RESEED_INTERVAL = 60.0
GAUGE_INTERVAL = 15.0  # seconds between refreshes of the team gauges from the store


def _has_budget(limits: Limits) -> bool:
    return any(v is not None for v in limits.by_rank[:4])


def create_store(settings: Settings) -> QuotaStore:
    tz = ZoneInfo(settings.quota_timezone)
    if settings.redis_url is None:
        return MemoryStore(tz=tz, lease_seconds=settings.quota_lease_seconds)
    from meter.quota.redis_store import RedisStore, connect

    client = connect(
        settings.redis_url, timeout=settings.quota_timeout, max_connections=settings.quota_max_connections
    )
    return RedisStore(
        client,
        prefix=settings.quota_prefix,
        tz=tz,
        lease_seconds=settings.quota_lease_seconds,
        server_time=settings.quota_server_time,
        settle_linger=settings.quota_settle_linger,
    )


class Quotas:
    """One per process: the admission the proxy calls, kept seeded from the database."""

    def __init__(self, settings: Settings, tenancy: Tenancy, registry: CollectorRegistry) -> None:
        self.tenancy = tenancy
        self.store = create_store(settings)
        self.admission = Admission(
            self.store,
            tenancy.limits,
            self._price,
            registry=registry,
            config=AdmissionConfig(
                default_max_tokens=settings.quota_default_max_tokens,
                budget_failure=settings.quota_budget_failure,  # type: ignore[arg-type]
                rate_failure=settings.quota_rate_failure,  # type: ignore[arg-type]
                retry_store_after=settings.quota_retry_store_after,
            ),
        )
        self._engine: AsyncEngine | None = None
        self._task: asyncio.Task[None] | None = None
        self._seed_lock = asyncio.Lock()

    def _price(self, model: str | None) -> Price | None:
        row = self.tenancy.prices.catalog.lookup(model, datetime.now(UTC))
        return None if row is None else row.price

    async def start(self, engine: AsyncEngine) -> None:
        """Seed once (before the first admission), then keep seeding in the background."""
        self._engine = engine
        await self.seed()
        self.tenancy.add_reload_listener(self.seed)
        self._task = asyncio.create_task(self._run(), name="meter-quota-seed")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        with contextlib.suppress(Exception):
            await self.store.aclose()

    async def seed(self) -> int:
        """Seed every budgeted subject's current period (module doc); returns how many the store took.
        Never raises: a failure is logged and the next round retries."""
        if self._engine is None:
            return 0
        async with self._seed_lock:
            subjects = [(s, lim) for s, lim in self.tenancy.limited_subjects() if _has_budget(lim)]
            seeded = 0
            try:
                for subject, limits in subjects:
                    seeded += await self._seed_one(subject, limits)
            except Exception as exc:
                log.warning("seeding quota budgets from the database failed: %s", describe_error(exc))
            return seeded

    async def _seed_one(self, subject: Subject, limits: Limits) -> bool:
        assert self._engine is not None
        now = datetime.now(UTC)
        start, end = self.admission.period_of(limits, now)
        async with self._engine.connect() as conn:
            spend = await period_spend(conn, subject, start, end)
        return await self.admission.seed(subject, limits, spend, now)

    async def refresh_gauges(self) -> None:
        """Never raises (a store failure is already counted by admission's calls)."""
        teams = [(s.name, lim) for s, lim in self.tenancy.limited_subjects() if s.kind == "team"]
        try:
            await self.admission.refresh_gauges(teams, datetime.now(UTC))
        except Exception as exc:
            log.debug("refreshing the quota gauges failed: %s", exc)

    async def _run(self) -> None:
        rounds_per_seed = max(1, round(RESEED_INTERVAL / GAUGE_INTERVAL))
        tick = 0
        while True:
            await asyncio.sleep(GAUGE_INTERVAL)
            tick += 1
            if tick % rounds_per_seed == 0:
                await self.seed()
            await self.refresh_gauges()
