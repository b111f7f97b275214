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
    │   └── RequestHeadTooLarge   431: request line and headers past their size or count (the serving edge)
    ├── AuthenticationError       401 (virtual keys, admin API)
    ├── PermissionDenied          403
    ├── TooManyConnections        503: the process holds its maximum of client connections (the serving edge)
    └── UpstreamError             5xx: meter could not complete the exchange with the upstream
        ├── UpstreamUnreachable   502: connection refused / DNS / TLS / reset before a response
        ├── UpstreamProtocolError 502: the upstream answered something that is not HTTP
        └── UpstreamTimeout       504: connect or read timeout
    InternalError                 500: a fault in meter itself (the forward path answers it, never a
                                  plain-text 500)

Error *responses* of the upstream are not exceptions: they pass through unchanged. Third-party
exceptions (aiohttp, httpx) are mapped to these at the edge, in :mod:`meter.forward.upstream`. The
serving edge's errors (:mod:`meter.serving.guard`) are answered by the HTTP protocol itself, before any
ASGI request exists.
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
