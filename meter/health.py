"""meter's own operational endpoints: ``/healthz``, ``/readyz``, ``/metrics``.

``/healthz`` answers 200 while the process runs. ``/readyz`` answers 200 when the database is reachable
(checked at most once a second, so a probe storm never becomes a database storm) and 503 with the
reason in the body otherwise. ``/metrics`` serves the Prometheus text format, or OpenMetrics when the
scraper's ``Accept`` asks for it.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from litestar import Request, Response, get
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder


class ReadinessProbe:
    def __init__(self, check: Callable[[], Awaitable[dict[str, Any]]], *, cache_seconds: float = 1.0) -> None:
        self._check = check
        self._cache_seconds = cache_seconds
        self._last: tuple[float, dict[str, Any]] | None = None

    async def __call__(self) -> dict[str, Any]:
        now = time.monotonic()
        if self._last is not None and now - self._last[0] < self._cache_seconds:
            return self._last[1]
        result = await self._check()
        self._last = (now, result)
        return result


@get("/healthz", include_in_schema=False, sync_to_thread=False)
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@get("/readyz", include_in_schema=False)
async def readyz(request: Request[Any, Any, Any]) -> Response[dict[str, Any]]:
    probe: ReadinessProbe = request.app.state.readiness
    result = await probe()
    return Response(result, status_code=200 if result.get("ready") else 503)


@get("/metrics", include_in_schema=False, sync_to_thread=False)
def metrics(request: Request[Any, Any, Any]) -> Response[bytes]:
    registry: CollectorRegistry = request.app.state.registry
    encoder, content_type = choose_encoder(request.headers.get("accept", ""))
    return Response(encoder(registry), media_type=content_type)


ROUTES = [healthz, readyz, metrics]
