"""Errors of tenancy, prices and billing, in meter's error hierarchy (:mod:`meter.errors`)::

    MeterError
    ├── RequestError
    │   ├── NotFound               404 not_found: no such team, key or price row
    │   └── Conflict               409 conflict: the name or key is taken, the team still has keys
    ├── AuthenticationError
    │   └── KeyRejected            401 invalid_api_key: unknown / revoked / expired virtual key, or a key
    │                                  nobody registered under METER_UNKNOWN_KEYS=reject
    └── UpstreamCredentialMissing  500 upstream_credential_missing: a virtual key's team names a
                                       credential this process was not given
    (DirectoryUnavailable          503 key_directory_unavailable: the key directory has not loaded yet)

They answer in the OpenAI error shape like every other :class:`~meter.errors.MeterError`.
"""

from __future__ import annotations

from meter.errors import AuthenticationError, MeterError, RequestError


class NotFound(RequestError):
    status_code = 404
    code = "not_found"


class Conflict(RequestError):
    status_code = 409
    code = "conflict"


class KeyRefusal:
    """Mixin of the errors that refuse a known key: its team, fingerprint and suffix, for the
    request's usage record (the message never contains the key)."""

    def __init__(
        self,
        message: str,
        *,
        team: str = "",
        fingerprint: str | None = None,
        suffix: str | None = None,
    ) -> None:
        super().__init__(message)  # type: ignore[call-arg]
        self.team = team
        self.fingerprint = fingerprint
        self.suffix = suffix


class KeyRejected(KeyRefusal, AuthenticationError):
    """A presented key meter will not forward."""


class UpstreamCredentialMissing(KeyRefusal, MeterError):
    status_code = 500
    error_type = "api_error"
    code = "upstream_credential_missing"


class DirectoryUnavailable(MeterError):
    status_code = 503
    error_type = "api_error"
    code = "key_directory_unavailable"
