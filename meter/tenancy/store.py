"""Teams, keys and prices in the database: the writes the admin API and the CLI share, with their
audit trail.

:class:`TenancyStore` is composed of one part per entity: teams (:mod:`~meter.tenancy.team_store`),
keys (:mod:`~meter.tenancy.key_store`), each with its quota limits (:mod:`~meter.tenancy.limits`), on
the shared state of :mod:`~meter.tenancy.store_base`; prices and the audit log are added here
(:mod:`~meter.billing.catalog`, :mod:`~meter.tenancy.audit`).

Rule 1: one transaction per admin action: the change, its ``audit_log`` row, and the bump of
        ``tenancy_state.version`` that tells every replica to reload (meter.db.tenancy_models, Rule 2).
        After the commit ``on_change`` runs, so the process that made the change sees it at once.
Rule 2: errors are meter errors: 400 for invalid input, 404 for a missing team or key, 409 for a taken
        name or key and for deleting a team that still has active keys (unless forced).
Rule 3: history is not rewritten: usage records carry the team *name* they were attributed to when
        they happened, so renaming a team, moving a key or deleting a team changes only what happens
        from now on.

Failure policy: database errors propagate; an admin action either happened completely or not at all.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from meter.tenancy.audit import AuditEntry, read_audit
from meter.tenancy.key_store import KeyStore
from meter.tenancy.team_store import TeamStore


class TenancyStore(TeamStore, KeyStore):
    """Teams, keys and the audit log on ``engine``. ``credential_names``, when given, are the upstream
    credentials this process knows; naming another one is refused (None: not checked, e.g. the CLI
    run without the credentials file)."""

    async def add_price(
        self,
        actor: str,
        *,
        model: str,
        input: Any,
        output: Any,
        cached_input: Any = None,
        effective_from: datetime,
        source: str = "",
    ) -> Any:
        """See :func:`meter.billing.catalog.add_price`; this process's catalog reloads at once."""
        from meter.billing.catalog import add_price

        row = await add_price(
            self.engine,
            actor,
            model=model,
            input=input,
            output=output,
            cached_input=cached_input,
            effective_from=effective_from,
            source=source,
            clock=self.clock,
        )
        await self._changed()
        return row

    async def audit(
        self, *, limit: int = 100, since: datetime | None = None, target: str | None = None
    ) -> list[AuditEntry]:
        """Audit entries, newest first."""
        return await read_audit(self.engine, limit=limit, since=since, target=target)
