"""``meter journal status|replay``: the local usage journal, where records wait on their way to the
database (:mod:`meter.journal.store`); ``replay`` drains one a dead process left behind."""

from __future__ import annotations

from typing import Any

import click
from sqlalchemy.ext.asyncio import AsyncEngine

from meter.cli.context import cli_settings, database_option, echo_rows, run_on_engine, table_or_json_option
from meter.settings import Settings


@click.group()
def journal() -> None:
    """The local usage journal (records on their way to the database)."""


def _journal_root(directory: str | None, settings: Settings) -> str:
    from meter.journal.store import default_journal_root

    return directory or settings.journal_dir or str(default_journal_root(settings.sqlite_path))


@journal.command("status")
@click.argument("directory", required=False)
@click.option("--database", "database_url", default=None, help="Database URL (locates the default journal).")
@table_or_json_option
def journal_status_command(directory: str | None, database_url: str | None, fmt: str) -> None:
    """Backlog of each journal under DIRECTORY (default: METER_JOURNAL_DIR or beside the database)."""
    from meter.journal.store import journal_status

    root = _journal_root(directory, cli_settings(database_url=database_url))
    rows = [
        {
            "directory": str(status.directory),
            "owner": status.holder if status.locked else "(none: replayable)",
            "pending_events": status.pending_events,
            "pending_bytes": status.pending_bytes,
            "oldest_pending_at": status.oldest_pending_at.isoformat() if status.oldest_pending_at else None,
            "segments": status.segments,
            "corrupt_frames": status.corrupt_frames,
            "dead_lettered": status.dead_lettered,
        }
        for status in journal_status(root)
    ]
    if not rows:
        raise click.ClickException(f"no journal under {root}")
    echo_rows(rows, fmt)


@journal.command("replay")
@click.argument("directory")
@database_option
@click.option(
    "--timeout", type=float, default=300.0, show_default=True, help="Give up after this many seconds."
)
def journal_replay_command(directory: str, database_url: str | None, timeout: float) -> None:
    """Drain a journal left behind (e.g. by a dead pod) into the database. Idempotent: records already
    stored are not stored twice."""
    from meter.errors import JournalLocked
    from meter.pipeline.replay import replay

    settings = cli_settings(database_url=database_url)

    async def action(engine: AsyncEngine, settings: Settings) -> Any:
        return await replay(directory, engine, timeout=timeout, retention_days=settings.retention_days)

    try:
        result = run_on_engine(settings, action)
    except JournalLocked as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(
        f"replayed {result.read} records from {len(result.directories)} journal(s): "
        f"{result.inserted} inserted, {result.written - result.inserted} already stored, "
        f"{result.dead_lettered} dead-lettered, {result.remaining} remaining"
    )
    for skipped in result.skipped_locked:
        click.echo(f"skipped {skipped}: owned by a running meter", err=True)
    if result.remaining:
        raise SystemExit(1)
