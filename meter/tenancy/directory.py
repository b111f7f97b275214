"""The key directory: presented key → :class:`~meter.tenancy.keys.Resolution`, from memory.

Rule 1 (hot path): :meth:`KeyDirectory.resolve` is synchronous: one HMAC of the key (the fingerprint
        the usage record needs anyway) and one dict lookup. It never touches the database.
Rule 2 (freshness): the dict is replaced wholesale by :meth:`load`, which the refresher
        (:class:`meter.tenancy.runtime.Tenancy`) calls when ``tenancy_state.version`` changed (polled
        every ``refresh_interval`` seconds, 2 by default) and right after an admin write made by this
        process. Every replica therefore applies a change within one interval.
Rule 3 (last used): a hit notes the time in a dict; the refresher writes those to
        ``api_keys.last_used_at`` in one transaction per interval, never from the request.
Rule 4 (quota limits): loaded with the keys, into two dicts (team name → Limits, key fingerprint →
        Limits) that :meth:`KeyDirectory.limits` reads per request without touching the database.
        Only non-empty limits are kept, and none of revoked keys (they are refused before admission).
        A stored value this version cannot read (e.g. written by a newer meter during a rolling
        upgrade) keeps the subject's previous limits, if any; it is logged and counted as a refresh
        error, and never stops the rest of the directory from loading.

Failure policy: fail-closed until the first load (every key would otherwise be "unknown" and its
usage misattributed): :meth:`resolve` raises ``DirectoryUnavailable`` (503) and ``loaded`` is False
for readiness probes. After that, fail-static: a refresh that fails keeps serving the last good
directory (counted in ``meter_key_directory_refresh_errors_total``) and is retried next interval.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from meter.db.tenancy_models import api_keys, teams
from meter.errors import DirectoryUnavailable
from meter.quota.policy import Limits
from meter.tenancy.credentials import UpstreamCredentials
from meter.tenancy.identity import KeyFingerprinter
from meter.tenancy.keys import KeyEntry, KeyKind, Resolution, UnknownKeyPolicy, resolve

log = logging.getLogger("meter.tenancy")


class KeyDirectory:
    def __init__(
        self,
        fingerprinter: KeyFingerprinter,
        credentials: UpstreamCredentials,
        *,
        policy: UnknownKeyPolicy = UnknownKeyPolicy.ALLOW,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._fingerprinter = fingerprinter
        self._credentials = credentials
        self.policy = policy
        self._clock = clock
        self._entries: Mapping[str, KeyEntry] | None = None
        self._last_used: dict[int, float] = {}
        # Rule 4. Keyed by ``str | None`` so that a request without a key is one lookup too.
        self.team_limits: Mapping[str | None, Limits] = {}
        self.key_limits: Mapping[str | None, Limits] = {}
        self.unreadable_limits = 0  # stored values skipped by the last load (Rule 4)

    @property
    def loaded(self) -> bool:
        return self._entries is not None

    def __len__(self) -> int:
        return len(self._entries or {})

    def resolve(self, key: str | None) -> Resolution:
        """Who ``key`` (the bearer token, or None) is. Raises ``KeyRejected`` (401),
        ``UpstreamCredentialMissing`` (500) or ``DirectoryUnavailable`` (503); see meter.tenancy.keys."""
        entries = self._entries
        if entries is None:
            raise DirectoryUnavailable("meter has not loaded its key directory yet; retry shortly")
        identity = self._fingerprinter.identify(key) if key is not None else None
        now = self._clock()
        resolution, entry = resolve(entries, key, identity, self.policy, now)
        if entry is not None:
            self._last_used[entry.key_id] = now
        return resolution

    def set_entries(
        self, rows: Iterable[tuple[str, int, KeyKind, str, str | None, bool, datetime | None]]
    ) -> None:
        """Replace the directory: rows of (fingerprint, key id, kind, team, team credential name,
        revoked, expires_at). Upstream authorizations are resolved here, once, not per request."""
        entries: dict[str, KeyEntry] = {}
        for fingerprint, key_id, kind, team, credential, revoked, expires_at in rows:
            entries[fingerprint] = KeyEntry(
                key_id=key_id,
                team=team,
                kind=kind,
                revoked=revoked,
                expires_at=None if expires_at is None else expires_at.timestamp(),
                credential=credential,
                upstream_authorization=(
                    self._credentials.authorization(credential) if kind is KeyKind.VIRTUAL else None
                ),
            )
        self._entries = entries

    def limits(self, team: str, key_fp: str | None) -> tuple[Limits | None, Limits | None]:
        """``(team limits, key limits)`` from memory (Rule 4); None where there are none."""
        return self.team_limits.get(team), self.key_limits.get(key_fp)

    def set_limits(self, team_rows: Iterable[tuple[str, Any]], key_rows: Iterable[tuple[str, Any]]) -> None:
        """Replace the limits: rows of (team name or key fingerprint, stored ``limits`` value)."""
        self.unreadable_limits = 0
        team_limits = self._parse_limits("team", team_rows, self.team_limits)
        key_limits = self._parse_limits("key", key_rows, self.key_limits)
        self.team_limits, self.key_limits = team_limits, key_limits

    def _parse_limits(
        self, kind: str, rows: Iterable[tuple[str, Any]], previous: Mapping[str | None, Limits]
    ) -> dict[str | None, Limits]:
        parsed: dict[str | None, Limits] = {}
        for name, value in rows:
            if value is None:
                continue
            try:
                limits = Limits.from_dict(value)
            except (ValueError, TypeError) as exc:
                self.unreadable_limits += 1
                kept = previous.get(name)
                shown = name if kind == "team" else (self._describe_key(name) or "a key")
                log.error(
                    "cannot read the quota limits of %s %s (%s); %s",
                    kind,
                    shown,
                    exc,
                    "keeping its previous limits" if kept else "it has no limits until they are fixed",
                )
                if kept is not None:
                    parsed[name] = kept
                continue
            if not limits.is_empty:
                parsed[name] = limits
        return parsed

    def _describe_key(self, fingerprint: str) -> str | None:
        entry = (self._entries or {}).get(fingerprint)
        return None if entry is None else f"id {entry.key_id}"

    async def load(self, conn: AsyncConnection) -> None:
        k = api_keys.c
        stmt = select(
            k.fingerprint,
            k.id,
            k.kind,
            teams.c.name,
            teams.c.upstream_credential,
            k.revoked_at,
            k.expires_at,
            k.limits,
        ).join(teams, teams.c.id == k.team_id)
        rows = (await conn.execute(stmt)).all()
        team_rows = (await conn.execute(select(teams.c.name, teams.c.limits))).all()
        # No await below: requests see the old directory or the new one, never a mix.
        self.set_entries((m[0], int(m[1]), KeyKind(m[2]), m[3], m[4], m[5] is not None, m[6]) for m in rows)
        self.set_limits(((m[0], m[1]) for m in team_rows), ((m[0], m[7]) for m in rows if m[5] is None))

    def take_last_used(self) -> dict[int, datetime]:
        """The last-use times noted since the previous call (Rule 3), as UTC datetimes."""
        used, self._last_used = self._last_used, {}
        return {key_id: datetime.fromtimestamp(at, UTC) for key_id, at in used.items()}

    def restore_last_used(self, used: Mapping[int, datetime]) -> None:
        """Put back times a failed flush could not write (newer notes win)."""
        for key_id, at in used.items():
            self._last_used.setdefault(key_id, at.timestamp())
