"""The ``meter`` command line: the click group that carries every command group.

Each group lives in its own module and shares only :mod:`meter.cli.context`:

=======================  =====================================================
``serve``, ``simulate``  :mod:`meter.cli.serve` (and the workers' app factory)
``db``                   :mod:`meter.cli.db`
``usage``                :mod:`meter.cli.usage`
``journal``              :mod:`meter.cli.journal`
``team``                 :mod:`meter.cli.team`
``key``                  :mod:`meter.cli.key`
``prices``               :mod:`meter.cli.prices`
``billing``              :mod:`meter.cli.billing`
``audit``                :mod:`meter.cli.audit`
``quota``                :mod:`meter.cli.quota`
=======================  =====================================================

Nothing the CLI prints shows a URL's password or query values: commands print the URLs they hold
through :func:`meter.redact.mask_url`, and :class:`MeterGroup` passes every error message, and the
traceback of an unexpected failure, through :func:`meter.redact.mask_urls_in`.
"""

from __future__ import annotations

import traceback
from typing import Any

import click

from meter.cli.audit import audit
from meter.cli.billing import billing
from meter.cli.db import db
from meter.cli.journal import journal
from meter.cli.key import key
from meter.cli.prices import prices
from meter.cli.quota import quota
from meter.cli.serve import serve, simulate
from meter.cli.team import team
from meter.cli.usage import usage
from meter.redact import mask_urls_in

# Running meter, and reading what it recorded.
OPERATION_COMMANDS: tuple[click.Command, ...] = (serve, simulate, db, usage, journal)
# The admin API's powers on the database (meter.cli.context, Rules 2 to 5).
MANAGEMENT_COMMANDS: tuple[click.Command, ...] = (team, key, prices, billing, audit, quota)


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


for command in (*OPERATION_COMMANDS, *MANAGEMENT_COMMANDS):
    main.add_command(command)
