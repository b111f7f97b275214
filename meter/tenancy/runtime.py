"""Composition of tenancy for a running meter: the key directory, the price book, the admin store and
the background refresher that keeps every replica's caches current.

The composition root builds one :class:`Tenancy`, starts it after the database engine exists and
stops it before disposing the engine; the proxy calls :meth:`Tenancy.resolve` per request and the
usage path :meth:`Tenancy.price` per record; quota admission calls :meth:`Tenancy.limits` per request
(its ``PolicyLookup``); the admin API and CLI use :attr:`Tenancy.store`.

Refresh loop (every ``refresh_interval`` seconds): read ``tenancy_state.version``; if it differs from
the version last loaded, reload keys, teams (with their quota limits) and prices; then write the key
last-use times noted since the previous round. An admin write made through this process's store
reloads at once (local invalidation), so the replica that took the change never serves the old state.
After every successful reload (the first included) the reload listeners run, in the order they were
added (e.g. quota seeding of subjects that just got a budget); a listener that fails is logged and
never fails the reload. Reloads can overlap (the loop and an admin write), so can listeners: they
should be idempotent.

Failure policy: see :mod:`meter.tenancy.directory` (fail-closed before the first load, fail-static
after); every failed refresh is logged and counted in ``meter_key_directory_refresh_errors_total``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from prometheus_client import CollectorRegistry, Counter
from sqlalchemy.ext.asyncio import AsyncEngine

from meter.billing.catalog import PriceBook
from meter.billing.prices import PriceRow, default_price_rows
from meter.billing.rating import UsageView, price_record
from meter.db.engine import describe_error
from meter.quota.policy import Limits, Subject
from meter.records import Usage, UsageRecord
from meter.tenancy.audit import current_version
from meter.tenancy.credentials import UpstreamCredentials
from meter.tenancy.directory import KeyDirectory
from meter.tenancy.identity import KeyFingerprinter
from meter.tenancy.keys import Resolution, UnknownKeyPolicy
from meter.tenancy.store import TenancyStore

log = logging.getLogger("meter.tenancy")

DEFAULT_REFRESH_INTERVAL = 2.0


@dataclass(frozen=True, slots=True)
class TenancyConfig:
    """What the composition root passes in, from Settings (parsed and validated at start)."""

    unknown_keys: UnknownKeyPolicy = UnknownKeyPolicy.ALLOW
    refresh_interval: float = DEFAULT_REFRESH_INTERVAL
    upstream_api_key: str | None = field(default=None, repr=False)  # METER_UPSTREAM_API_KEY
    credentials: Mapping[str, str] = field(default_factory=dict, repr=False)  # the credentials file
    price_file_rows: Sequence[PriceRow] = ()  # METER_PRICE_FILE, already parsed


def config_from_settings(settings: Any) -> TenancyConfig:
    """A :class:`TenancyConfig` from meter's Settings, reading the files they name now, so a bad
    credentials or price file stops start-up with a message naming it. Settings fields used (all
    optional, defaults in brackets): ``unknown_keys`` ["allow"], ``key_directory_refresh`` [2.0],
    ``upstream_api_key``, ``upstream_credentials_file``, ``price_file``."""
    from meter.billing.prices import load_price_file
    from meter.errors import SettingsError
    from meter.tenancy.credentials import load_credentials_file

    credentials_file = getattr(settings, "upstream_credentials_file", None)
    price_file = getattr(settings, "price_file", None)
    try:
        credentials = load_credentials_file(credentials_file) if credentials_file else {}
    except ValueError as exc:
        raise SettingsError(f"invalid METER_UPSTREAM_CREDENTIALS_FILE: {exc}") from None
    try:
        price_rows = load_price_file(price_file) if price_file else []
    except (OSError, ValueError) as exc:
        raise SettingsError(f"invalid METER_PRICE_FILE: {exc}") from None
    return TenancyConfig(
        unknown_keys=UnknownKeyPolicy(getattr(settings, "unknown_keys", None) or "allow"),
        refresh_interval=float(getattr(settings, "key_directory_refresh", None) or DEFAULT_REFRESH_INTERVAL),
        upstream_api_key=getattr(settings, "upstream_api_key", None),
        credentials=credentials,
        price_file_rows=price_rows,
    )


class TenancyMetrics:
    """Refresh failures. (Unpriced records are counted by ProxyMetrics from ``record.cost_usd``:
    ``meter_unpriced_requests_total``.)"""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.refresh_errors = Counter(
            "meter_key_directory_refresh_errors",
            "Failed reloads of the key directory and price catalog (the last good copy keeps serving).",
            registry=registry,
        )


class Tenancy:
    """One per process: resolve keys and price records from memory; keep both current (module doc)."""

    def __init__(
        self,
        fingerprinter: KeyFingerprinter,
        config: TenancyConfig,
        *,
        registry: CollectorRegistry | None = None,
        sheet_rows: Sequence[PriceRow] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.fingerprinter = fingerprinter
        self.credentials = UpstreamCredentials(config.upstream_api_key, dict(config.credentials))
        self.directory = KeyDirectory(
            fingerprinter, self.credentials, policy=config.unknown_keys, clock=clock
        )
        self.prices = PriceBook(
            default_price_rows() if sheet_rows is None else sheet_rows, config.price_file_rows
        )
        self.metrics = TenancyMetrics(registry) if registry is not None else None
        self._clock = clock
        self._engine: AsyncEngine | None = None
        self._store: TenancyStore | None = None
        self._version: int | None = None
        self._task: asyncio.Task[None] | None = None
        self._reload_listeners: list[Callable[[], Awaitable[object]]] = []

    # -- request path ----------------------------------------------------------------------------

    def resolve(self, key: str | None) -> Resolution:
        """See :meth:`KeyDirectory.resolve`."""
        return self.directory.resolve(key)

    def limits(self, team: str, key_fp: str | None) -> tuple[Limits | None, Limits | None]:
        """``(team limits, key limits)`` of a request, None where none are set: two dict lookups in
        memory (meter.quota.admission's ``PolicyLookup``; it runs on every proxied request)."""
        directory = self.directory
        return directory.team_limits.get(team), directory.key_limits.get(key_fp)

    def limited_subjects(self) -> list[tuple[Subject, Limits]]:
        """Every team and key with non-empty limits (keys by fingerprint; revoked keys left out), as
        last loaded: teams first, by name, then keys by fingerprint."""
        directory = self.directory
        teams = sorted((name, limits) for name, limits in directory.team_limits.items() if name)
        keys = sorted((fp, limits) for fp, limits in directory.key_limits.items() if fp)
        return [(Subject("team", name), limits) for name, limits in teams] + [
            (Subject("key", fp), limits) for fp, limits in keys
        ]

    def add_reload_listener(self, callback: Callable[[], Awaitable[object]]) -> None:
        """Run ``await callback()`` after every successful reload (module doc). Add it before
        :meth:`start` to see the first load."""
        self._reload_listeners.append(callback)

    def cost(
        self, started_at: datetime, requested_model: str | None, response_model: str | None, usage: Usage
    ) -> tuple[int | None, str | None]:
        """``(cost_nanos, price_ref)`` for a record about to be built (meter.billing.rating); the cheaper
        way in for the proxy, which then passes both to the UsageRecord it constructs. Never raises."""
        try:
            return price_record(
                UsageView(started_at, requested_model, response_model, usage), self.prices.catalog
            )
        except Exception:
            log.exception("pricing failed; the record is stored unpriced")
            return None, None

    def price(self, record: UsageRecord) -> UsageRecord:
        """``record`` with ``cost_nanos`` and ``price_ref`` filled in from the current catalog
        (meter.billing.rating). Never raises: a pricing bug leaves the record unpriced and logged rather than
        losing it."""
        try:
            cost_nanos, ref = price_record(record, self.prices.catalog)
        except Exception:
            log.exception("pricing record %s failed; stored unpriced", record.event_id)
            cost_nanos, ref = None, None
        return dataclasses.replace(record, cost_nanos=cost_nanos, price_ref=ref)

    # -- lifecycle -------------------------------------------------------------------------------

    @property
    def store(self) -> TenancyStore:
        if self._store is None:
            raise RuntimeError("Tenancy.start() has not run")
        return self._store

    @property
    def loaded(self) -> bool:
        return self.directory.loaded

    async def start(self, engine: AsyncEngine) -> None:
        """Load once (a failure is logged; the loop retries) and start the refresh loop."""
        self._engine = engine
        self._store = TenancyStore(
            engine,
            self.fingerprinter,
            credential_names=set(self.credentials.named),
            on_change=self._reload_after_write,
        )
        try:
            await self.reload()
        except Exception as exc:
            self._refresh_failed(exc)
        self._task = asyncio.create_task(self._run(), name="meter-tenancy-refresh")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        with contextlib.suppress(Exception):
            await self._flush_last_used()

    async def reload(self) -> None:
        """Reload keys, teams and prices now (the version is read first, so a write racing with the
        load is seen again at the next poll)."""
        if self._engine is None:
            raise RuntimeError("Tenancy.start() has not run")
        async with self._engine.connect() as conn:
            version = await current_version(conn)
            await self.directory.load(conn)
            await self.prices.load(conn)
        self._version = version
        if self.directory.unreadable_limits and self.metrics is not None:
            self.metrics.refresh_errors.inc(self.directory.unreadable_limits)
        for callback in list(self._reload_listeners):
            try:
                await callback()
            except Exception:
                log.exception("a tenancy reload listener failed (the reload itself succeeded)")

    async def _reload_after_write(self) -> None:
        # The write is committed: a failed reload must not turn it into an error; the loop catches up.
        try:
            await self.reload()
        except Exception as exc:
            self._refresh_failed(exc)

    async def refresh(self) -> bool:
        """One round of the loop: reload if the version moved (True if it did), flush last-use times."""
        if self._engine is None:
            raise RuntimeError("Tenancy.start() has not run")
        reloaded = False
        async with self._engine.connect() as conn:
            version = await current_version(conn)
        if version != self._version or not self.directory.loaded:
            await self.reload()
            reloaded = True
        await self._flush_last_used()
        return reloaded

    async def _flush_last_used(self) -> None:
        used = self.directory.take_last_used()
        if not used or self._store is None:
            return
        try:
            await self._store.touch_keys(used)
        except Exception:
            self.directory.restore_last_used(used)
            raise

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.config.refresh_interval)
            try:
                await self.refresh()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._refresh_failed(exc)

    def _refresh_failed(self, exc: Exception) -> None:
        log.warning("tenancy refresh failed (serving the last good copy): %s", describe_error(exc))
        if self.metrics is not None:
            self.metrics.refresh_errors.inc()

    def describe(self) -> dict[str, Any]:
        """For readiness and debugging: no secrets."""
        return {
            "loaded": self.directory.loaded,
            "keys": len(self.directory),
            "version": self._version,
            "unknown_keys": self.config.unknown_keys.value,
            "credentials": sorted(self.credentials.named),
            "default_credential": self.credentials.default is not None,
        }
