"""The request log: one line per request at info level, JSON for machines or text for a terminal.

:class:`RequestLog` is a usage sink (``Runtime.observe`` hands it every record). A JSON line is one
object, built with orjson on the request's thread (a few microseconds)::

    {"ts": "...", "level": "info", "logger": "meter.requests", "event": "request", "event_id": "...",
     "request_id": "...", "trace_id": null, "team": "", "key_fingerprint": "...", "key_suffix": "...abcd",
     "method": "POST", "endpoint": "/v1/chat/completions", "requested_model": "...", "response_model":
     "...", "stream": true, "status_code": 200, "outcome": "ok", "usage_source": "reported",
     "prompt_tokens": 12, "completion_tokens": 4, "cached_tokens": null, "reasoning_tokens": null,
     "total_tokens": 16, "duration_ms": 12.3, "ttft_ms": 4.5, "overhead_ms": 0.21, "error_type": null,
     "error": null}

Rule 1: no prompt or completion content and no raw key: a record holds neither (only the key's HMAC
        fingerprint and display suffix), and this module writes nothing but record fields.
Rule 2: the request path never waits on the log. Lines go to a bounded queue; a daemon thread hands
        them to the logger (whose handlers do the I/O). A full queue drops the line and counts it
        (``on_drop("logs", "queue_full", 1)``, exported as ``meter_telemetry_dropped_total``).
        :meth:`RequestLog.close` drains the queue on shutdown.
Rule 3: a level above info costs one check per request.

:func:`configure_logging` sets up the process's logging once (the CLI calls it): ``json`` writes every
log line as a JSON object (request lines as above, other lines as ``{"ts", "level", "logger",
"message"}``); ``text`` is the classic ``time LEVEL logger: message`` for a terminal, with request lines
as ``200 POST /v1/chat/completions model=... tokens=12+4 dur=12.3ms ...``.

Rule 4: a log line never shows a URL's password or query values: both formatters pass what they
        write through :func:`meter.redact.mask_urls_in`, whichever logger (meter's, a library's,
        a traceback) produced it.
Rule 5: one record is one line in text format. A client's value (model name, path, error text)
        cannot start a new line or drive the terminal: the message is escaped
        (:func:`meter.printable.escape_controls`), and a traceback's lines are indented, so a line
        starting in the first column is always the start of a record. A JSON line is one line by
        JSON's escaping, completed by :func:`meter.printable.escape_json_line` for the characters
        JSON leaves raw (U+2028, C1 controls, bidirectional marks).
Rule 6: below debug, the loggers of the libraries meter drives (httpx and httpcore, which log every
        request's full URL at info, aiohttp, asyncpg, redis, alembic) are set to warning.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import sys
import threading
from collections.abc import Callable
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, Literal, TextIO

import orjson

from meter.printable import escape_controls, escape_controls_keep_lines, escape_json_line
from meter.records import UsageRecord
from meter.redact import mask_urls_in
from meter.sinks.prometheus import error_type

LogFormat = Literal["json", "text"]
OnDrop = Callable[[str, str, int], None]
JSON_ATTRIBUTE = "meter_json"  # a log record carrying this attribute is already a JSON line
DEFAULT_QUEUE = 10_000

# The trace id of the request being handled, set by the tracing hook (meter.sinks.tracing) when tracing is
# on. Sinks run synchronously in the request's task, so the request log reads it there.
CURRENT_TRACE_ID: ContextVar[str | None] = ContextVar("meter_trace_id", default=None)


def request_fields(record: UsageRecord) -> dict[str, Any]:
    """The request line's fields (everything but ``ts``/``level``/``logger``/``event``)."""
    return {
        "event_id": record.event_id,
        "request_id": record.request_id,
        "trace_id": getattr(record, "trace_id", None) or CURRENT_TRACE_ID.get(),
        "team": record.team,
        "key_fingerprint": record.key_fingerprint,
        "key_suffix": record.key_suffix,
        "method": record.method,
        "endpoint": record.endpoint,
        "requested_model": record.requested_model,
        "response_model": record.response_model,
        "stream": record.stream,
        "status_code": record.status_code,
        "outcome": record.outcome.value,
        "usage_source": record.usage_source.value,
        "prompt_tokens": record.prompt_tokens,
        "completion_tokens": record.completion_tokens,
        "cached_tokens": record.cached_tokens,
        "reasoning_tokens": record.reasoning_tokens,
        "total_tokens": record.total_tokens,
        "duration_ms": _round(record.duration_ms),
        "ttft_ms": _round(record.ttft_ms),
        "overhead_ms": _round(record.overhead_ms, 3),
        "error_type": error_type(record),
        "error": record.error,
    }


def _round(value: float | None, digits: int = 1) -> float | None:
    return None if value is None else round(value, digits)


def format_json(record: UsageRecord, logger_name: str = "meter.requests") -> str:
    line = {
        "ts": record.started_at.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "level": "info",
        "logger": logger_name,
        "event": "request",
        **request_fields(record),
    }
    return escape_json_line(orjson.dumps(line).decode())  # Rule 5: model and path are the client's


def format_text(record: UsageRecord) -> str:
    tokens = (
        f"{_count(record.prompt_tokens)}+{_count(record.completion_tokens)}"
        f"{'' if record.usage_source.value == 'reported' else ' (' + record.usage_source.value + ')'}"
    )
    parts = [
        f"{record.status_code} {record.method} {record.endpoint}",
        f"model={record.requested_model or '-'}",
        f"team={record.team or '-'}",
        f"key={record.key_suffix or '-'}",
        f"tokens={tokens}",
        f"dur={_ms(record.duration_ms)}",
    ]
    if record.ttft_ms is not None:
        parts.append(f"ttft={_ms(record.ttft_ms)}")
    parts.append(f"overhead={_ms(record.overhead_ms, 2)}")
    failure = error_type(record)
    if failure is not None:
        parts.append(f"error={failure}")
    parts.append(f"id={record.event_id}")
    if record.request_id:
        parts.append(f"req={record.request_id}")
    trace_id = getattr(record, "trace_id", None) or CURRENT_TRACE_ID.get()
    if trace_id:
        parts.append(f"trace={trace_id}")
    return escape_controls(" ".join(parts))  # model, path, key suffix, request id: the client's


def _count(value: int | None) -> str:
    return "?" if value is None else str(value)


def _ms(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}ms"


class RequestLog:
    """Usage sink writing one line per request to ``logger`` at info level, off the request path."""

    def __init__(
        self,
        logger: logging.Logger,
        fmt: LogFormat = "json",
        *,
        max_queue: int = DEFAULT_QUEUE,
        on_drop: OnDrop | None = None,
    ) -> None:
        if fmt not in ("json", "text"):
            raise ValueError(f"unknown request log format {fmt!r}: expected json or text")
        self._logger = logger
        self._json = fmt == "json"
        self._max_queue = max_queue
        self._on_drop = on_drop
        self._queue: collections.deque[str] = collections.deque()
        self._wake = threading.Condition()
        self._busy = 0  # lines taken off the queue and not yet handed to the logger
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="meter-request-log", daemon=True)
        self._thread.start()

    def __call__(self, record: UsageRecord) -> None:
        if not self._logger.isEnabledFor(logging.INFO) or self._closed:
            return
        line = format_json(record, self._logger.name) if self._json else format_text(record)
        if len(self._queue) >= self._max_queue:
            if self._on_drop is not None:
                self._on_drop("logs", "queue_full", 1)
            return
        self._queue.append(line)
        if len(self._queue) == 1:
            with self._wake:
                self._wake.notify()

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every queued line has reached the logger; False on timeout."""
        with self._wake:
            self._wake.notify_all()
            return self._wake.wait_for(lambda: not self._queue and not self._busy, timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued (bounded by ``timeout``) and stop the thread."""
        self.flush(timeout)
        with self._wake:
            self._closed = True
            self._wake.notify_all()
        self._thread.join(timeout)

    def _run(self) -> None:
        extra = {JSON_ATTRIBUTE: True} if self._json else None
        queue, logger = self._queue, self._logger
        while True:
            with self._wake:
                self._wake.wait_for(lambda: bool(queue) or self._closed)
                if self._closed and not queue:
                    return
                self._busy = len(queue)
            while queue:
                line = queue.popleft()
                with contextlib.suppress(Exception):  # a broken handler must not kill the thread
                    logger.info(line, extra=extra)
            with self._wake:
                self._busy = 0
                self._wake.notify_all()


class JsonFormatter(logging.Formatter):
    """Every log line as one JSON object; request lines pass through as they were built (Rule 4
    applies to both)."""

    def format(self, record: logging.LogRecord) -> str:
        if getattr(record, JSON_ATTRIBUTE, False):
            return mask_urls_in(record.getMessage())
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": mask_urls_in(record.getMessage()),
        }
        if record.exc_info:
            line["exception"] = mask_urls_in(self.formatException(record.exc_info))
        return escape_json_line(orjson.dumps(line).decode())


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
CONTINUATION = "  "  # prefix of a traceback's lines in text format (Rule 5)


class TextFormatter(logging.Formatter):
    """``time LEVEL logger: message``, one line per record; a traceback follows, indented (Rules 4-5)."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:
        return escape_controls(mask_urls_in(super().formatMessage(record)))

    def formatException(self, ei: Any) -> str:
        return _continuation(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:
        return _continuation(super().formatStack(stack_info))


def _continuation(text: str) -> str:
    text = escape_controls_keep_lines(mask_urls_in(text))
    return "\n".join(CONTINUATION + line for line in text.split("\n"))


def resolve_format(setting: str, stream: TextIO | None = None) -> LogFormat:
    """``auto`` is ``text`` when the log goes to a terminal, ``json`` otherwise (a container, a file)."""
    if setting in ("json", "text"):
        return setting  # type: ignore[return-value]
    if setting != "auto":
        raise ValueError(f"unknown log format {setting!r}: expected auto, json or text")
    stream = stream if stream is not None else sys.stderr
    isatty = getattr(stream, "isatty", None)
    return "text" if isatty is not None and isatty() else "json"


# Libraries whose info lines are not for an operator: httpx and httpcore log every request with its
# full URL, query string included; the others log connection and set-up chatter.
QUIET_LIBRARIES = ("httpx", "httpcore", "aiohttp", "asyncpg", "redis", "alembic", "hpack", "urllib3")


def configure_logging(level: str, fmt: LogFormat, stream: TextIO | None = None) -> None:
    """Configure the process's root logger once: ``level`` (debug/info/warning/error), ``fmt``."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    quiet = logging.NOTSET if level == "debug" else logging.WARNING  # Rule 6
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(quiet)
