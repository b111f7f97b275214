"""Errors meter itself raises, each knowing its HTTP status and OpenAI error ``type``/``code``.

Hierarchy::

    MeterError
    ├── RequestError              4xx: the client's request cannot be forwarded as sent
    │   ├── InvalidTarget         400: not a path under the upstream's base (meter.target)
    │   ├── InvalidCredentials    400: several credentials, or a virtual key outside Authorization
    │   ├── InvalidHeader         400: a header value that is not UTF-8
    │   ├── RequestTimeout        408: the client stopped sending its body
    │   └── RequestTooLarge       413
    ├── AuthenticationError       401 (virtual keys, admin API)
    ├── PermissionDenied          403
    └── UpstreamError             5xx: meter could not complete the exchange with the upstream
        ├── UpstreamUnreachable   502: connection refused / DNS / TLS / reset before a response
        ├── UpstreamProtocolError 502: the upstream answered something that is not HTTP
        └── UpstreamTimeout       504: connect or read timeout
    InternalError                 500: a fault in meter itself (the forward path answers it, never a
                                  plain-text 500)

Error *responses* of the upstream are not exceptions: they pass through unchanged. Third-party
exceptions (aiohttp, httpx) are mapped to these at the edge, in :mod:`meter.forward`.
"""

from __future__ import annotations

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


class AuthenticationError(MeterError):
    status_code = 401
    error_type = "authentication_error"
    code = "invalid_api_key"


class PermissionDenied(MeterError):
    status_code = 403
    error_type = "permission_error"
    code = "forbidden"


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
