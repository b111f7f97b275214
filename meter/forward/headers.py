"""Which headers cross the proxy (RFC 9110 §7.6.1).

Rule 1: end-to-end headers pass unchanged in both directions, in their order, repeated ones included.
Rule 2: hop-by-hop headers (the fixed list below plus every name the ``Connection`` header lists)
        describe one connection and are dropped; each side's HTTP stack makes its own.
Rule 3: ``Host`` is the upstream's (set by the client library from the upstream URL) and
        ``Content-Length`` is recomputed from the same body bytes, so it stays equal.
Rule 4: header bytes outside ASCII pass unchanged in both directions. Request headers travel as text
        to the upstream clients, decoded as UTF-8 (which they encode back to the same bytes); a value
        that is not UTF-8 cannot, and is refused (400) whichever client is configured. Response
        headers stay bytes end to end.

Pure: bytes in, bytes out.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from meter.errors import InvalidHeader

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
_REQUEST_DROP = HOP_BY_HOP | {b"host", b"content-length", b"expect"}


def _connection_tokens(headers: Iterable[tuple[bytes, bytes]]) -> frozenset[bytes]:
    tokens: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            tokens.update(token.strip().lower() for token in value.split(b","))
    return frozenset(tokens)


def upstream_request_headers(headers: list[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    """ASGI request headers (lower-case bytes) → headers to send upstream (Rule 4: raises
    :class:`~meter.errors.InvalidHeader` for a value that is not UTF-8)."""
    drop = (
        _REQUEST_DROP | _connection_tokens(headers)
        if any(n == b"connection" for n, _ in headers)
        else _REQUEST_DROP
    )
    try:
        return [(name.decode("latin-1"), value.decode()) for name, value in headers if name not in drop]
    except UnicodeDecodeError:
        bad = next(name for name, value in headers if not _is_utf8(value))
        raise InvalidHeader(
            f"header {bad[:64].decode('latin-1')!r} is not UTF-8 text; meter forwards header bytes "
            "unchanged only when they are"
        ) from None


def _is_utf8(value: bytes) -> bool:
    try:
        value.decode()
    except UnicodeDecodeError:
        return False
    return True


def client_response_headers(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """Upstream response headers, as received → headers for the ASGI ``http.response.start``."""
    headers = list(headers)
    drop = HOP_BY_HOP | _connection_tokens(headers)
    return [(name, value) for name, value in headers if name.lower() not in drop]


def override_headers(
    headers: list[tuple[bytes, bytes]], replacements: list[tuple[bytes, bytes]]
) -> list[tuple[bytes, bytes]]:
    """``headers`` without any header named in ``replacements`` (lower-case names), followed by the
    replacements: meter's own ``x-ratelimit-*`` for a key it limits, instead of the upstream's."""
    names = {name for name, _ in replacements}
    return [(n, v) for n, v in headers if n.lower() not in names] + replacements


# Response headers meter reads (besides every fireworks-* one): framing and the request id.
OBSERVED = frozenset({b"content-type", b"content-encoding", b"content-length", b"x-request-id"})
FIREWORKS_PREFIX = b"fireworks-"


def observed(name: bytes) -> bool:
    """Whether meter reads a response header (lower-case name): see :func:`split_response_headers`."""
    return name in OBSERVED or name.startswith(FIREWORKS_PREFIX)


def split_response_headers(
    headers: Sequence[tuple[bytes, bytes]],
) -> tuple[dict[str, str], list[tuple[bytes, bytes]]]:
    """One pass over the upstream's response headers: ``(the end-to-end headers meter reads, by
    lower-case name, decoded: see :func:`observed`; the headers to send the client)``. The second is
    equal to :func:`client_response_headers`; only the few headers meter reads are decoded."""
    by_name: dict[str, str] = {}
    out: list[tuple[bytes, bytes]] = []
    connection = False
    for name, value in headers:
        lowered = name.lower()
        if lowered in HOP_BY_HOP:
            connection = connection or lowered == b"connection"
            continue
        if lowered in OBSERVED or lowered.startswith(FIREWORKS_PREFIX):
            by_name[lowered.decode("latin-1")] = value.decode("latin-1")
        out.append((name, value))
    if connection:  # rare: names the Connection header lists are hop-by-hop too
        out = client_response_headers(headers)
        kept = {name.lower().decode("latin-1") for name, _ in out}
        by_name = {name: value for name, value in by_name.items() if name in kept}
    return by_name, out


_CREDENTIALS = frozenset(
    {"authorization", "api-key", "x-api-key"}
)  # meter.tenancy.identity.CREDENTIAL_HEADERS


def swap_credential(headers: list[tuple[str, str]], authorization: str) -> list[tuple[str, str]]:
    """The one deliberate change to a request's headers for virtual keys: the header that carried the
    client's ``mk-`` key becomes ``Authorization`` with the upstream credential, in place, and any
    other credential header (the same key again) is dropped, so the virtual key never leaves meter
    and header order is kept."""
    out: list[tuple[str, str]] = []
    swapped = False
    for name, value in headers:
        if name.lower() in _CREDENTIALS:
            if not swapped:
                out.append(("authorization", authorization))
                swapped = True
            continue
        out.append((name, value))
    return out


def replace_headers(
    headers: list[tuple[str, str]], replacements: list[tuple[str, str]]
) -> list[tuple[str, str]]:
    """``headers`` with every header named in ``replacements`` replaced (case-insensitive names)."""
    if not replacements:
        return headers
    names = {name.lower() for name, _ in replacements}
    return [(n, v) for n, v in headers if n.lower() not in names] + replacements
