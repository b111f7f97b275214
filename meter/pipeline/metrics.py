"""What the usage pipeline (meter.pipeline.pump) counts: its Prometheus metrics and its own tallies.

Rule 1: the gauges are set explicitly, never through ``set_function``, so that they also work with
        several workers recording into prometheus-client's multiprocess files (see meter.sinks.prometheus).
Rule 2: :class:`PipelineMetrics` live on the registry they are given (one pipeline per registry) and
        may be summed across workers; :class:`PipelineCounts` are one pipeline instance's tallies,
        for its :meth:`~meter.pipeline.pump.Pipeline.status` and a replay's report.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from meter.pipeline import deadletter

BATCH_SIZE_BUCKETS = (1, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10000)
WRITE_DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class PipelineMetrics:
    """The pipeline's Prometheus metrics, registered on the registry it is given."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.pending = Gauge(
            "meter_journal_pending_events",
            "Usage records journaled (or held in memory) and not yet in the database.",
            multiprocess_mode="livesum",
            registry=registry,
        )
        self.oldest_age = Gauge(
            "meter_journal_oldest_pending_age_seconds",
            "Age of the oldest pending usage record (since its request ended); 0 when none.",
            multiprocess_mode="max",
            registry=registry,
        )
        self.written = Counter(
            "meter_writer_events_written_total",
            "Usage records confirmed in the database (new or already stored).",
            registry=registry,
        )
        self.duplicates = Counter(
            "meter_writer_duplicate_events_total",
            "Of the records written, those already stored (replays after a crash or a replay command).",
            registry=registry,
        )
        self.errors = Counter(
            "meter_writer_errors_total",
            "Batch write attempts that failed and will be retried (database unreachable or refusing).",
            registry=registry,
        )
        self.dead_lettered = Counter(
            "meter_journal_dead_lettered_total",
            "Usage records moved to the dead-letter file instead of the database, by reason.",
            ["reason"],
            registry=registry,
        )
        self.append_errors = Counter(
            "meter_journal_append_errors_total",
            "Records the journal could not take (kept in memory for the writer instead).",
            registry=registry,
        )
        self.dropped = Counter(
            "meter_journal_dropped_events_total",
            "Records lost: journal failing and in-memory fallback full, or pipeline already stopped.",
            registry=registry,
        )
        self.batch_size = Histogram(
            "meter_writer_batch_size",
            "Records per database write.",
            buckets=BATCH_SIZE_BUCKETS,
            registry=registry,
        )
        self.write_duration = Histogram(
            "meter_writer_write_duration_seconds",
            "Time to write one batch (its transaction, including rollups and any bisection).",
            buckets=WRITE_DURATION_BUCKETS,
            registry=registry,
        )
        self.retention_deleted = Counter(
            "meter_retention_deleted_events_total",
            "Raw usage events deleted by the retention setting (their rollups are kept).",
            registry=registry,
        )
        for reason in deadletter.KINDS:
            self.dead_lettered.labels(reason)


@dataclass(slots=True)
class PipelineCounts:
    """One pipeline's tallies since it was created."""

    written: int = 0
    inserted: int = 0
    write_errors: int = 0
    dead_lettered: int = 0
    append_errors: int = 0
    dropped: int = 0
    read: int = 0
