"""Upstream credentials for virtual keys: what meter sends upstream in place of an ``mk-`` key.

Decision (the database never holds a secret): a team stores only the *name* of its credential
(``teams.upstream_credential``); the secrets themselves reach each meter process through its
configuration, parsed once at start:

* ``METER_UPSTREAM_API_KEY``: the default credential, for teams that name none;
* ``METER_UPSTREAM_CREDENTIALS_FILE``: a TOML file of ``name = "secret"`` lines (typically a mounted
  Kubernetes/Docker secret), for teams with their own provider account.

Adding a credential therefore means updating that file on every replica and restarting them (a
rolling restart); assigning an existing name to a team takes effect within the directory refresh
interval. A virtual key whose team names a credential this process does not have is refused with 500
``upstream_credential_missing``, never forwarded with another team's (or the default) credential.

Pure apart from :func:`load_credentials_file`, which reads the file it is given.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def check_credential_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise ValueError(
            f"credential name {name!r} must be 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


@dataclass(frozen=True, slots=True)
class UpstreamCredentials:
    """The default credential and the named ones. ``repr`` shows names only, never a secret."""

    default: str | None = field(default=None, repr=False)
    named: Mapping[str, str] = field(default_factory=dict, repr=False)

    def __repr__(self) -> str:
        return (
            f"UpstreamCredentials(default={'set' if self.default else 'unset'}, names={sorted(self.named)})"
        )

    def authorization(self, name: str | None) -> str | None:
        """The ``Authorization`` value for credential ``name`` (None: the default), or None if absent."""
        secret = self.named.get(name) if name else self.default
        return f"Bearer {secret}" if secret else None

    def has(self, name: str) -> bool:
        return name in self.named


def load_credentials_file(path: str) -> dict[str, str]:
    """``name = "secret"`` pairs of a TOML file, validated; ValueError naming the file and entry."""
    import tomllib

    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except OSError as exc:
        raise ValueError(f"{path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: {exc}") from None
    credentials: dict[str, str] = {}
    for name, secret in data.items():
        try:
            check_credential_name(name)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None
        if not isinstance(secret, str) or not secret.strip() or any(c in secret for c in "\r\n"):
            raise ValueError(f"{path}: credential {name!r} must be a non-empty single-line string")
        credentials[name] = secret.strip()
    return credentials
