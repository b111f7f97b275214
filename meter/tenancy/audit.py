"""The audit trail of admin changes, and the tenancy version every replica reloads on.

Rule 1: an audit row is written inside the transaction of the change it records, together with the
        bump of ``tenancy_state.version`` that tells every replica to reload (meter.db.tenancy_models,
        Rule 2): both happen with the change or not at all (meter.tenancy.store, Rule 1).
Rule 2: actors are named, never identified by a secret: ``cli:`` + the operating-system user, or
        ``admin:`` + 16 hex digits of a keyed digest of the admin token (:func:`admin_actor`): HMAC-SHA256
        under meter's key secret (``METER_KEY_SECRET``, the one key fingerprints use), so two tokens
        are told apart after a rotation, and nobody without the secret can test a guessed token
        against the audit log. (Rows written before this rule carry ``admin:`` + 12 hex digits of an
        unkeyed SHA-256.)
"""

from __future__ import annotations

import getpass
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from meter.db.tenancy_models import audit_log, tenancy_state

if TYPE_CHECKING:
    from meter.tenancy.identity import KeyFingerprinter

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


# Put before the token, so the digest is never an API key's fingerprint: no HTTP header holds a NUL,
# so no client can make the proxy fingerprint this string.
ADMIN_ACTOR_CONTEXT = "\x00meter audit actor\x00"
ADMIN_ACTOR_DIGITS = 16


def admin_actor(token: str, fingerprinter: KeyFingerprinter) -> str:
    """The audit actor for a request made with admin ``token`` (Rule 2)."""
    digest = fingerprinter.identify(ADMIN_ACTOR_CONTEXT + token).fingerprint
    return "admin:" + digest[:ADMIN_ACTOR_DIGITS]


def cli_actor() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except Exception:  # no user name in a bare container
        return "cli"


@dataclass(frozen=True, slots=True)
class AuditEntry:
    id: int
    at: datetime
    actor: str
    action: str
    target: str
    detail: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "at": self.at.isoformat(),
            "actor": self.actor,
            "action": self.action,
            "target": self.target,
            "detail": self.detail,
        }


async def record_change(
    conn: AsyncConnection,
    at: datetime,
    actor: str,
    action: str,
    target: str,
    detail: Mapping[str, Any],
    *,
    bump: bool = True,
) -> None:
    """Rule 1's bookkeeping, inside the caller's transaction: one audit row and (unless the change
    touches nothing replicas cache, ``bump=False``) a version bump."""
    await conn.execute(
        insert(audit_log).values(at=at, actor=actor, action=action, target=target, detail=dict(detail))
    )
    if bump:
        await conn.execute(
            update(tenancy_state).where(tenancy_state.c.id == 1).values(version=tenancy_state.c.version + 1)
        )


async def current_version(conn: AsyncConnection) -> int:
    version = (await conn.execute(select(tenancy_state.c.version).where(tenancy_state.c.id == 1))).scalar()
    return int(version or 0)


async def read_audit(
    engine: AsyncEngine, *, limit: int = 100, since: datetime | None = None, target: str | None = None
) -> list[AuditEntry]:
    """Audit entries, newest first."""
    a = audit_log.c
    stmt = select(audit_log)
    if since is not None:
        stmt = stmt.where(a.at >= since)
    if target is not None:
        stmt = stmt.where(a.target == target)
    stmt = stmt.order_by(a.id.desc()).limit(limit)
    async with engine.connect() as conn:
        rows = await conn.execute(stmt)
        return [
            AuditEntry(
                id=int(m["id"]),
                at=m["at"],
                actor=m["actor"],
                action=m["action"],
                target=m["target"],
                detail=dict(m["detail"] or {}),
            )
            for m in (row._mapping for row in rows)
        ]
