"""What every part of :class:`~meter.tenancy.store.TenancyStore` shares: the engine, the clock, the
hook that runs after a committed change, and the checks that turn bad input into 400s.

Rule 1: ``on_change`` runs after the commit, never inside the transaction, so the process that made a
        change sees it at once and a failed change reloads nothing (meter.tenancy.store, Rule 1).
Rule 2: a check that fails raises :class:`~meter.errors.RequestError` naming the offending parameter
        (meter.tenancy.store, Rule 2).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from meter.errors import RequestError
from meter.tenancy.audit import Clock, utc_now
from meter.tenancy.identity import KeyFingerprinter


class StoreBase:
    """The state of a tenancy store; the parts (teams, keys) add the operations."""

    def __init__(
        self,
        engine: AsyncEngine,
        fingerprinter: KeyFingerprinter,
        *,
        credential_names: Collection[str] | None = None,
        on_change: Callable[[], Awaitable[None]] | None = None,
        clock: Clock = utc_now,
    ) -> None:
        self.engine = engine
        self._fingerprinter = fingerprinter
        self._credential_names = None if credential_names is None else frozenset(credential_names)
        self._on_change = on_change
        self.clock = clock

    async def _changed(self) -> None:
        if self._on_change is not None:
            await self._on_change()


def checked(check: Callable[[Any], Any], value: Any, param: str) -> Any:
    try:
        return check(value)
    except ValueError as exc:
        raise RequestError(str(exc), param=param) from None


def text(value: Any, param: str, limit: int = 1024) -> str:
    if not isinstance(value, str) or len(value) > limit:
        raise RequestError(f"{param} must be a string of at most {limit} characters", param=param)
    return value


def aware(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
