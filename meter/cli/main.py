"""The ``meter`` command line: serve, simulate, db, usage.

This is the configuration edge: it reads the environment once (via :func:`meter.settings.load_settings`)
and passes typed values inward. Worker processes of ``serve --workers N`` receive the parsed settings
through one private variable, so every worker runs with exactly what the parent validated.

Nothing the CLI prints shows a URL's password or query values: commands print the URLs they hold
through :func:`meter.redact.mask_url`, and :class:`MeterGroup` passes every error message, and the
traceback of an unexpected failure, through :func:`meter.redact.mask_urls_in`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import traceback
from datetime import datetime
from typing import Any

import click

from meter.errors import SettingsError
from meter.redact import mask_url, mask_urls_in
from meter.settings import Settings, load_settings

_WORKER_SETTINGS = "_METER_WORKER_SETTINGS"


def _settings(**overrides: Any) -> Settings:
    environ = {k: v for k, v in os.environ.items() if k != _WORKER_SETTINGS}
    try:
        return load_settings(environ, **overrides)
    except SettingsError as exc:
        raise click.UsageError(str(exc)) from None


def worker_app() -> Any:
    """ASGI factory used by server worker processes (``meter.cli.main:worker_app``)."""
    # litestar adds its pydantic plugins to every app whenever pydantic is importable, which it is
    # wherever the openai SDK or FastAPI is installed. meter declares no pydantic models; the plugins
    # cost ~8 MB per serving process. A None entry makes ``import pydantic`` fail in this process only
    # (litestar then skips them); if something imported pydantic already, it stays.
    sys.modules.setdefault("pydantic", None)  # type: ignore[arg-type]
    from meter.app import create_app

    settings = Settings(**json.loads(os.environ[_WORKER_SETTINGS]))
    _configure_logging(settings)
    return create_app(settings)


def _configure_logging(settings: Settings) -> None:
    from meter.sinks.requestlog import configure_logging, resolve_format

    configure_logging(settings.log_level, resolve_format(settings.log_format), sys.stderr)


class MeterGroup(click.Group):
    """The ``meter`` group: its commands' errors are printed with URLs masked (module docstring)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.ClickException as exc:
            # Masked in place, so a UsageError keeps its usage hint (click types message as Final).
            exc.message = mask_urls_in(exc.message)  # type: ignore[misc]
            raise
        except (click.exceptions.Exit, click.Abort):
            raise
        except Exception as exc:
            # A bug, not a user error: the traceback is wanted, its exception texts masked.
            click.echo(mask_urls_in("".join(traceback.format_exception(exc))), err=True, nl=False)
            ctx.exit(1)


@click.group(
    cls=MeterGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100}
)
@click.version_option(package_name="meter")
def main() -> None:
    """meter: an observability and metering proxy for OpenAI-compatible LLM APIs."""


@main.command()
@click.option("--host", default=None, help="Listen address [METER_HOST; default 127.0.0.1].")
@click.option("--port", type=int, default=None, help="Listen port [METER_PORT; default 8787].")
@click.option("--upstream", "upstream_url", default=None, help="Upstream base URL [METER_UPSTREAM_URL].")
@click.option("--database", "database_url", default=None, help="Database URL [METER_DATABASE_URL].")
@click.option("--workers", type=int, default=None, help="Worker processes [METER_WORKERS; default 1].")
@click.option(
    "--server", type=click.Choice(["uvicorn", "granian"]), default=None, help="ASGI server [METER_SERVER]."
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default=None,
    help="Log level [METER_LOG_LEVEL; default info].",
)
@click.option(
    "--log-format",
    type=click.Choice(["auto", "json", "text"]),
    default=None,
    help="Log lines as JSON or text; auto: text on a terminal [METER_LOG_FORMAT; default auto].",
)
def serve(**flags: Any) -> None:
    """Run the proxy."""
    settings = _settings(**flags)
    _configure_logging(settings)
    if settings.is_sqlite and settings.auto_migrate:
        # Migrate once here rather than racing in every worker's start-up, and in a child process so
        # alembic (~9 MB) never stays in the serving process's memory.
        import subprocess

        migrate = [sys.executable, "-m", "meter", "db", "upgrade", "--database", settings.database_url]
        done = subprocess.run(migrate, check=False, capture_output=True, text=True)
        if done.returncode != 0:  # quiet on success: serve's output stays pure log lines (JSON or text)
            raise click.ClickException(
                f"migrating {mask_url(settings.database_url)} failed:\n{mask_urls_in(done.stderr)}"
            )
        settings = dataclasses.replace(settings, auto_migrate=False)
    created_metrics_dir = None
    if settings.workers > 1 or settings.metrics_multiprocess_dir:
        # Several workers share one /metrics through prometheus-client's multiprocess files.
        from meter.sinks.prometheus import MULTIPROCESS_ENV, activate_multiprocess, prepare_multiprocess_dir

        metrics_dir = prepare_multiprocess_dir(settings.metrics_multiprocess_dir)
        if settings.metrics_multiprocess_dir is None:
            created_metrics_dir = metrics_dir
        os.environ[MULTIPROCESS_ENV] = metrics_dir  # read by prometheus_client in every worker
        activate_multiprocess()  # this process too: with one worker, uvicorn serves in-process
        settings = dataclasses.replace(settings, metrics_multiprocess_dir=metrics_dir)
    os.environ[_WORKER_SETTINGS] = json.dumps(dataclasses.asdict(settings))
    try:
        _run_server(settings)
    finally:
        if created_metrics_dir is not None:
            from meter.sinks.prometheus import remove_multiprocess_dir

            remove_multiprocess_dir(created_metrics_dir)


def _run_server(settings: Settings) -> None:
    from meter.redact import mask_url
    from meter.serving.options import (
        granian_options,
        open_files_needed,
        raise_open_file_limit,
        uvicorn_options,
    )

    logging.getLogger("meter").info(
        "meter listening on http://%s:%d, forwarding to %s, recording to %s",
        settings.host,
        settings.port,
        mask_url(settings.upstream_url),
        mask_url(settings.database_url),
    )
    raise_open_file_limit(open_files_needed(settings))  # before the workers start: they inherit it
    if settings.server == "granian":
        from granian import Granian
        from granian.constants import Interfaces

        Granian(
            "meter.cli.main:worker_app",
            address=settings.host,
            port=settings.port,
            interface=Interfaces.ASGI,
            workers=settings.workers,
            factory=True,
            log_level=settings.log_level,  # type: ignore[arg-type]
            **granian_options(settings),
        ).serve()
        return
    import uvicorn

    uvicorn.run(
        "meter.cli.main:worker_app",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        log_config=None,  # uvicorn's own lines go through meter's handler (JSON or text)
        log_level=settings.log_level,
        **uvicorn_options(settings),
    )


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8788, show_default=True)
@click.option("--ttft-ms", type=float, default=0.0, show_default=True, help="Delay before the first token.")
@click.option("--token-delay-ms", type=float, default=0.0, show_default=True, help="Delay between tokens.")
@click.option(
    "--completion-tokens",
    type=int,
    default=16,
    show_default=True,
    help="Completion length when the request sets no max_tokens.",
)
def simulate(host: str, port: int, ttft_ms: float, token_delay_ms: float, completion_tokens: int) -> None:
    """Run a Fireworks-compatible upstream simulator (for demos, tests and benchmarks)."""
    from meter.simulator import SimulatorConfig
    from meter.simulator.__main__ import serve

    click.echo(
        f"simulator listening on http://{host}:{port} (point meter at it: --upstream http://{host}:{port})"
    )
    serve(
        SimulatorConfig(ttft_ms=ttft_ms, token_delay_ms=token_delay_ms, completion_tokens=completion_tokens),
        host,
        port,
    )


@main.group()
def db() -> None:
    """Database migrations."""


@db.command("upgrade")
@click.argument("revision", default="head")
@click.option("--database", "database_url", default=None, help="Database URL [METER_DATABASE_URL].")
def db_upgrade(revision: str, database_url: str | None) -> None:
    """Migrate the database up to REVISION (default: head)."""
    from meter.cli.context import run_on_database
    from meter.db.migrate import upgrade

    settings = _settings(database_url=database_url)
    run_on_database(settings.database_url, upgrade(settings.database_url, revision))
    click.echo(f"database at {revision}")


@db.command("downgrade")
@click.argument("revision")
@click.option("--database", "database_url", default=None, help="Database URL [METER_DATABASE_URL].")
def db_downgrade(revision: str, database_url: str | None) -> None:
    """Migrate the database down to REVISION ('base' removes every table)."""
    from meter.cli.context import run_on_database
    from meter.db.migrate import downgrade

    settings = _settings(database_url=database_url)
    run_on_database(settings.database_url, downgrade(settings.database_url, revision))
    click.echo(f"database at {revision}")


def _parse_time(value: str | None, name: str) -> datetime | None:
    from meter.admin.usage import parse_time
    from meter.errors import RequestError

    try:
        return parse_time(value, name)
    except RequestError as exc:
        raise click.BadParameter(exc.message, param_hint=f"--{name}") from None


@main.command()
@click.option("--since", default=None, help="Start of the range (ISO date or datetime, UTC if no offset).")
@click.option("--until", default=None, help="End of the range, exclusive.")
@click.option(
    "--group-by",
    default="key,model",
    show_default=True,
    help="Comma-separated: any of key, team, model, endpoint, day.",
)
@click.option("--key", default=None, help="Only this key fingerprint.")
@click.option("--team", default=None, help="Only this team.")
@click.option("--model", default=None, help="Only this requested model.")
@click.option("--endpoint", default=None, help="Only this endpoint path.")
@click.option(
    "--format", "fmt", type=click.Choice(["table", "json", "csv"]), default="table", show_default=True
)
@click.option("--database", "database_url", default=None, help="Database URL [METER_DATABASE_URL].")
def usage(
    since: str | None,
    until: str | None,
    group_by: str,
    key: str | None,
    team: str | None,
    model: str | None,
    endpoint: str | None,
    fmt: str,
    database_url: str | None,
) -> None:
    """Usage totals over a time range."""
    from meter.admin.usage import parse_group_by
    from meter.db.engine import create_engine
    from meter.db.queries import usage_summary
    from meter.db.report import render
    from meter.errors import RequestError

    settings = _settings(database_url=database_url)
    try:
        groups = parse_group_by(group_by)
    except RequestError as exc:
        raise click.BadParameter(exc.message, param_hint="--group-by") from None
    start, end = _parse_time(since, "since"), _parse_time(until, "until")

    async def run() -> list[dict[str, Any]]:
        if settings.is_sqlite:
            from meter.db.migrate import upgrade

            await upgrade(settings.database_url)  # a fresh embedded database reads as empty, not as an error
        engine = create_engine(settings.database_url)
        try:
            return await usage_summary(
                engine,
                since=start,
                until=end,
                group_by=groups,
                key_fingerprint=key,
                team=team,
                model=model,
                endpoint=endpoint,
            )
        finally:
            await engine.dispose()

    from meter.cli.context import run_on_database

    click.echo(render(run_on_database(settings.database_url, run()), fmt), nl=False)


@main.group()
def journal() -> None:
    """The local usage journal (records on their way to the database)."""


def _journal_root(directory: str | None, settings: Settings) -> str:
    from meter.journal.store import default_journal_root

    return directory or settings.journal_dir or str(default_journal_root(settings.sqlite_path))


@journal.command("status")
@click.argument("directory", required=False)
@click.option("--database", "database_url", default=None, help="Database URL (locates the default journal).")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
def journal_status_command(directory: str | None, database_url: str | None, fmt: str) -> None:
    """Backlog of each journal under DIRECTORY (default: METER_JOURNAL_DIR or beside the database)."""
    from meter.db.report import render
    from meter.journal.store import journal_status

    root = _journal_root(directory, _settings(database_url=database_url))
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
    click.echo(render(rows, fmt), nl=False)


@journal.command("replay")
@click.argument("directory")
@click.option("--database", "database_url", default=None, help="Database URL [METER_DATABASE_URL].")
@click.option(
    "--timeout", type=float, default=300.0, show_default=True, help="Give up after this many seconds."
)
def journal_replay_command(directory: str, database_url: str | None, timeout: float) -> None:
    """Drain a journal left behind (e.g. by a dead pod) into the database. Idempotent: records already
    stored are not stored twice."""
    from meter.db.engine import create_engine
    from meter.errors import JournalLocked
    from meter.pipeline.replay import replay

    settings = _settings(database_url=database_url)

    async def run() -> Any:
        if settings.is_sqlite:
            from meter.db.migrate import upgrade

            await upgrade(settings.database_url)
        engine = create_engine(settings.database_url)
        try:
            return await replay(directory, engine, timeout=timeout, retention_days=settings.retention_days)
        finally:
            await engine.dispose()

    from meter.cli.context import run_on_database

    try:
        result = run_on_database(settings.database_url, run())
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


def _add_management_commands() -> None:
    from meter.cli.manage import (
        COMMANDS,  # imported here: meter.cli.context reads settings via meter.cli.main
    )

    for command in COMMANDS:
        main.add_command(command)


_add_management_commands()
