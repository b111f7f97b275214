"""Log lines a client cannot forge: a model name, path or error text with a newline, a carriage
return or a terminal escape stays inside its one record, in text and in JSON."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from meter.sinks.requestlog import RequestLog, configure_logging, format_json
from tests.conftest_db import make_record
from tests.security.test_output import FORGED


@pytest.fixture
def root_logging() -> Iterator[None]:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        yield
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


def _assert_one_clean_line(text: str) -> None:
    # str.splitlines also splits at \r, \x1c-\x1e, \x85, \u2028 and \u2029: every way to end a line.
    assert len(text.splitlines()) == 1, text
    assert "\x1b" not in text and "\x07" not in text and "\u202e" not in text


def test_a_text_request_line_stays_one_line(root_logging: None) -> None:
    stream = io.StringIO()
    configure_logging("info", "text", stream)
    log = RequestLog(logging.getLogger("meter.requests"), "text")
    log(
        make_record(requested_model=FORGED, endpoint="/v1/chat/completions\n/forged", key_suffix="...\x1b[2J")
    )
    log.close()
    line = stream.getvalue().removesuffix("\n")
    _assert_one_clean_line(line)
    assert "model=m\\n2026-01-01 00:00:00,000 INFO meter.requests: 200 POST /forged\\r\\x1b[31mred" in line
    assert "\\x85\\u2028\\u202e" in line and "/v1/chat/completions\\n/forged" in line


def test_any_text_log_line_escapes_what_it_was_given(root_logging: None) -> None:
    stream = io.StringIO()
    configure_logging("info", "text", stream)
    logging.getLogger("meter.quota").warning("no price for %s", FORGED)
    try:
        raise ValueError(f"unknown model {FORGED}")
    except ValueError:
        logging.getLogger("meter").exception("pricing failed")
    first, *traceback = stream.getvalue().removesuffix("\n").split("\n")
    _assert_one_clean_line(first)
    assert first.endswith(
        "no price for m\\n2026-01-01 00:00:00,000 INFO meter.requests: 200 POST /forged\\r"
        "\\x1b[31mred\\x1b]0;title\\x07\\x85\\u2028\\u202e"
    )
    # The record that logged the exception, then its traceback: indented, so no line of it can
    # pass for a record of its own.
    assert traceback[0].endswith("ERROR meter: pricing failed")
    assert all(line.startswith("  ") for line in traceback[1:]), traceback
    assert traceback[-1].startswith("  2026-01-01 00:00:00,000 INFO meter.requests: 200 POST /forged\\r")
    assert "\x1b" not in stream.getvalue()


def test_json_lines_are_safe_by_json_escaping(root_logging: None) -> None:
    record = make_record(requested_model=FORGED)
    line = format_json(record)
    _assert_one_clean_line(line)
    assert json.loads(line)["requested_model"] == FORGED
    stream = io.StringIO()
    configure_logging("info", "json", stream)
    logging.getLogger("meter.quota").warning("no price for %s", FORGED)
    log = RequestLog(logging.getLogger("meter.requests"), "json")
    log(record)
    log.close()
    lines = stream.getvalue().split("\n")[:-1]
    assert len(lines) == 2 and not any("\x1b" in line or "\r" in line for line in lines)
    assert json.loads(lines[0])["message"] == f"no price for {FORGED}"
    assert json.loads(lines[1])["requested_model"] == FORGED
