"""The key directory: presented key → :class:`~meter.tenancy.keys.Resolution`, from memory.

Rule 1 (hot path): :meth:`KeyDirectory.resolve` is synchronous: one HMAC of the key (the fingerprint
        the usage record needs anyway) and one dict lookup. It never touches the database.
Rule 2 (freshness): the dict is replaced wholesale by :meth:`load`, which the refresher
        (:class:`meter.tenancy.runtime.Tenancy`) calls when ``tenancy_state.version`` changed (polled
        every ``refresh_interval`` seconds, 2 by default) and right after an admin write made by this
        process. Every replica therefore applies a change within one interval.
Rule 3 (last used): a hit notes the time in a dict; the refresher writes those to
        ``api_keys.last_used_at`` in one transaction per interval, never from the request.

Failure policy: fail-closed until the first load (every key would otherwise be "unknown" and its
usage misattributed): :meth:`resolve` raises ``DirectoryUnavailable`` (503) and ``loaded`` is False
for readiness probes. After that, fail-static: a refresh that fails keeps serving the last good
directory (counted in ``meter_key_directory_refresh_errors_total``) and is retried next interval.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from meter.db.tenancy_models import api_keys, teams
from meter.identity import KeyFingerprinter
from meter.tenancy.credentials import UpstreamCredentials
from meter.tenancy.errors import DirectoryUnavailable
from meter.tenancy.keys import KeyEntry, KeyKind, Resolution, UnknownKeyPolicy, resolve


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

    async def load(self, conn: AsyncConnection) -> None:
        k = api_keys.c
        stmt = select(
            k.fingerprint, k.id, k.kind, teams.c.name, teams.c.upstream_credential, k.revoked_at, k.expires_at
        ).join(teams, teams.c.id == k.team_id)
        rows = await conn.execute(stmt)
        self.set_entries((m[0], int(m[1]), KeyKind(m[2]), m[3], m[4], m[5] is not None, m[6]) for m in rows)

    def take_last_used(self) -> dict[int, datetime]:
        """The last-use times noted since the previous call (Rule 3), as UTC datetimes."""
        used, self._last_used = self._last_used, {}
        return {key_id: datetime.fromtimestamp(at, UTC) for key_id, at in used.items()}

    def restore_last_used(self, used: Mapping[int, datetime]) -> None:
        """Put back times a failed flush could not write (newer notes win)."""
        for key_id, at in used.items():
            self._last_used.setdefault(key_id, at.timestamp())
