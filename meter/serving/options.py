"""The serving edge: how ``meter serve`` runs its ASGI server, and the limits it holds clients to.

Whoever can reach meter's port can open connections and send nothing, send a request head a byte a
minute, or send megabytes of headers. uvicorn's httptools protocol bounds none of these (its one timer is
the keep-alive timer, armed after a response), so meter's uvicorn runs
:class:`meter.serving.guard.GuardedHttpToolsProtocol` with the
:class:`~meter.serving.limits.ConnectionLimits`; what each limit does is that module's rules.

:func:`uvicorn_options` is the one description of how the server runs meter: the CLI passes its
options on, and tests that need meter's real serving edge use them too. (uvicorn is the one server:
granian, measured beside it, was slower and could enforce only part of the limits.)
"""

from __future__ import annotations

import functools
import logging
import math
import resource
from typing import TYPE_CHECKING, Any

from meter.serving.limits import ConnectionLimits

if TYPE_CHECKING:
    from meter.settings import Settings

log = logging.getLogger("meter.serving.options")

# File descriptors a serving process needs besides client and upstream connections: listening socket,
# database, Redis, journal segments, log files, the event loop's own.
_OTHER_FILES = 128


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for ``uvicorn.run`` / ``uvicorn.Config``: everything but the application, the
    address, the workers and logging."""
    from meter.serving.guard import ConnectionGuard, GuardedHttpToolsProtocol

    guard = ConnectionGuard(ConnectionLimits.from_settings(settings))
    return {
        "loop": "uvloop",
        # uvicorn builds each connection's protocol by calling this with keyword arguments, as it would
        # call a protocol class; a partial of a module-level class pickles, so `--workers N` (spawned
        # processes) gets it too, each worker with its own guard.
        "http": functools.partial(GuardedHttpToolsProtocol, guard=guard),
        "ws": "none",  # meter serves no WebSocket: an Upgrade never takes a connection out of the guard
        "lifespan": "on",
        "access_log": False,
        "server_header": False,  # the upstream's own Server and Date headers pass through instead
        "date_header": False,
        # meter never reads the client address; uvicorn's X-Forwarded-* middleware cost ~3% of a core
        "proxy_headers": False,
        # the protocol takes the keep-alive timeout from the guard (in fractions of a second too); this is
        # what uvicorn's own configuration then says
        "timeout_keep_alive": math.ceil(settings.client_keepalive_timeout),
        "timeout_graceful_shutdown": int(settings.shutdown_grace),
        "backlog": 4096,
    }


def open_files_needed(settings: Settings) -> int:
    return settings.max_client_connections + settings.upstream_max_connections + _OTHER_FILES


def raise_open_file_limit(needed: int) -> int:
    """Raise this process's soft RLIMIT_NOFILE toward ``needed`` (workers inherit it), as far as the hard
    limit allows; return the soft limit now in force. Without it a host's common soft limit of 1024
    would make accept() fail (EMFILE) before the connection limit could answer 503."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return soft
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    if soft < needed:
        log.warning(
            "the open-file limit (%d, hard limit %d) is below the %d that METER_MAX_CLIENT_CONNECTIONS + "
            "METER_UPSTREAM_MAX_CONNECTIONS need: connections past it fail at accept instead of getting 503",
            soft,
            hard,
            needed,
        )
    return soft
