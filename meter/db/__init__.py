"""meter's database: schema, migrations, writing records (for the pipeline), and report queries.

Modules, in data-flow order: :mod:`~meter.db.engine` (URLs, engines, ping),
:mod:`~meter.db.models`, :mod:`~meter.db.tenancy_models` and :mod:`~meter.db.types` (schema),
:mod:`~meter.db.migrate` (Alembic),
:mod:`~meter.db.insert`, :mod:`~meter.db.sqlite_json` and :mod:`~meter.db.poison` (records in, called
by :mod:`meter.pipeline.delivery`), :mod:`~meter.db.queries` (reports out),
:mod:`~meter.db.report` (rendering, pure).
"""

from __future__ import annotations

from meter.db import tenancy_models  # noqa: F401  (registers its tables on Base.metadata)
from meter.db.engine import create_engine, normalize_url, ping
from meter.db.insert import write_batch
from meter.db.migrate import current, downgrade, head, upgrade
from meter.db.queries import recent_requests, usage_summary
from meter.db.report import render

__all__ = [
    "create_engine",
    "current",
    "downgrade",
    "head",
    "normalize_url",
    "ping",
    "recent_requests",
    "render",
    "upgrade",
    "usage_summary",
    "write_batch",
]
