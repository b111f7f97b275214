"""Raw-event retention: usage events older than ``retention_days`` leave the database, their hourly
rollups stay.

Rule 1: deletion runs at the pipeline's start and then every ``interval`` seconds (hourly by
        default), in chunks (:func:`~meter.db.rollups.delete_events_before`); the rollups keep the
        deleted events' sums.
Rule 2: a journaled record that already started before the cutoff is dead-lettered ("expired")
        instead of written: once its raw row may have been deleted, the insert can no longer tell a
        replay from a first write, and writing it could count it twice.

Failure policy: a failed deletion run is logged and tried again ``interval`` seconds later; the
request path never notices.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from prometheus_client import Counter
from sqlalchemy.ext.asyncio import AsyncEngine

from meter.db.engine import describe_error
from meter.db.rollups import delete_events_before
from meter.journal.payload import payload_started_at

logger = logging.getLogger(__name__)

RETENTION_INTERVAL_S = 3600.0


class Retention:
    """The retention window of ``days`` days, measured back from ``clock()`` (epoch seconds).
    Counts deleted events on ``deleted``."""

    def __init__(
        self,
        engine: AsyncEngine,
        days: float,
        *,
        clock: Callable[[], float],
        deleted: Counter,
        interval: float = RETENTION_INTERVAL_S,
    ) -> None:
        if days <= 0:
            raise ValueError(f"retention_days must be positive, got {days}")
        self.window = timedelta(days=days)
        self._engine = engine
        self._clock = clock
        self._deleted = deleted
        self._interval = interval

    def cutoff(self) -> datetime:
        """Events that started before this are past retention."""
        return datetime.fromtimestamp(self._clock(), UTC) - self.window

    def split_expired(self, payloads: list[bytes]) -> tuple[list[bytes], list[bytes]]:
        """``payloads`` as (still to be written, expired: to be dead-lettered) (Rule 2)."""
        cutoff = self.cutoff()
        live: list[bytes] = []
        expired: list[bytes] = []
        for payload in payloads:
            try:
                started = payload_started_at(payload)
            except ValueError:
                live.append(payload)  # not a record at all: the writer will reject it
                continue
            started = started.replace(tzinfo=UTC) if started.tzinfo is None else started
            (expired if started < cutoff else live).append(payload)
        return live, expired

    async def run(self) -> int:
        """Delete raw events older than the window now (Rule 1); returns how many."""
        cutoff = self.cutoff()
        deleted = await delete_events_before(self._engine, cutoff)
        self._deleted.inc(deleted)
        if deleted:
            logger.info("retention: deleted %d raw usage events that started before %s", deleted, cutoff)
        return deleted

    async def loop(self) -> None:
        """:meth:`run` now and every ``interval`` seconds, until cancelled."""
        while True:
            try:
                await self.run()
            except Exception as exc:
                logger.warning(
                    "raw-event retention failed (%s); retrying in %gs",
                    describe_error(exc),
                    self._interval,
                )
            await asyncio.sleep(self._interval)
