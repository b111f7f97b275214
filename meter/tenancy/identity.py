"""Who is calling: the request's one credential → fingerprint.

Rule 1: the raw key never leaves this module's return values except as ``fingerprint`` (HMAC-SHA256
        of the key under the server secret, hex) and ``suffix`` (``"..."`` + its last 4 characters,
        only for keys of at least ``SUFFIX_MIN_KEY_CHARS``: of a shorter key, 4 characters say too
        much; ``""`` then).
Rule 2: the same secret must be shared by every replica writing to one database, or the same key gets
        different fingerprints. For SQLite (one node) meter generates it once and keeps it in a file
        beside the database; for any other database ``METER_KEY_SECRET`` is required.
Rule 3 (one credential): a request carries at most one credential, in ``Authorization`` (the
        ``Bearer`` scheme matched case-insensitively, then spaces or tabs; any other value is the
        credential as a whole, so a key sent without the scheme is still the key it is) or in
        ``api-key`` / ``x-api-key`` (the headers other OpenAI-style SDKs send). Two ``Authorization``
        headers, or two different credentials, are refused: the identity meter judges (team, quota)
        must be the one whose credential the upstream receives.
Rule 4: a virtual key (``mk-`` + URL-safe characters) is recognised anywhere in the headers and the
        query string. Outside the credential itself it is refused, so it can never be forwarded.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from meter.errors import InvalidCredentials, SettingsError
from meter.settings import Settings

CREDENTIAL_HEADERS = frozenset({b"authorization", b"api-key", b"x-api-key"})
SUFFIX_MIN_KEY_CHARS = 24
_BEARER = re.compile(r"bearer[ \t]+", re.IGNORECASE)
# Issued virtual keys are mk- and 43 characters; 16 already make it one (a cut key leaks as much).
_VIRTUAL_KEY = re.compile(rb"mk-[A-Za-z0-9_-]{16,}")


@dataclass(frozen=True, slots=True)
class KeyIdentity:
    fingerprint: str
    suffix: str  # "" for a key shorter than SUFFIX_MIN_KEY_CHARS


def bearer_token(authorization: str | None) -> str | None:
    """The credential of an ``Authorization: Bearer <key>`` header (scheme case-insensitive, then
    spaces or tabs), or None for any other value."""
    if not authorization:
        return None
    value = authorization.strip(" \t")
    match = _BEARER.match(value)
    if match is None:
        return None
    return value[match.end() :] or None


def _key_of(name: bytes, value: bytes) -> str | None:
    if value.startswith(b"Bearer ") and value[7:8] not in (b" ", b"\t", b""):
        return value[7:].decode("latin-1")  # the common case (the server already cut trailing OWS)
    text = value.decode("latin-1").strip(" \t")
    if name == b"authorization":
        match = _BEARER.match(text)
        if match is not None:
            return text[match.end() :] or None
        if text.lower() == "bearer":
            return None
    return text or None


def request_credential(headers: Sequence[tuple[bytes, bytes]], query: bytes = b"") -> str | None:
    """The request's one credential (Rules 3-4), or None without one; raises
    :class:`~meter.errors.InvalidCredentials` (400). ``headers``: ASGI's, names lower-case."""
    key: str | None = None
    authorizations = 0
    virtual: list[bytes] = []  # virtual keys seen in credential headers
    misplaced = b"mk-" in query and _VIRTUAL_KEY.search(query) is not None
    for name, value in headers:
        if name not in CREDENTIAL_HEADERS:
            if b"mk-" in value and _VIRTUAL_KEY.search(value) is not None:
                misplaced = True
            continue
        if b"mk-" in value:
            virtual.extend(_VIRTUAL_KEY.findall(value))
        if name == b"authorization":
            authorizations += 1
            if authorizations > 1:
                raise InvalidCredentials("a request may carry one Authorization header; this one has several")
        found = _key_of(name, value)
        if found is None:
            continue
        if key is not None and found != key:
            raise InvalidCredentials(
                "the request carries several different credentials (Authorization, api-key, x-api-key); "
                "send one"
            )
        key = found
    if misplaced or (virtual and any(found.decode("latin-1") != key for found in virtual)):
        raise InvalidCredentials(
            "a meter virtual key (mk-...) may only be sent as the request's credential "
            "(Authorization: Bearer mk-...); it was found elsewhere in the request and was not forwarded"
        )
    return key


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
        suffix = "..." + key[-4:] if len(key) >= SUFFIX_MIN_KEY_CHARS else ""
        return KeyIdentity(fingerprint=mac.hexdigest(), suffix=suffix)


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
