"""Composition root: the one place that knows every piece and wires them together.

:func:`create_app` turns a :class:`~meter.settings.Settings` into an ASGI application:

* paths that are meter's own (``/healthz``, ``/readyz``, ``/metrics``, ``/admin/...``) and the ASGI
  lifespan go to a litestar app;
* every other HTTP request goes straight to :class:`~meter.forward.handler.Proxy` (the hot path
  skips litestar's routing and middleware stack).

Start-up (lifespan): migrate SQLite, open the database engine, claim a journal directory and start the
pipeline (journal → database), open the upstream pool. Shutdown: close the upstream pool, then drain the
pipeline as far as the grace period allows; the rest stays journaled (the ASGI server has already
let in-flight requests finish within the grace period).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from litestar import Litestar
from litestar.exceptions import HTTPException
from prometheus_client import CollectorRegistry
from sqlalchemy.ext.asyncio import AsyncEngine

from meter import __version__
from meter.admin import admin_routers, openapi_config
from meter.admin.auth import http_error_handler, meter_error_handler
from meter.db.engine import create_engine, ping
from meter.db.migrate import upgrade
from meter.errors import MeterError
from meter.forward.handler import Proxy
from meter.forward.upstream import Upstream, create_upstream
from meter.health import ROUTES as HEALTH_ROUTES
from meter.health import ReadinessProbe
from meter.journal.store import Journal, default_journal_root
from meter.journal.sync import parse_fsync_policy
from meter.pipeline.pump import Pipeline
from meter.quota.runtime import Quotas
from meter.records import UsageRecord
from meter.serving.gc import settle_collector
from meter.serving.limits import REFUSALS_STATE_KEY
from meter.settings import Settings
from meter.sinks.prometheus import ProxyMetrics, exposition_registry
from meter.sinks.requestlog import RequestLog, resolve_format
from meter.tap.observer import DecodeBudget
from meter.tenancy.identity import KeyFingerprinter, load_key_secret
from meter.tenancy.runtime import Tenancy, config_from_settings

if TYPE_CHECKING:
    from opentelemetry.metrics import MeterProvider

    from meter.sinks.tracing import GenAITracer

log = logging.getLogger("meter")

OWN_PATHS = ("/healthz", "/readyz", "/metrics")
OWN_PREFIXES = ("/admin/",)


def is_own_path(path: str) -> bool:
    return path in OWN_PATHS or path.startswith(OWN_PREFIXES) or path == "/admin"


@dataclass
class Runtime:
    """What the running app holds, built by :func:`create_app` and filled in at start-up."""

    settings: Settings
    registry: CollectorRegistry
    metrics: ProxyMetrics
    upstream: Upstream
    fingerprinter: KeyFingerprinter
    engine: AsyncEngine | None = None
    pipeline: Pipeline | None = None
    tracer: GenAITracer | None = None
    meter_provider: MeterProvider | None = None
    request_log: RequestLog | None = None
    tenancy: Tenancy | None = None
    quotas: Quotas | None = None
    sinks: list[Callable[[UsageRecord], None]] = field(default_factory=list)  # telemetry, after metrics

    def journal(self, record: UsageRecord) -> None:
        """Billing data: the durable step, which the proxy takes before the response's last byte."""
        if self.pipeline is not None:
            self.pipeline.submit(record)

    def publish(self, record: UsageRecord) -> None:
        """Metrics, request log, OpenTelemetry: the proxy calls this once the response is out (no
        client waits on them). A failing sink is logged; it never costs a record or another sink."""
        for sink in (self.metrics.publish, *self.sinks):
            try:
                sink(record)
            except Exception:
                log.exception("usage sink %r failed", sink)


class MeterApp:
    """The ASGI application: dispatches to the proxy or to litestar."""

    def __init__(self, runtime: Runtime, litestar: Litestar, proxy: Proxy) -> None:
        self.runtime = runtime
        self.litestar = litestar
        self.proxy = proxy
        self._inflight = runtime.metrics.inflight
        self._endpoint_label = runtime.metrics.endpoint_label

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan" and "state" in scope:
            # the server's connections count their refusals here (meter.serving.guard)
            scope["state"][REFUSALS_STATE_KEY] = self.runtime.metrics.connection_refused
        if scope["type"] != "http" or is_own_path(scope["path"]):
            await self.litestar(scope, receive, send)  # type: ignore[arg-type]
            return
        gauge = self._inflight.labels(self._endpoint_label(scope["path"]))
        gauge.inc()
        try:
            await self.proxy(scope, receive, send)
        finally:
            gauge.dec()


def create_app(
    settings: Settings,
    *,
    registry: CollectorRegistry | None = None,
    tracer: GenAITracer | None = None,
    meter_provider: MeterProvider | None = None,
    sinks: Sequence[Callable[[UsageRecord], None]] = (),
) -> MeterApp:
    """``tracer`` / ``meter_provider``: OpenTelemetry set up by the caller (an embedding application,
    or in-memory exporters); when both are None, ``settings.otel_environment`` decides (off unless it
    configures an exporter). ``sinks``: more usage sinks, run after the built-in ones for every record
    once its response is out (Rule 5 of :mod:`meter.forward.handler`)."""
    registry = registry if registry is not None else CollectorRegistry()
    metrics = ProxyMetrics(registry)
    if tracer is None and meter_provider is None and settings.otel_environment:
        # The OpenTelemetry SDK is imported only when an OTEL_* variable is set (nothing else needs it).
        from meter.sinks.otel_config import configure_from_environment

        tracer, meter_provider = configure_from_environment(
            settings.otel_environment, upstream_url=settings.upstream_url, metrics=metrics
        )
    request_log = RequestLog(
        logging.getLogger("meter.requests"),
        resolve_format(settings.log_format),
        on_drop=metrics.telemetry_dropped,
    )
    upstream = create_upstream(
        settings.upstream_client,
        connect_timeout=settings.upstream_connect_timeout,
        read_timeout=settings.upstream_read_timeout,
        max_connections=settings.upstream_max_connections,
    )
    runtime = Runtime(
        settings=settings,
        registry=registry,
        metrics=metrics,
        upstream=upstream,
        fingerprinter=KeyFingerprinter(load_key_secret(settings)),
        tracer=tracer,
        meter_provider=meter_provider,
        request_log=request_log,
    )
    # Reads the credentials and price files now: a bad one stops start-up with a message naming it.
    tenancy = Tenancy(runtime.fingerprinter, config_from_settings(settings), registry=registry)
    runtime.tenancy = tenancy
    quotas = runtime.quotas = Quotas(settings, tenancy, registry)
    runtime.sinks.append(request_log)
    if meter_provider is not None:
        from meter.sinks.genai_metrics import GenAIMetrics

        runtime.sinks.append(
            GenAIMetrics(
                meter_provider,
                upstream_url=settings.upstream_url,
                model_label=metrics.model_label,
                team_label=metrics.team_label,
            )
        )
    runtime.sinks.extend(sinks)

    async def readiness_check() -> dict[str, Any]:
        if runtime.engine is None or runtime.pipeline is None:
            return {"ready": False, "reason": "starting"}
        database = await ping(runtime.engine, timeout=2.0)
        # Ready while the journal can absorb a database outage; the pipeline's readiness says so.
        result = runtime.pipeline.readiness(min_free_bytes=settings.journal_min_free_bytes)
        result["database"] = "ok" if database is None else database
        # Not ready before the key directory first loaded: every key would be refused with 503.
        result["key_directory"] = "loaded" if tenancy.loaded else "not loaded"
        result["ready"] = bool(result.get("ready")) and tenancy.loaded
        return result

    async def on_startup(app: Litestar) -> None:
        if settings.is_sqlite and settings.auto_migrate:
            await upgrade(settings.database_url)
        runtime.engine = create_engine(settings.database_url)
        root = settings.journal_dir or str(default_journal_root(settings.sqlite_path))
        journal = await asyncio.to_thread(
            Journal.open_any,
            root,
            fsync=parse_fsync_policy(settings.journal_fsync),
            segment_bytes=settings.journal_segment_bytes,
        )
        runtime.pipeline = Pipeline(
            journal,
            runtime.engine,
            registry=registry,
            batch_size=settings.writer_batch_size,
            flush_interval=settings.writer_flush_interval,
            retention_days=settings.retention_days,
            concurrency=settings.writer_concurrency,
        )
        await runtime.pipeline.start()
        await tenancy.start(runtime.engine)
        await quotas.start(runtime.engine)
        await upstream.start()
        app.state.engine = runtime.engine
        app.state.tenancy = tenancy
        app.state.quota = quotas.admission
        settle_collector()

    async def on_shutdown(app: Litestar) -> None:
        await upstream.aclose()
        if runtime.pipeline is not None:
            await runtime.pipeline.stop(timeout=settings.shutdown_grace)
        await quotas.stop()
        await tenancy.stop()
        if runtime.engine is not None:
            await runtime.engine.dispose()
        # Telemetry last, so it still sees the requests that finished during the grace period.
        await asyncio.to_thread(request_log.close)
        if runtime.tracer is not None or runtime.meter_provider is not None:
            from meter.sinks.otel_config import shutdown_telemetry

            await asyncio.to_thread(shutdown_telemetry, runtime.tracer, runtime.meter_provider)

    litestar = Litestar(
        route_handlers=[*HEALTH_ROUTES, *admin_routers()],
        on_startup=[on_startup],
        on_shutdown=[on_shutdown],
        exception_handlers={MeterError: meter_error_handler, HTTPException: http_error_handler},
        openapi_config=openapi_config(__version__),  # admin token required; JSON/YAML, no HTML page
        logging_config=None,
    )
    litestar.state.registry = exposition_registry(registry, settings.metrics_multiprocess_dir)
    litestar.state.admin_token = settings.admin_token
    litestar.state.readiness = ReadinessProbe(readiness_check)
    proxy = Proxy(
        upstream=upstream,
        upstream_url=settings.upstream_url,
        fingerprinter=runtime.fingerprinter,
        emit=runtime.journal,
        publish=runtime.publish,
        max_request_bytes=settings.max_request_bytes,
        body_timeout=settings.client_body_timeout,
        on_observe_error=metrics.observe_error,
        decode_budget=DecodeBudget(settings.observe_max_bytes, settings.observe_max_ratio),
        tracer=tracer,
        tenancy=tenancy,
        quota=quotas.admission,
    )
    return MeterApp(runtime, litestar, proxy)
