"""Where a request goes: the client's request target → a URL under the configured upstream base.

Rule 1: only origin-form targets are forwarded: the path starts with ``/``. ``*`` (``OPTIONS *``),
        authority-form and anything else is refused; an absolute-form target's scheme and host never
        reach this module (the HTTP server keeps only its path).
Rule 2: every URL built here has exactly the upstream's scheme, host and port, and its path stays under
        the upstream's base path: the base is a prefix of the URL and the client's path is appended
        to it. A path that could climb above the base however the upstream decodes it is refused:
        one with a ``.`` or ``..`` segment once percent-decoded (up to three times, for servers that
        decode twice), with ``/`` and ``\\`` both taken as separators (``%2F``, ``%5C`` and a literal
        backslash included: some servers read them as ``/``) and a ``;`` parameter dropped (some
        servers drop it). Encoded slashes in a path without dot segments (a model id in a path,
        say) pass unchanged: they cannot climb.
Rule 3: the target is visible ASCII (RFC 9112: no spaces, controls or raw non-ASCII bytes). Within
        that, path and query keep their exact percent-encoding (transparency).

Refusals raise :class:`meter.errors.InvalidTarget` (400, ``invalid_request_target``); the proxy
answers and records them like every other request. Pure: bytes in, a string out.
"""

from __future__ import annotations

import re
from urllib.parse import unquote_to_bytes, urlsplit

from meter.errors import InvalidTarget

MAX_TARGET_BYTES = 8192  # nginx's default header buffer; the whole request line must fit one too

_NOT_VISIBLE = re.compile(rb"[^\x21-\x7e]")
_SEPARATORS = re.compile(rb"[/\\]")
_DECODE_ROUNDS = 3


class UpstreamBase:
    """The configured upstream URL, split once: ``scheme://host[:port]`` + base path."""

    __slots__ = ("base", "netloc", "path", "scheme")

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"upstream URL {url!r} is not an http:// or https:// URL with a host")
        if parts.query or parts.fragment or parts.username is not None:
            raise ValueError("the upstream URL must not carry a query, a fragment or credentials")
        self.scheme = parts.scheme
        self.netloc = parts.netloc
        self.path = parts.path.rstrip("/")
        self.base = f"{parts.scheme}://{parts.netloc}{self.path}"

    def url(self, raw_path: bytes, query: bytes) -> str:
        """The upstream URL for a request target (Rules 1-3); raises InvalidTarget."""
        check_path(raw_path, query)
        path = raw_path.decode("ascii")
        return f"{self.base}{path}?{query.decode('ascii')}" if query else f"{self.base}{path}"


def check_path(raw_path: bytes, query: bytes) -> None:
    """Raise :class:`InvalidTarget` unless ``raw_path`` (as sent, percent-encoded) and ``query`` may
    be forwarded (Rules 1-3)."""
    if not raw_path.startswith(b"/"):
        shown = raw_path[:64].decode("ascii", "backslashreplace")
        raise InvalidTarget(
            f"request target {shown!r} is not a path: meter forwards only targets starting with '/'"
        )
    if len(raw_path) + len(query) > MAX_TARGET_BYTES:
        raise InvalidTarget(f"request target longer than {MAX_TARGET_BYTES} bytes")
    if _NOT_VISIBLE.search(raw_path) or _NOT_VISIBLE.search(query):
        raise InvalidTarget("request target holds a space, a control character or a non-ASCII byte")
    if b"." not in raw_path and b"%" not in raw_path:
        return  # the common case: no dot segment, however decoded
    path = raw_path
    for _ in range(_DECODE_ROUNDS):
        if _has_dot_segment(path):
            raise InvalidTarget("request path holds a '.' or '..' segment (possibly percent-encoded)")
        decoded = unquote_to_bytes(path)
        if decoded == path:
            return
        path = decoded
    if _has_dot_segment(path):
        raise InvalidTarget("request path holds a '.' or '..' segment (possibly percent-encoded)")


def _has_dot_segment(path: bytes) -> bool:
    return any(segment.split(b";", 1)[0] in (b".", b"..") for segment in _SEPARATORS.split(path))
