"""Errors meter itself raises, each knowing its HTTP status and OpenAI error ``type``/``code``.

Hierarchy::

    MeterError
    ├── RequestError              4xx: the client's request cannot be forwarded as sent
    │   ├── InvalidTarget         400: not a path under the upstream's base (meter.forward.target)
    │   ├── InvalidCredentials    400: several credentials, or a virtual key outside Authorization
    │   ├── InvalidHeader         400: a header value that is not UTF-8
    │   ├── MalformedRequest      400: not an HTTP/1.1 request meter can parse (the serving edge)
    │   ├── RequestTimeout        408: the head (serving edge) or the body (forward path) stopped
    │   ├── RequestTooLarge       413
    │   ├── RequestHeadTooLarge   431: request line and headers past their size or count (the serving edge)
    │   ├── NotFound              404 not_found: no such team, key or price row (admin API)
    │   └── Conflict              409 conflict: the name or key is taken, the team still has keys
    ├── AuthenticationError       401 (virtual keys, admin API)
    │   └── KeyRejected           401 invalid_api_key: unknown / revoked / expired virtual key, or a key
    │                                 nobody registered under METER_UNKNOWN_KEYS=reject
    ├── PermissionDenied          403
    ├── UpstreamCredentialMissing 500 upstream_credential_missing: a virtual key's team names a
    │                                 credential this process was not given
    ├── DirectoryUnavailable      503 key_directory_unavailable: the key directory has not loaded yet
    ├── QuotaUnavailable          503 quota_unavailable: no live quota status (admin API)
    ├── TooManyConnections        503: the process holds its maximum of client connections (the serving edge)
    └── UpstreamError             5xx: meter could not complete the exchange with the upstream
        ├── UpstreamUnreachable   502: connection refused / DNS / TLS / reset before a response
        ├── UpstreamProtocolError 502: the upstream answered something that is not HTTP
        └── UpstreamTimeout       504: connect or read timeout
    InternalError                 500: a fault in meter itself (the forward path answers it, never a
                                  plain-text 500)

Failures inside meter that are never an answer by themselves (each caller maps them: admission to its
failure policy, the CLI to a message, start-up to an exit)::

    SettingsError (ValueError)    a setting is unknown or malformed; the message names it
    TelemetryConfigError (ValueError) an OTEL_* variable meter cannot honour
    StoreUnavailable              the quota store's backend is unreachable or timed out
    JournalError                  the journal: JournalLocked (another process owns it), JournalClosed

Error *responses* of the upstream are not exceptions: they pass through unchanged. Third-party
exceptions (aiohttp, httpx) are mapped to these at the edge, in :mod:`meter.forward.upstream`. The
serving edge's errors (:mod:`meter.serving.guard`) are answered by the HTTP protocol itself, before any
ASGI request exists.
"""

from __future__ import annotations

from pathlib import Path

import orjson


class MeterError(Exception):
    status_code: int = 500
    error_type: str = "api_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def body(self) -> bytes:
        return error_body(self.message, self.error_type, self.code, self.param)


class RequestError(MeterError):
    status_code = 400
    error_type = "invalid_request_error"


class InvalidTarget(RequestError):
    code = "invalid_request_target"


class InvalidCredentials(RequestError):
    code = "invalid_credentials"


class InvalidHeader(RequestError):
    code = "invalid_header"


class RequestTimeout(RequestError):
    status_code = 408
    code = "request_timeout"


class RequestTooLarge(RequestError):
    status_code = 413
    code = "request_too_large"


class MalformedRequest(RequestError):
    code = "malformed_request"


class RequestHeadTooLarge(RequestError):
    status_code = 431
    code = "request_header_fields_too_large"


class AuthenticationError(MeterError):
    status_code = 401
    error_type = "authentication_error"
    code = "invalid_api_key"


class PermissionDenied(MeterError):
    status_code = 403
    error_type = "permission_error"
    code = "forbidden"


class TooManyConnections(MeterError):
    status_code = 503
    error_type = "api_error"
    code = "too_many_connections"


class UpstreamError(MeterError):
    status_code = 502
    error_type = "api_error"
    code = "upstream_error"


class UpstreamUnreachable(UpstreamError):
    code = "upstream_unreachable"


class UpstreamProtocolError(UpstreamError):
    code = "upstream_protocol_error"


class UpstreamTimeout(UpstreamError):
    status_code = 504
    code = "upstream_timeout"


class InternalError(MeterError):
    status_code = 500
    error_type = "api_error"
    code = "internal_error"


def error_body(message: str, error_type: str, code: str | None = None, param: str | None = None) -> bytes:
    """The OpenAI error shape: ``{"error": {"message", "type", "param", "code"}}``."""
    return orjson.dumps({"error": {"message": message, "type": error_type, "param": param, "code": code}})


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


class QuotaUnavailable(MeterError):
    """503: no live quota status (quotas not running in this process, or their store unreachable)."""

    status_code = 503
    error_type = "api_error"
    code = "quota_unavailable"


class DirectoryUnavailable(MeterError):
    status_code = 503
    error_type = "api_error"
    code = "key_directory_unavailable"


# -- failures that are not answers ---------------------------------------------------------------


class SettingsError(ValueError):
    """A setting is unknown or malformed; the message names it."""


class TelemetryConfigError(ValueError):
    """An ``OTEL_*`` variable is malformed or asks for something meter does not ship; names it."""


class StoreUnavailable(Exception):
    """The store's backend could not be reached or did not answer in time (``timed_out``)."""

    def __init__(self, store: str, cause: BaseException | None = None, *, timed_out: bool = False) -> None:
        super().__init__(f"quota store {store!r} unavailable: {cause!r}")
        self.store = store
        self.cause = cause
        self.timed_out = timed_out


class JournalError(Exception):
    """Base of the journal's own errors."""


class JournalLocked(JournalError):
    """Another process owns the journal directory."""

    def __init__(self, directory: Path, holder: str | None) -> None:
        self.directory = directory
        self.holder = holder
        who = f"another meter process ({holder})" if holder else "another meter process"
        super().__init__(
            f"journal directory {directory} is locked by {who}. Each meter process needs a journal "
            "directory of its own: give every replica its own METER_JOURNAL_DIR, or point workers at a "
            "shared root and let each claim a subdirectory (w0, w1, ...)."
        )


class JournalClosed(JournalError):
    """The journal was closed; nothing more can be appended."""
