"""Key fingerprints: HMAC-SHA256 of the key under the server secret, the same for the same key every
time, and the key itself shown only as its last four characters, and only for keys of at least 24."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from meter.errors import SettingsError
from meter.tenancy.identity import KeyFingerprinter, bearer_token

SECRET = b"0123456789abcdef-secret"


@pytest.mark.parametrize(
    "key",
    [
        "fw_abc123XYZ_0123456789abcd",
        "sk-" + "x" * 200,
        "clé-ünïcode-🔑-0123456789abc",
        "k\udcff-raw-byte-0123456789abc",
    ],
)
def test_the_fingerprint_is_the_hmac_of_the_key_every_time(key: str) -> None:
    fingerprinter = KeyFingerprinter(SECRET)
    expected = hmac.new(SECRET, key.encode("utf-8", "surrogateescape"), hashlib.sha256).hexdigest()
    first, again = fingerprinter.identify(key), fingerprinter.identify(key)
    assert first.fingerprint == again.fingerprint == expected
    assert first.suffix == "..." + key[-4:] and key not in first.suffix + first.fingerprint


@pytest.mark.parametrize("key", ["a", "abcd", "fw_abc123XYZ", "x" * 23])
def test_a_short_key_shows_no_suffix(key: str) -> None:
    # Of a key of 4 characters the "suffix" was the whole key; of 12, a third of it.
    assert KeyFingerprinter(SECRET).identify(key).suffix == ""


def test_different_keys_and_secrets_give_different_fingerprints() -> None:
    a, b = KeyFingerprinter(SECRET), KeyFingerprinter(SECRET + b"2")
    assert a.identify("key-1").fingerprint != a.identify("key-2").fingerprint
    assert a.identify("key-1").fingerprint != b.identify("key-1").fingerprint


def test_a_short_secret_is_refused() -> None:
    with pytest.raises(SettingsError, match="at least 16 bytes"):
        KeyFingerprinter(b"short")


@pytest.mark.parametrize(
    ("header", "token"),
    [
        ("Bearer abc", "abc"),
        ("bearer  abc ", "abc"),
        ("BEARER\tabc", "abc"),
        ("Basic abc", None),
        ("Bearer", None),
        ("Bearerabc", None),
        (None, None),
    ],
)
def test_bearer_token(header: str | None, token: str | None) -> None:
    assert bearer_token(header) == token
