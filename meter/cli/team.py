"""``meter team``: teams from the command line, through the same store as the admin API
(:mod:`meter.tenancy.store`), audited as ``cli:<user>``. A team's keys are ``meter key``
(:mod:`meter.cli.key`), its limits ``meter quota`` (:mod:`meter.cli.quota`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click
from sqlalchemy.ext.asyncio import AsyncEngine

from meter.cli.context import actor, database_option, echo_rows, format_option, open_store, run_action
from meter.cli.key import key_row

if TYPE_CHECKING:
    from meter.tenancy.team_store import Team


def _labels(pairs: tuple[str, ...]) -> dict[str, str]:
    labels: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep:
            raise click.BadParameter(f"{pair!r} is not NAME=VALUE", param_hint="--label")
        labels[name] = value
    return labels


def _team_row(team: Team) -> dict[str, Any]:
    from meter.quota.report import limits_summary

    row = team.to_json()
    del row["object"]
    row["labels"] = ",".join(f"{k}={v}" for k, v in sorted(team.labels.items()))
    row["limits"] = limits_summary(team.limits)
    return row


@click.group()
def team() -> None:
    """Teams: create, list, show, update, delete."""


@team.command("create")
@click.argument("name")
@click.option("--description", default="", help="Free text.")
@click.option("--label", "labels", multiple=True, metavar="NAME=VALUE", help="Repeatable.")
@click.option("--upstream-credential", default=None, help="Credential name for the team's virtual keys.")
@database_option
def team_create(
    name: str,
    description: str,
    labels: tuple[str, ...],
    upstream_credential: str | None,
    database_url: str | None,
) -> None:
    """Create team NAME."""

    async def action(engine: AsyncEngine, settings: Any) -> Any:
        return await open_store(engine, settings).create_team(
            actor(),
            name,
            description=description,
            labels=_labels(labels),
            upstream_credential=upstream_credential,
        )

    created = run_action(database_url, action)
    click.echo(f"team {created.name} created")


@team.command("list")
@format_option
@database_option
def team_list(fmt: str, database_url: str | None) -> None:
    """Every team."""

    async def action(engine: AsyncEngine, settings: Any) -> Any:
        return await open_store(engine, settings).list_teams()

    echo_rows([_team_row(t) for t in run_action(database_url, action)], fmt)


@team.command("show")
@click.argument("name")
@format_option
@database_option
def team_show(name: str, fmt: str, database_url: str | None) -> None:
    """One team and its keys."""

    async def action(engine: AsyncEngine, settings: Any) -> Any:
        store = open_store(engine, settings)
        return await store.get_team(name), await store.list_keys(name), store.clock()

    found, keys, now = run_action(database_url, action)
    if fmt == "json":
        echo_rows([{**found.to_json(), "keys": [k.to_json(now) for k in keys]}], "json")
        return
    echo_rows([_team_row(found)], fmt)
    if keys:
        click.echo()
        echo_rows([key_row(k, now) for k in keys], fmt)


@team.command("update")
@click.argument("name")
@click.option("--name", "new_name", default=None, help="Rename the team (past records keep the old name).")
@click.option("--description", default=None)
@click.option(
    "--label", "labels", multiple=True, metavar="NAME=VALUE", help="Replaces all labels; repeatable."
)
@click.option("--clear-labels", is_flag=True, help="Remove every label.")
@click.option("--upstream-credential", default=None, help="Credential name for the team's virtual keys.")
@click.option(
    "--default-credential", is_flag=True, help="Use METER_UPSTREAM_API_KEY for the team's virtual keys."
)
@database_option
def team_update(
    name: str,
    new_name: str | None,
    description: str | None,
    labels: tuple[str, ...],
    clear_labels: bool,
    upstream_credential: str | None,
    default_credential: bool,
    database_url: str | None,
) -> None:
    """Change team NAME."""
    if upstream_credential is not None and default_credential:
        raise click.UsageError("give --upstream-credential or --default-credential, not both")
    kwargs: dict[str, Any] = {}
    if upstream_credential is not None or default_credential:
        kwargs["upstream_credential"] = upstream_credential
    new_labels = {} if clear_labels else (_labels(labels) if labels else None)

    async def action(engine: AsyncEngine, settings: Any) -> Any:
        return await open_store(engine, settings).update_team(
            actor(), name, new_name=new_name, description=description, labels=new_labels, **kwargs
        )

    updated = run_action(database_url, action)
    click.echo(f"team {updated.name} updated")


@team.command("delete")
@click.argument("name")
@click.option("--force", is_flag=True, help="Also when the team has active keys (they stop working).")
@database_option
def team_delete(name: str, force: bool, database_url: str | None) -> None:
    """Delete team NAME and its key registrations (past usage keeps the name)."""

    async def action(engine: AsyncEngine, settings: Any) -> int:
        removed: int = await open_store(engine, settings).delete_team(actor(), name, force=force)
        return removed

    removed = run_action(database_url, action)
    click.echo(f"team {name} deleted ({removed} key registration(s) removed)")
