"""What a report is asked for, parsed once for both ways of asking: the admin API's query parameters
(:mod:`meter.admin`) and the command line's options (:mod:`meter.cli`).

Rule 1: a value that cannot be parsed raises :class:`~meter.errors.RequestError` whose ``param`` names
        the parameter; the admin API answers it as a 400, the CLI turns it into a usage error naming
        the option (:func:`meter.cli.context.option_errors`).
Rule 2: times are ISO 8601 dates or datetimes; a naive one is UTC. Ranges are half-open
        (``since <= t < until``), as the queries take them (:mod:`meter.db.queries`, Rule 3).
"""

from __future__ import annotations

from datetime import UTC, date, datetime

from meter.billing.rating import month_range
from meter.db.queries import GROUPS
from meter.errors import RequestError


def parse_time(value: str | None, name: str) -> datetime | None:
    """ISO 8601 date or datetime as an aware datetime (naive values are UTC); None when not given."""
    if value is None or value == "":
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        try:
            parsed = datetime.combine(date.fromisoformat(value), datetime.min.time())
        except ValueError:
            raise RequestError(
                f"{name} must be an ISO 8601 date or datetime, got {value!r}", param=name
            ) from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def parse_group_by(value: str | None) -> list[str]:
    """A comma-separated subset of :data:`meter.db.queries.GROUPS`, in the order given."""
    if not value:
        return []
    groups = [part.strip() for part in value.split(",") if part.strip()]
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        raise RequestError(
            f"cannot group by {unknown[0]!r}; choose from {', '.join(GROUPS)}", param="group_by"
        )
    return groups


def billing_range(
    month: str | None, since: str | None, until: str | None
) -> tuple[datetime | None, datetime | None]:
    """The range of a billing report: a calendar month (UTC, ``2026-11``), or ``since``/``until``."""
    if month is not None:
        if since is not None or until is not None:
            raise RequestError("give month, or since/until, not both", param="month")
        try:
            return month_range(month)
        except ValueError as exc:
            raise RequestError(str(exc), param="month") from None
    return parse_time(since, "since"), parse_time(until, "until")
