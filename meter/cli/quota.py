"""``meter quota set|clear|show|status``: quota limits from the command line.

``set``, ``clear`` and ``show`` work on the database like the other management commands
(:mod:`meter.cli.context`), through the same store as the admin API, audited as ``cli:<user>``; a
running meter applies a change within its refresh interval.

``status`` runs without a proxy, so it cannot ask one. With ``METER_REDIS_URL`` set it reads the live
counters every replica shares from Redis; otherwise it sums the current period's spend from the
database's hourly rollups, which know neither rate windows, requests in flight nor reservations (shown
as ``-``). Its output names the source it used.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import click
from sqlalchemy.ext.asyncio import AsyncEngine

from meter.cli.context import (
    actor,
    database_option,
    echo_json,
    echo_rows,
    open_store,
    option_errors,
    run_action,
    table_or_json_option,
)
from meter.redact import mask_url

team_option = click.option("--team", "team_name", default=None, help="The team.")
key_option = click.option("--key", "key_id", type=int, default=None, help="The key, by id (meter key list).")
# Limits field → the option that sets it, for error messages.
OPTIONS = {
    "budget_usd": "--budget-usd",
    "budget_period": "--period",
    "tokens_budget": "--tokens-budget",
    "prompt_tokens_budget": "--prompt-tokens-budget",
    "completion_tokens_budget": "--completion-tokens-budget",
    "rpm": "--rpm",
    "tpm": "--tpm",
    "max_concurrent": "--max-concurrent",
    "soft_ratio": "--soft-ratio",
}


def _one_subject(team_name: str | None, key_id: int | None) -> None:
    if (team_name is None) == (key_id is None):
        raise click.UsageError("give exactly one of --team or --key")


def _subject_text(team_name: str | None, key_id: int | None) -> str:
    return f"team {team_name}" if team_name is not None else f"key {key_id}"


@click.group()
def quota() -> None:
    """Quota limits of teams and keys: set, clear, show, status."""


@quota.command("set")
@team_option
@key_option
@click.option("--budget-usd", default=None, help="USD budget per period, e.g. 25.00.")
@click.option(
    "--period",
    type=click.Choice(["day", "week", "month"]),
    default="month",
    show_default=True,
    help="The budget period (for every budget).",
)
@click.option("--tokens-budget", type=int, default=None, help="Total tokens per period.")
@click.option("--prompt-tokens-budget", type=int, default=None, help="Prompt tokens per period.")
@click.option("--completion-tokens-budget", type=int, default=None, help="Completion tokens per period.")
@click.option("--rpm", type=int, default=None, help="Requests per minute (sliding 60 s window).")
@click.option("--tpm", type=int, default=None, help="Tokens per minute (sliding 60 s window).")
@click.option("--max-concurrent", type=int, default=None, help="Requests in flight at once.")
@click.option("--soft-ratio", default=None, help="Share of a budget that raises the soft-limit alert [0.8].")
@database_option
def quota_set(
    team_name: str | None,
    key_id: int | None,
    budget_usd: str | None,
    period: str,
    tokens_budget: int | None,
    prompt_tokens_budget: int | None,
    completion_tokens_budget: int | None,
    rpm: int | None,
    tpm: int | None,
    max_concurrent: int | None,
    soft_ratio: str | None,
    database_url: str | None,
) -> None:
    """Set the quota limits of a team or key, replacing all of its previous ones (a limit not given
    is removed). A request must pass both its team's and its key's limits."""
    from meter.quota.report import limits_summary
    from meter.tenancy.limits import parse_limits

    _one_subject(team_name, key_id)
    values: dict[str, Any] = {
        "budget_usd": budget_usd,
        "budget_period": period,
        "tokens_budget": tokens_budget,
        "prompt_tokens_budget": prompt_tokens_budget,
        "completion_tokens_budget": completion_tokens_budget,
        "rpm": rpm,
        "tpm": tpm,
        "max_concurrent": max_concurrent,
        "soft_ratio": soft_ratio,
    }
    with option_errors(by_param=OPTIONS):
        limits = parse_limits(values)
    if limits.is_empty:
        raise click.UsageError("give at least one limit; `meter quota clear` removes them all")

    async def action(engine: AsyncEngine, settings: Any) -> Any:
        store = open_store(engine, settings)
        if team_name is not None:
            return (await store.set_team_limits(team_name, limits, actor=actor())).limits
        return (await store.set_key_limits(key_id, limits, actor=actor())).limits

    stored = run_action(database_url, action)
    click.echo(f"limits of {_subject_text(team_name, key_id)} set: {limits_summary(stored)}")


@quota.command("clear")
@team_option
@key_option
@database_option
def quota_clear(team_name: str | None, key_id: int | None, database_url: str | None) -> None:
    """Remove every quota limit of a team or key."""
    _one_subject(team_name, key_id)

    async def action(engine: AsyncEngine, settings: Any) -> None:
        store = open_store(engine, settings)
        if team_name is not None:
            await store.set_team_limits(team_name, None, actor=actor())
        else:
            await store.set_key_limits(key_id, None, actor=actor())

    run_action(database_url, action)
    click.echo(f"limits of {_subject_text(team_name, key_id)} cleared")


@quota.command("show")
@team_option
@key_option
@table_or_json_option
@database_option
def quota_show(team_name: str | None, key_id: int | None, fmt: str, database_url: str | None) -> None:
    """The quota limits of a team or key, as stored."""
    from meter.tenancy.limits import limits_json

    _one_subject(team_name, key_id)

    async def action(engine: AsyncEngine, settings: Any) -> dict[str, Any]:
        store = open_store(engine, settings)
        if team_name is not None:
            team = await store.get_team(team_name)
            return {"team": team.name, "limits": limits_json(team.limits)}
        key = await store.get_key(key_id)
        return {"key_id": key.id, "suffix": key.suffix, "team": key.team, "limits": limits_json(key.limits)}

    shown = run_action(database_url, action)
    if fmt == "json":
        echo_json(shown)
        return
    limits = shown["limits"]
    if limits is None:
        click.echo(f"{_subject_text(team_name, key_id)} has no limits")
        return
    echo_rows([{"limit": name, "value": value} for name, value in limits.items()], "table")


# -- status ---------------------------------------------------------------------------------------


@quota.command("status")
@team_option
@key_option
@table_or_json_option
@database_option
def quota_status(team_name: str | None, key_id: int | None, fmt: str, database_url: str | None) -> None:
    """Usage against every limit of a team and/or key (every subject with limits when neither is
    given): from Redis's live counters when METER_REDIS_URL is set, else from the database's hourly
    rollups (spend of the current period only)."""
    from meter.quota.report import render_status, status_rows

    async def action(engine: AsyncEngine, settings: Any) -> dict[str, Any]:
        store = open_store(engine, settings)
        subjects = await _subjects(store, team_name, key_id)
        now = datetime.now(UTC)
        if settings.redis_url:
            states = await _redis_states(settings, subjects, now)
            status = render_status(states, now, source="redis")
            status["redis"] = mask_url(settings.redis_url)
            return status
        return render_status(
            await _database_states(engine, settings, subjects, now), now, source="database", live=False
        )

    status = run_action(database_url, action)
    if fmt == "json":
        echo_json(status)
        return
    if status["source"] == "redis":
        click.echo(f"source: live counters in Redis ({status['redis']}), as every replica sees them")
    else:
        click.echo(
            "source: database rollups (no METER_REDIS_URL): spend of the current period; rate limits, "
            "requests in flight and reservations are known only to a running meter (-)"
        )
    echo_rows(status_rows(status), "table")


Subjects = list[tuple[dict[str, Any], Any, Any]]  # (who, Subject, Limits | None)


async def _subjects(store: Any, team_name: str | None, key_id: int | None) -> Subjects:
    """The subjects asked for (all with limits when none is): who to show, the Subject, its limits."""
    from meter.quota.policy import Subject

    out: Subjects = []
    if team_name is not None or key_id is not None:
        if team_name is not None:
            team = await store.get_team(team_name)
            out.append(({"kind": "team", "team": team.name}, Subject("team", team.name), team.limits))
        if key_id is not None:
            key = await store.get_key(key_id)
            who = {"kind": "key", "key_id": key.id, "suffix": key.suffix, "team": key.team}
            out.append((who, Subject("key", key.fingerprint), key.limits))
        return out
    for team in await store.list_teams():
        if team.limits is not None and not team.limits.is_empty:
            out.append(({"kind": "team", "team": team.name}, Subject("team", team.name), team.limits))
    for key in await store.list_keys():
        if key.limits is not None and not key.limits.is_empty and key.revoked_at is None:
            who = {"kind": "key", "key_id": key.id, "suffix": key.suffix, "team": key.team}
            out.append((who, Subject("key", key.fingerprint), key.limits))
    return out


async def _redis_states(
    settings: Any, subjects: Subjects, now: datetime
) -> Sequence[tuple[dict[str, Any], Any]]:
    from zoneinfo import ZoneInfo

    from meter.errors import StoreUnavailable
    from meter.quota.policy import Policy
    from meter.quota.redis_store import RedisStore, connect

    limited = [(who, Policy(subject, limits)) for who, subject, limits in subjects if _limited(limits)]
    store = RedisStore(
        connect(settings.redis_url, timeout=max(settings.quota_timeout, 2.0), max_connections=2),
        prefix=settings.quota_prefix,
        tz=ZoneInfo(settings.quota_timezone),
        server_time=settings.quota_server_time,
    )
    try:
        states = await store.status([policy for _, policy in limited], now) if limited else ()
    except StoreUnavailable as exc:
        raise click.ClickException(
            f"Redis at {mask_url(settings.redis_url)} cannot be reached ({exc.cause!r}); "
            "unset METER_REDIS_URL to read the spend from the database instead"
        ) from None
    finally:
        await store.aclose()
    by_subject = {state.subject: state for state in states}
    return [(who, by_subject.get(subject)) for who, subject, _ in subjects]


async def _database_states(
    engine: AsyncEngine, settings: Any, subjects: Subjects, now: datetime
) -> Sequence[tuple[dict[str, Any], Any]]:
    from zoneinfo import ZoneInfo

    from meter.quota.decision import Counters
    from meter.quota.periods import period_window
    from meter.quota.seeding import period_spend
    from meter.quota.store import SubjectState

    tz = ZoneInfo(settings.quota_timezone)
    out: list[tuple[dict[str, Any], Any]] = []
    async with engine.connect() as conn:
        for who, subject, limits in subjects:
            if not _limited(limits):
                out.append((who, None))
                continue
            start, end = period_window(limits.budget_period, now, tz)
            spend = await period_spend(conn, subject, start, end)
            counters = Counters(
                spent_micros=spend.cost_micros,
                tokens=spend.total_tokens,
                prompt_tokens=spend.prompt_tokens,
                completion_tokens=spend.completion_tokens,
            )
            out.append((who, SubjectState(subject, limits, start, end, counters)))
    return out


def _limited(limits: Any) -> bool:
    return limits is not None and not limits.is_empty
