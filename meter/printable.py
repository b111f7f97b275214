"""Values meter did not choose, made safe to print: one line, no terminal control, no formula.

A model name, a request path, a team name or an error message may come from a client or an
upstream. Where meter prints such a value for people (text log lines, CLI tables) or for
spreadsheets (CSV), it goes through this module.

Rule 1 (text logs and tables): C0 controls, DEL, C1 controls, U+2028/U+2029 and the bidirectional
        embedding, override and isolate marks are written as escapes (``\\n``, ``\\r``, ``\\t``,
        ``\\x1b``, ``\\x85``, ``\\u2028``, ``\\u202e``), so a value can neither start a new log line
        nor move the cursor, recolour or retitle a terminal, nor reorder what it shows. A backslash
        is left as it is: a literal ``\\n`` in a name then reads like an escaped newline, which costs
        no line and keeps paths readable; JSON output is the unambiguous form.
Rule 2 (JSON lines): JSON escapes C0 controls itself; DEL, C1 controls, U+2028/U+2029 and the
        bidirectional marks, which JSON allows raw, are written as ``\\uXXXX`` too (the same string to
        any JSON reader), so no reader that splits lines on them and no terminal showing the log
        sees them.
Rule 3 (CSV): OWASP's rule against formula injection: a text cell starting with ``=``, ``+``,
        ``-``, ``@``, a tab or a carriage return gets a leading ``'``, so a spreadsheet shows it as
        text instead of running it. Numbers stay numbers: the rule applies to text cells only, and
        a string that is exactly a decimal number (``-0.25``, as meter writes money) is a number.
        CSV cells are otherwise written as they are (the csv module quotes newlines); a CSV file is
        data, not a terminal listing.

Pure: no I/O.
"""

from __future__ import annotations

import re

_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_CONTROL_BUT_NEWLINE = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_JSON_RAW = re.compile("[\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")  # what JSON leaves raw
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}

FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_DECIMAL = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?\Z")


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    named = _NAMED.get(char)
    if named is not None:
        return named
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape_controls(text: str) -> str:
    """``text`` on one line, with every control character escaped (Rule 1)."""
    if _CONTROL.search(text) is None:
        return text
    return _CONTROL.sub(_escape, text)


def escape_controls_keep_lines(text: str) -> str:
    """Rule 1 for text that is several lines by design (a traceback): newlines stay, the rest is
    escaped."""
    if _CONTROL_BUT_NEWLINE.search(text) is None:
        return text
    return _CONTROL_BUT_NEWLINE.sub(_escape, text)


def escape_json_line(line: str) -> str:
    """A JSON text with the characters JSON leaves raw escaped as ``\\uXXXX`` (Rule 2). Such
    characters can only be inside strings, where the escape means the same character."""
    if (line.isascii() and "\x7f" not in line) or _JSON_RAW.search(line) is None:
        return line
    return _JSON_RAW.sub(lambda match: f"\\u{ord(match.group()):04x}", line)


def csv_text_cell(text: str) -> str:
    """A text cell for CSV, neutralised if a spreadsheet would run it as a formula (Rule 3)."""
    if text.startswith(FORMULA_START) and _DECIMAL.match(text) is None:
        return "'" + text
    return text
