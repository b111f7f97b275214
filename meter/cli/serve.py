"""``meter serve`` and ``meter simulate``: run the proxy, or an upstream simulator to point it at.

This is the configuration edge: ``serve`` reads the environment once (:func:`meter.cli.context.cli_settings`)
and passes typed values inward. Worker processes of ``serve --workers N`` receive the parsed settings
through one private variable (:data:`meter.cli.context.WORKER_SETTINGS`) and build the app in
:func:`worker_app`, so every worker runs with exactly what the parent validated.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from typing import Any

import click

from meter.cli.context import WORKER_SETTINGS, cli_settings, database_option
from meter.redact import mask_url, mask_urls_in
from meter.settings import Settings


def worker_app() -> Any:
    """ASGI factory used by server worker processes (:data:`WORKER_APP`)."""
    # litestar adds its pydantic plugins to every app whenever pydantic is importable, which it is
    # wherever the openai SDK or FastAPI is installed. meter declares no pydantic models; the plugins
    # cost ~8 MB per serving process. A None entry makes ``import pydantic`` fail in this process only
    # (litestar then skips them); if something imported pydantic already, it stays.
    sys.modules.setdefault("pydantic", None)  # type: ignore[arg-type]
    from meter.app import create_app

    settings = Settings(**json.loads(os.environ[WORKER_SETTINGS]))
    _configure_logging(settings)
    return create_app(settings)


# How the ASGI server finds the factory in each worker process.
WORKER_APP = f"{worker_app.__module__}:{worker_app.__qualname__}"


def _configure_logging(settings: Settings) -> None:
    from meter.sinks.requestlog import configure_logging, resolve_format

    configure_logging(settings.log_level, resolve_format(settings.log_format), sys.stderr)


@click.command()
@click.option("--host", default=None, help="Listen address [METER_HOST; default 127.0.0.1].")
@click.option("--port", type=int, default=None, help="Listen port [METER_PORT; default 8787].")
@click.option("--upstream", "upstream_url", default=None, help="Upstream base URL [METER_UPSTREAM_URL].")
@database_option
@click.option("--workers", type=int, default=None, help="Worker processes [METER_WORKERS; default 1].")
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
    settings = cli_settings(**flags)
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
    os.environ[WORKER_SETTINGS] = json.dumps(dataclasses.asdict(settings))
    try:
        _run_server(settings)
    finally:
        if created_metrics_dir is not None:
            from meter.sinks.prometheus import remove_multiprocess_dir

            remove_multiprocess_dir(created_metrics_dir)


def _run_server(settings: Settings) -> None:
    from meter.serving.options import open_files_needed, raise_open_file_limit, uvicorn_options

    logging.getLogger("meter").info(
        "meter listening on http://%s:%d, forwarding to %s, recording to %s",
        settings.host,
        settings.port,
        mask_url(settings.upstream_url),
        mask_url(settings.database_url),
    )
    raise_open_file_limit(open_files_needed(settings))  # before the workers start: they inherit it
    import uvicorn

    uvicorn.run(
        WORKER_APP,
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        log_config=None,  # uvicorn's own lines go through meter's handler (JSON or text)
        log_level=settings.log_level,
        **uvicorn_options(settings),
    )


@click.command()
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
    from meter.simulator.__main__ import serve as serve_simulator

    click.echo(
        f"simulator listening on http://{host}:{port} (point meter at it: --upstream http://{host}:{port})"
    )
    serve_simulator(
        SimulatorConfig(ttft_ms=ttft_ms, token_delay_ms=token_delay_ms, completion_tokens=completion_tokens),
        host,
        port,
    )
