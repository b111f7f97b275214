"""What meter's GenAI spans and metrics say about the call: the operation and the upstream.

Shared by :mod:`meter.sinks.tracing` (spans) and :mod:`meter.sinks.genai_metrics` (metrics), so both
describe a request with the same ``gen_ai.operation.name``, ``gen_ai.provider.name``, ``server.address`` and
``server.port``.

Rule 1: only the OpenAI paths in :data:`OPERATIONS` are GenAI operations; any other path (e.g.
        ``GET /v1/models``) has no operation name, gets a plain HTTP span and no GenAI metrics.
Rule 2: ``gen_ai.provider.name`` is ``fireworks`` when the upstream host is ``fireworks.ai`` or a
        subdomain of it, else ``openai``: meter speaks the OpenAI API, so any other upstream is treated
        as OpenAI-compatible.

This module is pure: it imports nothing from OpenTelemetry.
"""

from __future__ import annotations

from urllib.parse import urlsplit

# The OpenAI paths meter knows, as GenAI operations.
OPERATIONS = {
    "/v1/chat/completions": "chat",
    "/v1/responses": "chat",
    "/v1/completions": "text_completion",
    "/v1/embeddings": "embeddings",
}


def operation_name(path: str) -> str | None:
    return OPERATIONS.get(path)


def provider_name(host: str | None) -> str:
    host = (host or "").lower().rstrip(".")
    return "fireworks" if host == "fireworks.ai" or host.endswith(".fireworks.ai") else "openai"


class Upstream:
    """What every span and metric says about the upstream."""

    def __init__(self, upstream_url: str) -> None:
        parts = urlsplit(upstream_url)
        self.address = parts.hostname or ""
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.provider = provider_name(parts.hostname)
