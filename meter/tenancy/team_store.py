"""Teams in the database: create, read, update, delete, and their quota limits.

Rule 1: a team names its upstream credential, never holds it: a name this process was not given is
        refused (unless the store was built without the credential list, e.g. the CLI run without the
        credentials file), so a team cannot point its virtual keys at nothing.
Rule 2: renaming or deleting a team changes only what happens from now on; past usage keeps the name
        (meter.tenancy.store, Rule 3).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, insert, null, or_, select, update
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncConnection

from meter.db.tenancy_models import api_keys, teams
from meter.errors import Conflict, NotFound, RequestError
from meter.quota.policy import Limits
from meter.tenancy.audit import record_change
from meter.tenancy.keys import check_labels, check_team_name
from meter.tenancy.limits import limits_json, parse_limits, stored_limits
from meter.tenancy.store_base import StoreBase, checked, text


@dataclass(frozen=True, slots=True)
class Team:
    id: int
    name: str
    description: str
    labels: dict[str, str]
    upstream_credential: str | None
    created_at: datetime
    updated_at: datetime
    limits: Limits | None = None  # quota limits (meter.tenancy.limits, Rule 1)

    def to_json(self) -> dict[str, Any]:
        return {
            "object": "team",
            "name": self.name,
            "description": self.description,
            "labels": dict(self.labels),
            "upstream_credential": self.upstream_credential,
            "limits": limits_json(self.limits),
            "created_at": self.created_at.isoformat(),
            "updated_at": self.updated_at.isoformat(),
        }


def _team(row: Any) -> Team:
    m = row._mapping
    return Team(
        id=int(m["id"]),
        name=m["name"],
        description=m["description"],
        labels=dict(m["labels"] or {}),
        upstream_credential=m["upstream_credential"],
        created_at=m["created_at"],
        updated_at=m["updated_at"],
        limits=stored_limits(m["limits"], f"team {m['name']}"),
    )


async def team_in(conn: AsyncConnection, name: str) -> Team:
    """Team ``name`` as ``conn`` sees it; NotFound (404) if there is none."""
    row = (await conn.execute(select(teams).where(teams.c.name == name))).first()
    if row is None:
        raise NotFound(f"no team named {name!r}", param="team")
    return _team(row)


_UNSET: Any = object()


class TeamStore(StoreBase):
    """The team operations of :class:`~meter.tenancy.store.TenancyStore`."""

    def _credential(self, name: Any) -> str | None:
        if name is None or name == "":
            return None
        from meter.tenancy.credentials import check_credential_name

        name = checked(check_credential_name, text(name, "upstream_credential", 64), "upstream_credential")
        if self._credential_names is not None and name not in self._credential_names:
            raise RequestError(
                f"upstream credential {name!r} is not configured on this meter "
                "(add it to METER_UPSTREAM_CREDENTIALS_FILE on every replica first)",
                param="upstream_credential",
            )
        return str(name)

    async def create_team(
        self,
        actor: str,
        name: str,
        *,
        description: str = "",
        labels: Mapping[str, str] | None = None,
        upstream_credential: str | None = None,
    ) -> Team:
        name = checked(check_team_name, name, "name")
        values = {
            "name": name,
            "description": text(description, "description"),
            "labels": checked(check_labels, labels, "labels"),
            "upstream_credential": self._credential(upstream_credential),
        }
        now = self.clock()
        try:
            async with self.engine.begin() as conn:
                await conn.execute(insert(teams).values(**values, created_at=now, updated_at=now))
                await record_change(conn, now, actor, "team.create", f"team:{name}", values)
        except sa_exc.IntegrityError:
            raise Conflict(f"team {name!r} already exists", param="name") from None
        await self._changed()
        return await self.get_team(name)

    async def list_teams(self) -> list[Team]:
        async with self.engine.connect() as conn:
            rows = await conn.execute(select(teams).order_by(teams.c.name))
            return [_team(row) for row in rows]

    async def get_team(self, name: str) -> Team:
        async with self.engine.connect() as conn:
            return await team_in(conn, name)

    async def update_team(
        self,
        actor: str,
        name: str,
        *,
        new_name: str | None = None,
        description: str | None = None,
        labels: Mapping[str, str] | None = None,
        upstream_credential: str | None = _UNSET,
    ) -> Team:
        """Change the given fields; ``upstream_credential=None`` (or ``""``) clears the team's own
        credential (its virtual keys then use the default)."""
        changes: dict[str, Any] = {}
        if new_name is not None and new_name != name:
            changes["name"] = checked(check_team_name, new_name, "name")
        if description is not None:
            changes["description"] = text(description, "description")
        if labels is not None:
            changes["labels"] = checked(check_labels, labels, "labels")
        if upstream_credential is not _UNSET:
            changes["upstream_credential"] = self._credential(upstream_credential)
        now = self.clock()
        try:
            async with self.engine.begin() as conn:
                team = await team_in(conn, name)
                if changes:
                    await conn.execute(
                        update(teams).where(teams.c.id == team.id).values(**changes, updated_at=now)
                    )
                    await record_change(conn, now, actor, "team.update", f"team:{name}", changes)
        except sa_exc.IntegrityError:
            raise Conflict(f"team {changes.get('name')!r} already exists", param="name") from None
        if changes:
            await self._changed()
        return await self.get_team(changes.get("name", name))

    async def delete_team(self, actor: str, name: str, *, force: bool = False) -> int:
        """Delete the team and its key registrations; returns how many keys went with it. A team with
        active keys is refused unless ``force`` (its keys then stop working within seconds)."""
        now = self.clock()
        async with self.engine.begin() as conn:
            team = await team_in(conn, name)
            k = api_keys.c
            active = (
                await conn.execute(
                    select(func.count())
                    .select_from(api_keys)
                    .where(
                        k.team_id == team.id,
                        k.revoked_at.is_(None),
                        or_(k.expires_at.is_(None), k.expires_at > now),
                    )
                )
            ).scalar_one()
            if active and not force:
                raise Conflict(
                    f"team {name!r} has {active} active key(s); revoke or move them first, or delete "
                    "with force",
                    param="force",
                )
            removed = (await conn.execute(delete(api_keys).where(k.team_id == team.id))).rowcount
            await conn.execute(delete(teams).where(teams.c.id == team.id))
            await record_change(
                conn, now, actor, "team.delete", f"team:{name}", {"keys_removed": removed, "force": force}
            )
        await self._changed()
        return int(removed)

    async def set_team_limits(
        self, name: str, limits: Limits | Mapping[str, Any] | None, *, actor: str
    ) -> Team:
        """Replace team ``name``'s quota limits (None clears them); returns the team."""
        stored = None if limits is None else parse_limits(limits).to_dict()
        now = self.clock()
        async with self.engine.begin() as conn:
            team = await team_in(conn, name)
            changed = limits_json(team.limits) != stored
            if changed:
                await conn.execute(
                    update(teams)
                    .where(teams.c.id == team.id)
                    .values(limits=null() if stored is None else stored, updated_at=now)
                )
                await record_change(conn, now, actor, "team.limits", f"team:{name}", stored or {})
        if changed:
            await self._changed()
        return await self.get_team(name)

    async def get_team_limits(self, name: str) -> Limits | None:
        return (await self.get_team(name)).limits
