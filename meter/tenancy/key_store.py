"""Keys in the database: issue virtual keys, register passthrough keys, read, revoke, move, and their
quota limits.

Rule 1: raw keys pass through here only to be fingerprinted; no table, audit detail, log line or
        return value other than :attr:`IssuedKey.key` (the one-time display) holds one.
Rule 2: moving a key attributes only its future usage to the new team; past records keep theirs
        (meter.tenancy.store, Rule 3).
Rule 3: revoking a revoked key changes and audits nothing; recording when keys were last used
        (batched by the directory) is neither audited nor a version bump.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import and_, insert, null, or_, select, update
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncConnection

from meter.db.tenancy_models import api_keys, teams
from meter.errors import Conflict, NotFound, RequestError
from meter.quota.policy import Limits
from meter.tenancy.audit import record_change
from meter.tenancy.keys import KeyKind, is_virtual, new_virtual_key
from meter.tenancy.limits import limits_json, parse_limits, stored_limits
from meter.tenancy.store_base import StoreBase, aware, text
from meter.tenancy.team_store import team_in

_HEX64 = frozenset("0123456789abcdef")


@dataclass(frozen=True, slots=True)
class KeyInfo:
    id: int
    team: str
    kind: KeyKind
    name: str
    fingerprint: str
    suffix: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None
    limits: Limits | None = None  # quota limits (meter.tenancy.limits, Rule 1)

    def status(self, now: datetime) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and now >= self.expires_at:
            return "expired"
        return "active"

    def to_json(self, now: datetime) -> dict[str, Any]:
        def iso(value: datetime | None) -> str | None:
            return None if value is None else value.isoformat()

        return {
            "object": "key",
            "id": self.id,
            "team": self.team,
            "kind": self.kind.value,
            "name": self.name,
            "suffix": self.suffix,
            "fingerprint": self.fingerprint,
            "status": self.status(now),
            "created_at": iso(self.created_at),
            "expires_at": iso(self.expires_at),
            "revoked_at": iso(self.revoked_at),
            "last_used_at": iso(self.last_used_at),
            "limits": limits_json(self.limits),
        }


@dataclass(frozen=True, slots=True)
class IssuedKey:
    """A newly issued virtual key: ``key`` is the only copy there will ever be."""

    info: KeyInfo
    key: str


def _key_columns() -> list[Any]:
    k = api_keys.c
    return [
        k.id,
        teams.c.name.label("team"),
        k.kind,
        k.name,
        k.fingerprint,
        k.suffix,
        k.created_at,
        k.expires_at,
        k.revoked_at,
        k.last_used_at,
        k.limits,
    ]


def _key_info(row: Any) -> KeyInfo:
    m = row._mapping
    return KeyInfo(
        id=int(m["id"]),
        team=m["team"],
        kind=KeyKind(m["kind"]),
        name=m["name"],
        fingerprint=m["fingerprint"],
        suffix=m["suffix"],
        created_at=m["created_at"],
        expires_at=m["expires_at"],
        revoked_at=m["revoked_at"],
        last_used_at=m["last_used_at"],
        limits=stored_limits(m["limits"], f"key {m['id']}"),
    )


async def key_in(conn: AsyncConnection, key_id: int) -> KeyInfo:
    """Key ``key_id`` as ``conn`` sees it; NotFound (404) if there is none."""
    stmt = (
        select(*_key_columns()).join(teams, teams.c.id == api_keys.c.team_id).where(api_keys.c.id == key_id)
    )
    row = (await conn.execute(stmt)).first()
    if row is None:
        raise NotFound(f"no key with id {key_id}", param="key_id")
    return _key_info(row)


class KeyStore(StoreBase):
    """The key operations of :class:`~meter.tenancy.store.TenancyStore`."""

    async def issue_virtual_key(
        self, actor: str, team: str, *, name: str = "", expires_at: datetime | None = None
    ) -> IssuedKey:
        """A new ``mk-`` key for ``team``; the returned :attr:`IssuedKey.key` is shown once."""
        now = self.clock()
        if expires_at is not None:
            expires_at = aware(expires_at)
            if expires_at <= now:
                raise RequestError("expires_at must be in the future", param="expires_at")
        key = new_virtual_key()
        identity = self._fingerprinter.identify(key)
        key_id = await self._insert_key(
            actor,
            team,
            kind=KeyKind.VIRTUAL,
            fingerprint=identity.fingerprint,
            suffix=identity.suffix,
            name=text(name, "name", 256),
            expires_at=expires_at,
            now=now,
        )
        return IssuedKey(await self.get_key(key_id), key)

    async def register_passthrough_key(
        self,
        actor: str,
        team: str,
        *,
        key: str | None = None,
        fingerprint: str | None = None,
        suffix: str | None = None,
        name: str = "",
        expires_at: datetime | None = None,
    ) -> KeyInfo:
        """Register a provider key to ``team``: by value (fingerprinted here, never stored) or by the
        fingerprint meter shows for it (``meter usage --group-by key``)."""
        if (key is None) == (fingerprint is None):
            raise RequestError("give exactly one of key or fingerprint", param="key")
        if key is not None:
            key = key.strip()
            if not key or any(c.isspace() for c in key):
                raise RequestError("key must be a non-empty value without spaces", param="key")
            if is_virtual(key):
                raise RequestError("keys starting with 'mk-' are meter's virtual keys", param="key")
            identity = self._fingerprinter.identify(key)
            fingerprint, suffix = identity.fingerprint, identity.suffix
        else:
            fingerprint = str(fingerprint).strip().lower()
            if len(fingerprint) != 64 or not set(fingerprint) <= _HEX64:
                raise RequestError("fingerprint must be 64 hexadecimal digits", param="fingerprint")
            suffix = text(suffix or "", "suffix", 16)
        if expires_at is not None:
            expires_at = aware(expires_at)
        key_id = await self._insert_key(
            actor,
            team,
            kind=KeyKind.PASSTHROUGH,
            fingerprint=fingerprint,
            suffix=suffix or "",
            name=text(name, "name", 256),
            expires_at=expires_at,
            now=self.clock(),
        )
        return await self.get_key(key_id)

    async def _insert_key(
        self,
        actor: str,
        team: str,
        *,
        kind: KeyKind,
        fingerprint: str,
        suffix: str,
        name: str,
        expires_at: datetime | None,
        now: datetime,
    ) -> int:
        try:
            async with self.engine.begin() as conn:
                owner = await team_in(conn, team)
                result = await conn.execute(
                    insert(api_keys)
                    .values(
                        team_id=owner.id,
                        kind=kind.value,
                        fingerprint=fingerprint,
                        suffix=suffix,
                        name=name,
                        created_at=now,
                        updated_at=now,
                        expires_at=expires_at,
                    )
                    .returning(api_keys.c.id)
                )
                key_id = int(result.scalar_one())
                detail = {
                    "key_id": key_id,
                    "kind": kind.value,
                    "team": team,
                    "suffix": suffix,
                    "name": name,
                    "expires_at": None if expires_at is None else expires_at.isoformat(),
                }
                await record_change(
                    conn,
                    now,
                    actor,
                    f"key.{'issue' if kind is KeyKind.VIRTUAL else 'register'}",
                    f"key:{key_id}",
                    detail,
                )
        except sa_exc.IntegrityError:
            raise Conflict("this key is already registered in meter", param="key") from None
        await self._changed()
        return key_id

    async def get_key(self, key_id: int) -> KeyInfo:
        async with self.engine.connect() as conn:
            return await key_in(conn, key_id)

    async def list_keys(self, team: str | None = None) -> list[KeyInfo]:
        stmt = select(*_key_columns()).join(teams, teams.c.id == api_keys.c.team_id)
        async with self.engine.connect() as conn:
            if team is not None:
                owner = await team_in(conn, team)
                stmt = stmt.where(api_keys.c.team_id == owner.id)
            rows = await conn.execute(stmt.order_by(api_keys.c.id))
            return [_key_info(row) for row in rows]

    async def revoke_key(self, actor: str, key_id: int) -> KeyInfo:
        """Revoke a key (idempotent: revoking a revoked key changes nothing and audits nothing)."""
        now = self.clock()
        async with self.engine.begin() as conn:
            info = await key_in(conn, key_id)
            if info.revoked_at is not None:
                return info
            await conn.execute(
                update(api_keys).where(api_keys.c.id == key_id).values(revoked_at=now, updated_at=now)
            )
            detail = {"team": info.team, "kind": info.kind.value, "suffix": info.suffix}
            await record_change(conn, now, actor, "key.revoke", f"key:{key_id}", detail)
        await self._changed()
        return await self.get_key(key_id)

    async def move_key(self, actor: str, key_id: int, team: str) -> KeyInfo:
        """Attribute a key's future usage to ``team`` (past records keep their team, Rule 2)."""
        now = self.clock()
        async with self.engine.begin() as conn:
            info = await key_in(conn, key_id)
            if info.team == team:
                return info
            owner = await team_in(conn, team)
            await conn.execute(
                update(api_keys).where(api_keys.c.id == key_id).values(team_id=owner.id, updated_at=now)
            )
            detail = {"from": info.team, "to": team, "suffix": info.suffix}
            await record_change(conn, now, actor, "key.move", f"key:{key_id}", detail)
        await self._changed()
        return await self.get_key(key_id)

    async def touch_keys(self, last_used: Mapping[int, datetime]) -> None:
        """Record when keys were last used (the directory batches these; no version bump, no audit)."""
        if not last_used:
            return
        k = api_keys.c
        async with self.engine.begin() as conn:
            for key_id, at in sorted(last_used.items()):
                await conn.execute(
                    update(api_keys)
                    .where(and_(k.id == key_id, or_(k.last_used_at.is_(None), k.last_used_at < at)))
                    .values(last_used_at=at)
                )

    async def set_key_limits(
        self, key_id: int, limits: Limits | Mapping[str, Any] | None, *, actor: str
    ) -> KeyInfo:
        """Replace key ``key_id``'s quota limits (None clears them); returns the key."""
        stored = None if limits is None else parse_limits(limits).to_dict()
        now = self.clock()
        async with self.engine.begin() as conn:
            info = await key_in(conn, key_id)
            changed = limits_json(info.limits) != stored
            if changed:
                await conn.execute(
                    update(api_keys)
                    .where(api_keys.c.id == key_id)
                    .values(limits=null() if stored is None else stored, updated_at=now)
                )
                await record_change(conn, now, actor, "key.limits", f"key:{key_id}", stored or {})
        if changed:
            await self._changed()
        return await self.get_key(key_id)

    async def get_key_limits(self, key_id: int) -> Limits | None:
        return (await self.get_key(key_id)).limits
