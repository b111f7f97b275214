"""Who is calling: API key → fingerprint.

Rule 1: the raw key never leaves this module's return values except as ``fingerprint`` (HMAC-SHA256
        of the key under the server secret, hex) and ``suffix`` (``"..."`` + its last 4 characters).
Rule 2: the same secret must be shared by every replica writing to one database, or the same key gets
        different fingerprints. For SQLite (one node) meter generates it once and keeps it in a file
        beside the database; for any other database ``METER_KEY_SECRET`` is required.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from meter.settings import Settings, SettingsError


@dataclass(frozen=True, slots=True)
class KeyIdentity:
    fingerprint: str
    suffix: str


def bearer_token(authorization: str | None) -> str | None:
    """The credential of an ``Authorization: Bearer <key>`` header (scheme case-insensitive)."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    token = token.strip()
    return token or None


class KeyFingerprinter:
    def __init__(self, secret: bytes) -> None:
        if len(secret) < 16:
            raise SettingsError("METER_KEY_SECRET must be at least 16 bytes long")
        self._secret = secret
        # keyed once: a copy per request skips HMAC's key setup (OpenSSL 3 also looks the digest
        # up again for every new HMAC), ~40% of the fingerprint's cost
        self._keyed = hmac.new(secret, digestmod=hashlib.sha256)

    def identify(self, key: str) -> KeyIdentity:
        mac = self._keyed.copy()
        mac.update(key.encode("utf-8", "surrogateescape"))
        return KeyIdentity(fingerprint=mac.hexdigest(), suffix="..." + key[-4:])


def load_key_secret(settings: Settings) -> bytes:
    """The HMAC secret: ``METER_KEY_SECRET``, else a file generated once beside the SQLite database."""
    if settings.key_secret:
        return settings.key_secret.encode()
    if settings.key_secret_file:
        path = Path(settings.key_secret_file)
    elif settings.is_sqlite:
        db = settings.sqlite_path
        path = (db.parent if db else Path.cwd()) / "meter.key"
    else:
        raise SettingsError(
            "METER_KEY_SECRET is required with a non-SQLite database: every replica must fingerprint "
            "keys with the same secret"
        )
    if path.exists():
        return path.read_bytes().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_hex(32).encode()
    # Write a temporary file, then hard-link it into place: link() fails if the name exists, so when
    # several workers start at once exactly one secret wins and nobody reads a half-written file.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(secret)
    try:
        os.link(tmp, path)
    except FileExistsError:
        secret = path.read_bytes().strip()
    finally:
        tmp.unlink(missing_ok=True)
    return secret
