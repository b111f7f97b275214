"""The limits meter's HTTP server holds client connections to, and how their refusals are counted.

Shared by :mod:`meter.serving.options` (which builds them from the settings) and
:mod:`meter.serving.guard` (which enforces them); what each limit does is the guard's rules.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from meter.settings import Settings

# The ASGI lifespan state key under which the application leaves a ``count(reason)`` callable for the
# connections' refusals (meter.serving.guard; meter.sinks.prometheus exports them).
REFUSALS_STATE_KEY = "meter.connection_refusals"
REFUSAL_REASONS = (
    "too_many_connections",
    "head_too_large",
    "head_timeout",
    "malformed",
    "send_timeout",
)


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """Per serving process (each of ``--workers N`` has its own)."""

    max_head_bytes: int  # request line + header lines
    max_header_fields: int
    head_timeout: float  # seconds for a whole request head
    keepalive_timeout: float  # idle seconds between requests
    send_timeout: float  # seconds the write buffer may stay full (the client not reading)
    max_connections: int  # open client connections

    @classmethod
    def from_settings(cls, settings: Settings) -> ConnectionLimits:
        return cls(
            max_head_bytes=settings.max_request_head_bytes,
            max_header_fields=settings.max_request_headers,
            head_timeout=settings.client_header_timeout,
            keepalive_timeout=settings.client_keepalive_timeout,
            send_timeout=settings.client_send_timeout,
            max_connections=settings.max_client_connections,
        )
