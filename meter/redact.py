"""Secrets in what meter prints: URLs are shown with their credentials masked.

meter holds URLs that carry secrets (``METER_DATABASE_URL``, ``METER_REDIS_URL``,
``METER_UPSTREAM_URL``), and libraries repeat such URLs in their exception texts. Whatever meter
prints (log lines, error messages, ``/readyz``, CLI output) shows a URL it knows through
:func:`mask_url`, and free text that may hold one through :func:`mask_urls_in`; the log formatters
(:mod:`meter.sinks.requestlog`) and the CLI's error path apply the latter to every line they write.

Rule 1: a URL's userinfo password is replaced by ``***``: ``postgresql+asyncpg://meter:***@db/meter``,
        ``redis://:***@cache:6379/0``. The user name stays (it helps with "role does not exist"),
        except in http(s)/ws(s) URLs, where a userinfo without a password is a token
        (``https://***@api.example.com``).
Rule 2: every query value and the fragment are replaced by ``***``, names kept
        (``?api-version=***&key=***``): query strings carry tokens, and PostgreSQL URLs may carry
        ``?password=``.
Rule 3: when in doubt, mask more. The userinfo ends at the URL's *last* ``@``, and a password runs
        from the first ``:`` of the userinfo to there, so an unescaped ``@``, ``/``, ``?`` or ``#``
        in a password is masked with it whatever a driver would have made of it. (SQLAlchemy's
        ``make_url`` ends a password at the first ``@``, so its masked rendering would show the rest
        of such a password as part of the host.) An ``@`` in a path or query masks the text before it.
Rule 4: in free text, a URL is a ``scheme://`` run up to whitespace, a quote, ``<``, ``>`` or a
        backslash, less trailing punctuation (``.,;:!?)]}``); a password holding one of those
        unescaped is not recognised there (percent-encode it, as URLs require). Text without
        ``://`` is returned as it is, at the cost of one search.

Pure: no I/O, no imports beyond :mod:`re`.
"""

from __future__ import annotations

import re

MASK = "***"

# http(s) and websocket URLs: a userinfo without a password is itself the credential.
_TOKEN_USERINFO_SCHEMES = frozenset({"http", "https", "ws", "wss"})
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*\Z")
# A URL in prose: up to whitespace, a quote, <, > or a backslash, and not ending in punctuation.
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s\"'<>\\]*[^\s\"'<>\\.,;:!?)\]}]")


def mask_url(url: str) -> str:
    """``url`` with its password, query values and fragment masked (Rules 1-3).

    A value without a scheme (a mistyped setting, ``meter:secret@db/meter``) is masked the same way.
    """
    scheme, sep, rest = url.partition("://")
    if not sep or not _SCHEME.match(scheme):
        scheme, sep, rest = "", "", url
    userinfo, at, rest = rest.rpartition("@")
    if at:
        userinfo = _mask_userinfo(userinfo, scheme.lower())
    rest, hash_, fragment = rest.partition("#")
    rest, question, query = rest.partition("?")
    if question:
        rest += "?" + "&".join(_mask_parameter(part) for part in query.split("&"))
    if hash_:
        rest += "#" + (MASK if fragment else "")
    return f"{scheme}{sep}{userinfo}{at}{rest}"


def mask_urls_in(text: str) -> str:
    """``text`` with every URL in it masked by :func:`mask_url` (Rule 4)."""
    if "://" not in text:
        return text
    return _URL_IN_TEXT.sub(lambda match: mask_url(match.group()), text)


def _mask_userinfo(userinfo: str, scheme: str) -> str:
    user, colon, _ = userinfo.partition(":")
    if any(c in user for c in "/?#"):  # not a user name: the "@" belonged to a path or query
        return MASK
    if colon:
        return f"{user}:{MASK}"
    if scheme in _TOKEN_USERINFO_SCHEMES and user:
        return MASK
    return user


def _mask_parameter(part: str) -> str:
    name, equals, value = part.partition("=")
    if equals:
        return f"{name}={MASK}" if value else part
    return MASK if part else part
