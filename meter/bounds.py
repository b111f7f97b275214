"""How long a string from outside may be once meter keeps it: in a record, a log line, a span, a label.

Every value a client or an upstream sends and meter stores, logs, exports or uses as a label is cut
to one of these lengths (characters) where it enters meter, so no single request can make a record
larger than the journal accepts, a log line unreadable, or ``/metrics`` large. What meter forwards is
never cut: the bytes on the wire pass unchanged.

Rule 1: a cut value ends with :data:`MARK`, so a reader sees that it was cut, and a cut name cannot
        pass for a real one that is merely long.
Rule 2: the limits are far above what a real value needs (a Fireworks model path with a deployment is
        ~150 characters; an upstream request id, a UUID) and small enough that a record stays a few
        KiB whatever it holds.

Pure: no I/O.
"""

from __future__ import annotations

MARK = "…"  # U+2026: ends every value meter cut

MODEL = 256  # requested and response model names (also the ``model`` label)
ENDPOINT = 512  # the request path kept in a record (the ``endpoint`` label is a fixed vocabulary)
METHOD = 16
REQUEST_ID = 256  # the upstream's x-request-id, the response's id
FINISH_REASONS = 256  # the comma-joined finish reasons of every choice
ERROR = 1024  # an error message: meter's own or the upstream's
METRIC_NAME = 64  # a fireworks-* header or perf_metrics name
METRICS = 32  # how many fireworks-* / perf_metrics values a record keeps


def cut(value: str, limit: int) -> str:
    """``value`` if it has at most ``limit`` characters, else its first ``limit - 1`` and :data:`MARK`."""
    if len(value) <= limit:
        return value
    return value[: limit - 1] + MARK


def cut_optional(value: str | None, limit: int) -> str | None:
    return None if value is None else cut(value, limit)
