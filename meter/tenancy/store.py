"""Teams and keys in the database: the writes the admin API and the CLI share, with their audit trail.

Rule 1: one transaction per admin action: the change, its ``audit_log`` row, and the bump of
        ``tenancy_state.version`` that tells every replica to reload (meter.db.tenancy_models, Rule 2).
        After the commit ``on_change`` runs, so the process that made the change sees it at once.
Rule 2: raw keys pass through here only to be fingerprinted; no table, audit detail, log line or
        return value other than :attr:`IssuedKey.key` (the one-time display) holds one.
Rule 3: history is not rewritten: usage records carry the team *name* they were attributed to when
        they happened, so renaming a team, moving a key or deleting a team changes only what happens
        from now on.
Rule 4: errors are meter errors: 400 for invalid input, 404 for a missing team or key, 409 for a taken
        name or key and for deleting a team that still has active keys (unless forced).
Rule 5: quota limits are stored whole (``Limits.to_dict()``; NULL when none): setting them replaces the
        previous set, and the audit detail is the new set (``{}`` when cleared). Setting the same
        limits again changes, audits and bumps nothing.

Failure policy: database errors propagate; an admin action either happened completely or not at all.
"""

from __future__ import annotations

import getpass
import hashlib
import logging
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import and_, delete, func, insert, null, or_, select, update
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from meter.db.tenancy_models import api_keys, audit_log, teams, tenancy_state
from meter.errors import RequestError
from meter.identity import KeyFingerprinter
from meter.quota.policy import Limits
from meter.tenancy.errors import Conflict, NotFound
from meter.tenancy.keys import KeyKind, check_labels, check_team_name, is_virtual, new_virtual_key

log = logging.getLogger("meter.tenancy")

Clock = Callable[[], datetime]
_HEX64 = frozenset("0123456789abcdef")


def utc_now() -> datetime:
    return datetime.now(UTC)


def admin_actor(token: str) -> str:
    """The audit actor for a request made with admin ``token``: a short digest, enough to tell two
    tokens apart after a rotation, too short to help anyone guess the token."""
    return "admin:" + hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()[:12]


def cli_actor() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except Exception:  # no user name in a bare container
        return "cli"


@dataclass(frozen=True, slots=True)
class Team:
    id: int
    name: str
    description: str
    labels: dict[str, str]
    upstream_credential: str | None
    created_at: datetime
    updated_at: datetime
    limits: Limits | None = None  # quota limits (Rule 5)

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
    limits: Limits | None = None  # quota limits (Rule 5)

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


def limits_json(limits: Limits | None) -> dict[str, Any] | None:
    """How limits are stored and shown: ``Limits.to_dict()`` (money as strings), None for none."""
    return None if limits is None else limits.to_dict()


def stored_limits(value: Any, subject: str = "") -> Limits | None:
    """The limits a ``limits`` column holds (SQL NULL and JSON null alike mean none). A value this
    version cannot read (e.g. written by a newer meter) is logged and shown as None, so the team or
    key stays manageable; the directory keeps enforcing what it last read (meter.tenancy.directory)."""
    if value is None:
        return None
    try:
        return Limits.from_dict(value)
    except (ValueError, TypeError) as exc:
        log.warning("cannot read the stored quota limits of %s (%s); shown as none", subject, exc)
        return None


def parse_limits(data: Any) -> Limits:
    """``data`` (a mapping of Limits fields, e.g. an admin API body) as validated :class:`Limits`;
    RequestError (400) with Limits.from_dict's message naming the offending field otherwise."""
    if isinstance(data, Limits):
        return data
    if not isinstance(data, Mapping):
        raise RequestError("limits must be an object of limit fields", param="limits")
    try:
        limits = Limits.from_dict(data)
    except ValueError as exc:
        message = str(exc)
        unknown = sorted(str(name) for name in data if name not in _LIMIT_FIELDS)
        param = (
            unknown[0]
            if unknown
            else next((name for name in _LIMIT_FIELDS if message.startswith(name + " ")), "limits")
        )
        raise RequestError(message, param=param) from None
    for name, value in zip(_RANKED_FIELDS, limits.by_rank, strict=True):
        if value is not None and value > MAX_LIMIT:
            largest = Decimal(MAX_LIMIT) / 1_000_000 if name == "budget_usd" else MAX_LIMIT
            raise RequestError(f"{name} must be at most {largest}", param=name)
    return limits


_LIMIT_FIELDS = tuple(Limits().to_dict())
# Limits.by_rank order (the USD budget in micro-USD). Redis scripts count in Lua numbers (doubles),
# exact up to 2**53: larger limits would not be enforced exactly.
_RANKED_FIELDS = (
    "budget_usd",
    "tokens_budget",
    "prompt_tokens_budget",
    "completion_tokens_budget",
    "rpm",
    "tpm",
    "max_concurrent",
)
MAX_LIMIT = 2**53 - 1


async def current_version(conn: AsyncConnection) -> int:
    version = (await conn.execute(select(tenancy_state.c.version).where(tenancy_state.c.id == 1))).scalar()
    return int(version or 0)


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


def _checked(check: Callable[[Any], Any], value: Any, param: str) -> Any:
    try:
        return check(value)
    except ValueError as exc:
        raise RequestError(str(exc), param=param) from None


def _text(value: Any, param: str, limit: int = 1024) -> str:
    if not isinstance(value, str) or len(value) > limit:
        raise RequestError(f"{param} must be a string of at most {limit} characters", param=param)
    return value


_UNSET: Any = object()


class TenancyStore:
    """Teams, keys and the audit log on ``engine``. ``credential_names``, when given, are the upstream
    credentials this process knows; naming another one is refused (None: not checked, e.g. the CLI
    run without the credentials file)."""

    def __init__(
        self,
        engine: AsyncEngine,
        fingerprinter: KeyFingerprinter,
        *,
        credential_names: Collection[str] | None = None,
        on_change: Callable[[], Awaitable[None]] | None = None,
        clock: Clock = utc_now,
    ) -> None:
        self.engine = engine
        self._fingerprinter = fingerprinter
        self._credential_names = None if credential_names is None else frozenset(credential_names)
        self._on_change = on_change
        self.clock = clock

    async def _changed(self) -> None:
        if self._on_change is not None:
            await self._on_change()

    def _credential(self, name: Any) -> str | None:
        if name is None or name == "":
            return None
        from meter.tenancy.credentials import check_credential_name

        name = _checked(check_credential_name, _text(name, "upstream_credential", 64), "upstream_credential")
        if self._credential_names is not None and name not in self._credential_names:
            raise RequestError(
                f"upstream credential {name!r} is not configured on this meter "
                "(add it to METER_UPSTREAM_CREDENTIALS_FILE on every replica first)",
                param="upstream_credential",
            )
        return str(name)

    # -- teams ----------------------------------------------------------------------------------

    async def create_team(
        self,
        actor: str,
        name: str,
        *,
        description: str = "",
        labels: Mapping[str, str] | None = None,
        upstream_credential: str | None = None,
    ) -> Team:
        name = _checked(check_team_name, name, "name")
        values = {
            "name": name,
            "description": _text(description, "description"),
            "labels": _checked(check_labels, labels, "labels"),
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
            return await self._team_in(conn, name)

    async def _team_in(self, conn: AsyncConnection, name: str) -> Team:
        row = (await conn.execute(select(teams).where(teams.c.name == name))).first()
        if row is None:
            raise NotFound(f"no team named {name!r}", param="team")
        return _team(row)

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
            changes["name"] = _checked(check_team_name, new_name, "name")
        if description is not None:
            changes["description"] = _text(description, "description")
        if labels is not None:
            changes["labels"] = _checked(check_labels, labels, "labels")
        if upstream_credential is not _UNSET:
            changes["upstream_credential"] = self._credential(upstream_credential)
        now = self.clock()
        try:
            async with self.engine.begin() as conn:
                team = await self._team_in(conn, name)
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
            team = await self._team_in(conn, name)
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

    # -- keys -----------------------------------------------------------------------------------

    async def issue_virtual_key(
        self, actor: str, team: str, *, name: str = "", expires_at: datetime | None = None
    ) -> IssuedKey:
        """A new ``mk-`` key for ``team``; the returned :attr:`IssuedKey.key` is shown once."""
        now = self.clock()
        if expires_at is not None:
            expires_at = _aware(expires_at)
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
            name=_text(name, "name", 256),
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
            suffix = _text(suffix or "", "suffix", 16)
        if expires_at is not None:
            expires_at = _aware(expires_at)
        key_id = await self._insert_key(
            actor,
            team,
            kind=KeyKind.PASSTHROUGH,
            fingerprint=fingerprint,
            suffix=suffix or "",
            name=_text(name, "name", 256),
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
                owner = await self._team_in(conn, team)
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
            return await self._key_in(conn, key_id)

    async def _key_in(self, conn: AsyncConnection, key_id: int) -> KeyInfo:
        stmt = (
            select(*_key_columns())
            .join(teams, teams.c.id == api_keys.c.team_id)
            .where(api_keys.c.id == key_id)
        )
        row = (await conn.execute(stmt)).first()
        if row is None:
            raise NotFound(f"no key with id {key_id}", param="key_id")
        return _key_info(row)

    async def list_keys(self, team: str | None = None) -> list[KeyInfo]:
        stmt = select(*_key_columns()).join(teams, teams.c.id == api_keys.c.team_id)
        async with self.engine.connect() as conn:
            if team is not None:
                owner = await self._team_in(conn, team)
                stmt = stmt.where(api_keys.c.team_id == owner.id)
            rows = await conn.execute(stmt.order_by(api_keys.c.id))
            return [_key_info(row) for row in rows]

    async def revoke_key(self, actor: str, key_id: int) -> KeyInfo:
        """Revoke a key (idempotent: revoking a revoked key changes nothing and audits nothing)."""
        now = self.clock()
        async with self.engine.begin() as conn:
            info = await self._key_in(conn, key_id)
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
        """Attribute a key's future usage to ``team`` (past records keep their team, Rule 3)."""
        now = self.clock()
        async with self.engine.begin() as conn:
            info = await self._key_in(conn, key_id)
            if info.team == team:
                return info
            owner = await self._team_in(conn, team)
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

    # -- quota limits (Rule 5) ------------------------------------------------------------------

    async def set_team_limits(
        self, name: str, limits: Limits | Mapping[str, Any] | None, *, actor: str
    ) -> Team:
        """Replace team ``name``'s quota limits (None clears them); returns the team."""
        stored = None if limits is None else parse_limits(limits).to_dict()
        now = self.clock()
        async with self.engine.begin() as conn:
            team = await self._team_in(conn, name)
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

    async def set_key_limits(
        self, key_id: int, limits: Limits | Mapping[str, Any] | None, *, actor: str
    ) -> KeyInfo:
        """Replace key ``key_id``'s quota limits (None clears them); returns the key."""
        stored = None if limits is None else parse_limits(limits).to_dict()
        now = self.clock()
        async with self.engine.begin() as conn:
            info = await self._key_in(conn, key_id)
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

    # -- prices ---------------------------------------------------------------------------------

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
        """See :func:`meter.tenancy.prices.add_price`; this process's catalog reloads at once."""
        from meter.tenancy.prices import add_price

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

    # -- audit ----------------------------------------------------------------------------------

    async def audit(
        self, *, limit: int = 100, since: datetime | None = None, target: str | None = None
    ) -> list[AuditEntry]:
        """Audit entries, newest first."""
        a = audit_log.c
        stmt = select(audit_log)
        if since is not None:
            stmt = stmt.where(a.at >= since)
        if target is not None:
            stmt = stmt.where(a.target == target)
        stmt = stmt.order_by(a.id.desc()).limit(limit)
        async with self.engine.connect() as conn:
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


def _aware(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
