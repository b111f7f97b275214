"""``meter key``: issue virtual keys, register passthrough keys, list, revoke and move them, through the
same store as the admin API (:mod:`meter.tenancy.store`), audited as ``cli:<user>``.

Rule 1: keys never appear on a command line (shell history): ``meter key register`` reads the provider
        key from standard input or a hidden prompt, and ``meter key issue`` prints the new virtual key
        once.
"""

from __future__ import annotations

import re
import sys
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import click
from sqlalchemy.ext.asyncio import AsyncEngine

from meter.cli.context import (
    actor,
    database_option,
    echo_rows,
    format_option,
    open_store,
    parse_time_option,
    run_action,
)

if TYPE_CHECKING:
    from meter.tenancy.key_store import KeyInfo

_DURATION = re.compile(r"(\d+)([smhd])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def key_row(key: KeyInfo, now: datetime) -> dict[str, Any]:
    """A key as a row of ``meter key list`` and ``meter team show``."""
    from meter.quota.report import limits_summary

    row = key.to_json(now)
    del row["object"]
    row["limits"] = limits_summary(key.limits)
    return row


def _expiry(expires_in: str | None, expires_at: str | None) -> datetime | None:
    if expires_in is not None and expires_at is not None:
        raise click.UsageError("give --expires-in or --expires-at, not both")
    if expires_at is not None:
        return parse_time_option(expires_at, "expires_at")
    if expires_in is None:
        return None
    match = _DURATION.fullmatch(expires_in.strip())
    if match is None:
        raise click.BadParameter("use a number and a unit: 90m, 12h, 30d", param_hint="--expires-in")
    return datetime.now(UTC) + timedelta(seconds=int(match.group(1)) * _UNITS[match.group(2)])


@click.group()
def key() -> None:
    """Keys: issue virtual keys, register passthrough keys, list, revoke, move."""


@key.command("issue")
@click.argument("team_name", metavar="TEAM")
@click.option("--name", default="", help="A label for the key.")
@click.option("--expires-in", default=None, help="e.g. 90m, 12h, 30d.")
@click.option("--expires-at", default=None, help="ISO date or datetime (UTC if no offset).")
@database_option
def key_issue(
    team_name: str, name: str, expires_in: str | None, expires_at: str | None, database_url: str | None
) -> None:
    """Issue a virtual key (mk-...) for TEAM. It is printed once and cannot be shown again."""
    expiry = _expiry(expires_in, expires_at)

    async def action(engine: AsyncEngine, settings: Any) -> Any:
        return await open_store(engine, settings).issue_virtual_key(
            actor(), team_name, name=name, expires_at=expiry
        )

    issued = run_action(database_url, action)
    click.echo(
        f"key id {issued.info.id} for team {team_name} ({issued.info.suffix}); store it now, it is not kept:",
        err=True,
    )
    click.echo(issued.key)


@key.command("register")
@click.argument("team_name", metavar="TEAM")
@click.option("--fingerprint", default=None, help="Register by fingerprint instead of by value.")
@click.option("--suffix", default=None, help="With --fingerprint: the display suffix (...abcd).")
@click.option("--name", default="", help="A label for the key.")
@database_option
def key_register(
    team_name: str, fingerprint: str | None, suffix: str | None, name: str, database_url: str | None
) -> None:
    """Register a provider key to TEAM: its usage is attributed to TEAM, the key is forwarded as is.

    Without --fingerprint the key is read from standard input (or a hidden prompt) and only its
    fingerprint is stored."""
    value: str | None = None
    if fingerprint is None:
        if sys.stdin.isatty():
            value = click.prompt("provider key", hide_input=True)
        else:
            value = sys.stdin.readline().strip()
        if not value:
            raise click.UsageError("no key given on standard input")

    async def action(engine: AsyncEngine, settings: Any) -> Any:
        return await open_store(engine, settings).register_passthrough_key(
            actor(), team_name, key=value, fingerprint=fingerprint, suffix=suffix, name=name
        )

    info = run_action(database_url, action)
    click.echo(f"key id {info.id} ({info.suffix or info.fingerprint[:12]}) registered to team {team_name}")


@key.command("list")
@click.option("--team", "team_name", default=None, help="Only this team's keys.")
@format_option
@database_option
def key_list(team_name: str | None, fmt: str, database_url: str | None) -> None:
    """Keys: id, team, kind, suffix, status, created, expires, last used."""

    async def action(engine: AsyncEngine, settings: Any) -> Any:
        store = open_store(engine, settings)
        return await store.list_keys(team_name), store.clock()

    keys, now = run_action(database_url, action)
    echo_rows([key_row(k, now) for k in keys], fmt)


@key.command("revoke")
@click.argument("key_id", type=int)
@database_option
def key_revoke(key_id: int, database_url: str | None) -> None:
    """Revoke key KEY_ID: requests with it get 401 within seconds."""

    async def action(engine: AsyncEngine, settings: Any) -> Any:
        return await open_store(engine, settings).revoke_key(actor(), key_id)

    info = run_action(database_url, action)
    click.echo(f"key id {info.id} ({info.suffix}) of team {info.team} revoked")


@key.command("move")
@click.argument("key_id", type=int)
@click.argument("team_name", metavar="TEAM")
@database_option
def key_move(key_id: int, team_name: str, database_url: str | None) -> None:
    """Attribute key KEY_ID's future usage to TEAM (past records keep their team)."""

    async def action(engine: AsyncEngine, settings: Any) -> Any:
        return await open_store(engine, settings).move_key(actor(), key_id, team_name)

    info = run_action(database_url, action)
    click.echo(f"key id {info.id} ({info.suffix}) now belongs to team {info.team}")
