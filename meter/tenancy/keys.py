"""Keys and teams as plain values, and the pure decision "presented key → team and upstream credential".

Two kinds of registered key:

* **passthrough**: a provider key a team's clients keep sending; meter forwards it unchanged and
  attributes the usage to the team. Registered by value (fingerprinted on arrival, never stored) or by
  its fingerprint.
* **virtual**: ``mk-`` + 43 random URL-safe characters (256 bits), issued by meter and shown once.
  meter swaps it for the team's upstream credential (else the global ``METER_UPSTREAM_API_KEY``);
  the virtual key itself never leaves meter.

Rule 1: keys are compared by their HMAC-SHA256 fingerprint (:class:`meter.tenancy.identity.KeyFingerprinter`),
        the value usage records carry, so a lookup is one dict hit and a key row joins its usage.
Rule 2: a key starting with ``mk-`` is a virtual key whatever the policy: unknown, revoked or expired,
        it is refused (401) and never forwarded, so a virtual key cannot leak upstream by mistake.
Rule 3: any other key nobody registered follows the unknown-key policy: ``allow`` meters it under team
        ``unassigned``; ``reject`` refuses it (401), as it does a request without a key.
Rule 4: a revoked passthrough key is refused too: revoking says "stop this key", whatever the policy.

Pure: no I/O; time is a parameter.
"""

from __future__ import annotations

import enum
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from meter.errors import KeyRejected, UpstreamCredentialMissing
from meter.tenancy.identity import KeyIdentity

VIRTUAL_PREFIX = "mk-"
VIRTUAL_RANDOM_BYTES = 32  # 43 URL-safe characters
UNASSIGNED = "unassigned"  # the team of keys nobody registered (and the metrics label of "no team")
RESERVED_TEAMS = frozenset({UNASSIGNED, "other"})  # "other" is the metrics overflow label
_TEAM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_LABEL_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,63}")


class KeyKind(enum.StrEnum):
    VIRTUAL = "virtual"
    PASSTHROUGH = "passthrough"


class ResolutionKind(enum.StrEnum):
    VIRTUAL = "virtual"
    PASSTHROUGH = "passthrough"
    UNKNOWN = "unknown"  # a key nobody registered, let through under the allow policy
    ANONYMOUS = "anonymous"  # no key at all, let through under the allow policy


class UnknownKeyPolicy(enum.StrEnum):
    ALLOW = "allow"
    REJECT = "reject"


@dataclass(frozen=True, slots=True)
class Resolution:
    """Who a request is, decided before forwarding.

    ``upstream_authorization`` is the complete ``Authorization`` header value to send upstream instead
    of the client's (virtual keys), or None to forward the client's header unchanged.
    """

    team: str
    kind: ResolutionKind
    fingerprint: str | None = None
    suffix: str | None = None
    key_id: int | None = None
    upstream_authorization: str | None = None


@dataclass(frozen=True, slots=True)
class KeyEntry:
    """One registered key as the directory caches it. ``expires_at`` is epoch seconds."""

    key_id: int
    team: str
    kind: KeyKind
    revoked: bool = False
    expires_at: float | None = None
    credential: str | None = None  # the team's credential name, for error messages
    upstream_authorization: str | None = None  # "Bearer <secret>" for virtual keys, resolved at load


def new_virtual_key() -> str:
    return VIRTUAL_PREFIX + secrets.token_urlsafe(VIRTUAL_RANDOM_BYTES)


def is_virtual(key: str) -> bool:
    return key.startswith(VIRTUAL_PREFIX)


def resolve(
    entries: Mapping[str, KeyEntry],
    key: str | None,
    identity: KeyIdentity | None,
    policy: UnknownKeyPolicy,
    now: float,
) -> tuple[Resolution, KeyEntry | None]:
    """The resolution of a presented ``key`` (its ``identity`` computed by the caller), and the entry
    it matched. Raises :class:`KeyRejected` (Rules 2-4) or :class:`UpstreamCredentialMissing`."""
    if key is None or identity is None:
        if policy is UnknownKeyPolicy.REJECT:
            raise KeyRejected(
                "no API key: send 'Authorization: Bearer <key>' with a key registered in meter",
                team=UNASSIGNED,
            )
        return Resolution(UNASSIGNED, ResolutionKind.ANONYMOUS), None
    fingerprint, suffix = identity.fingerprint, identity.suffix
    entry = entries.get(fingerprint)
    if entry is None:
        if is_virtual(key):
            raise KeyRejected(
                f"unknown virtual key {suffix}", fingerprint=fingerprint, suffix=suffix, team=UNASSIGNED
            )
        if policy is UnknownKeyPolicy.REJECT:
            raise KeyRejected(
                f"API key {suffix} is not registered in meter",
                team=UNASSIGNED,
                fingerprint=fingerprint,
                suffix=suffix,
            )
        return Resolution(UNASSIGNED, ResolutionKind.UNKNOWN, fingerprint, suffix), None
    noun = "virtual key" if entry.kind is KeyKind.VIRTUAL else "API key"
    if entry.revoked:
        raise KeyRejected(
            f"{noun} {suffix} has been revoked", team=entry.team, fingerprint=fingerprint, suffix=suffix
        )
    if entry.expires_at is not None and now >= entry.expires_at:
        raise KeyRejected(
            f"{noun} {suffix} has expired", team=entry.team, fingerprint=fingerprint, suffix=suffix
        )
    if entry.kind is KeyKind.PASSTHROUGH:
        return Resolution(entry.team, ResolutionKind.PASSTHROUGH, fingerprint, suffix, entry.key_id), entry
    if entry.upstream_authorization is None:
        where = (
            f"credential {entry.credential!r} of team {entry.team!r}"
            if entry.credential
            else "METER_UPSTREAM_API_KEY"
        )
        raise UpstreamCredentialMissing(
            f"virtual key {suffix} cannot be forwarded: {where} is not configured on this meter",
            team=entry.team,
            fingerprint=fingerprint,
            suffix=suffix,
        )
    resolution = Resolution(
        entry.team,
        ResolutionKind.VIRTUAL,
        fingerprint,
        suffix,
        entry.key_id,
        entry.upstream_authorization,
    )
    return resolution, entry


def check_team_name(name: Any) -> str:
    """``name`` if it is a valid team name, else ValueError saying what is allowed."""
    if not isinstance(name, str) or not _TEAM_NAME.fullmatch(name):
        raise ValueError(
            f"team name {name!r} must be 1-64 characters: letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    if name in RESERVED_TEAMS:
        raise ValueError(f"team name {name!r} is reserved")
    return name


def check_labels(labels: Any) -> dict[str, str]:
    """``labels`` as a str → str dict (at most 64 entries), else ValueError."""
    if labels is None:
        return {}
    if not isinstance(labels, Mapping):
        raise ValueError("labels must be an object of string values")
    if len(labels) > 64:
        raise ValueError("at most 64 labels")
    checked: dict[str, str] = {}
    for name, value in labels.items():
        if not isinstance(name, str) or not _LABEL_KEY.fullmatch(name):
            raise ValueError(f"label name {name!r} must be 1-64 letters, digits, '.', '_', '/' or '-'")
        if not isinstance(value, str) or len(value) > 256:
            raise ValueError(f"label {name!r} must have a string value of at most 256 characters")
        checked[name] = value
    return checked
