"""Span export to the OTLP collector: batched in the background, fail open, every drop counted.

Failure policy (OTLP collector): fail open. Spans wait in a bounded queue (``OTEL_BSP_MAX_QUEUE_SIZE``)
exported in batches by a background thread; a full queue or a failed export drops spans and counts them
in ``meter_telemetry_dropped_total{signal="spans", reason}``. Requests never wait for the collector.
:meth:`meter.sinks.tracing.GenAITracer.shutdown` drains the queue on exit.

Rule 1: a failed export loses its batch (``reason="export_failed"``, one per span in it); an exporter
        that raises counts as failed and never propagates.
Rule 2: a sampled span meeting a full queue makes the SDK drop the oldest queued one
        (``reason="queue_full"``). The queue is the SDK's private state, so if the SDK changes the
        count degrades to nothing, never to an error.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

log = logging.getLogger("meter.sinks.tracing")

OnDrop = Callable[[str, str, int], None]  # (signal, reason, count)


class _CountingExporter(SpanExporter):
    """Counts the spans of every failed export (the batch is lost: fail open)."""

    def __init__(self, inner: SpanExporter, on_drop: OnDrop | None) -> None:
        self._inner = inner
        self._on_drop = on_drop

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            result = self._inner.export(spans)
        except Exception:
            log.warning("span export failed", exc_info=True)
            result = SpanExportResult.FAILURE
        if result is not SpanExportResult.SUCCESS and self._on_drop is not None:
            self._on_drop("spans", "export_failed", len(spans))
        return result

    def shutdown(self) -> None:
        self._inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._inner.force_flush(timeout_millis)


class CountingBatchSpanProcessor(BatchSpanProcessor):
    """A BatchSpanProcessor that counts the spans it drops because its queue is full."""

    def __init__(self, exporter: SpanExporter, *, on_drop: OnDrop | None = None, **options: Any) -> None:
        super().__init__(_CountingExporter(exporter, on_drop), **options)
        self._on_drop = on_drop
        # The SDK drops the oldest span when a new one meets a full queue; it only logs that. Its
        # queue is private, so the count degrades to nothing (never to an error) if the SDK changes.
        batch = getattr(self, "_batch_processor", None)
        self._queue = getattr(batch, "_queue", None)
        self._max_queue = getattr(batch, "_max_queue_size", None)

    def on_end(self, span: ReadableSpan) -> None:
        queue, on_drop = self._queue, self._on_drop
        if (
            on_drop is not None
            and queue is not None
            and span.context is not None
            and span.context.trace_flags.sampled
            and len(queue) >= (self._max_queue or 0)
        ):
            on_drop("spans", "queue_full", 1)
        super().on_end(span)
