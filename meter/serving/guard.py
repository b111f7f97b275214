"""uvicorn's httptools protocol, held to meter's limits on client connections (:mod:`meter.serving.options`).

Rule 1 (head size): a request head (request line and header lines) larger than ``max_head_bytes``, or
        with more than ``max_header_fields`` fields, is answered 431. Bytes count as they arrive, so a
        head that never ends is refused once it passes the limit, not when (if ever) it ends; a head
        that begins in the read which ended the message before it (pipelining) counts from that read.
        Fields are counted when the head completes: until then its bytes bound how many can arrive.
Rule 2 (head deadline): a head must be complete ``head_timeout`` seconds after the connection opened
        or, on a kept-alive connection, after its first byte arrived. Past that: 408 if part of a request
        came, a plain close if nothing did.
Rule 3 (idle): a kept-alive connection waiting for its next request is closed after
        ``keepalive_timeout`` (uvicorn's keep-alive timer, with meter's value).
Rule 4 (connections): a process holds at most ``max_connections`` client connections; the next one is
        answered 503 at once and closed.
Rule 5 (bodies and responses are not ours): every rule ends where a head is complete. A request body
        (its deadline belongs to the forward path) and a response are never cut here, but for Rule 7.
        A refusal that would land in the middle of a response on the same connection (a pipelined
        request behind it) is not written: that response finishes, then the connection closes.
Rule 6 (no draining without end): a response that completes before its request's body is in (meter
        answered early: 413 on a declared length, or the forward path's body deadline) ends the
        connection, lingering as below. uvicorn would read the rest of the body, with no deadline.
Rule 7 (slow readers): a client that leaves a response unread, so that meter's write buffer stays past
        its high-water mark (64 KiB, the kernel's send buffer full before it) for ``send_timeout``
        seconds, loses the connection: it is aborted, what is buffered dropped. The application then
        sees the client gone, as after any disconnect, and lets the upstream go. Without it, such a
        client held its connection, the response and an upstream connection for as long as it liked.

Refusals are written in the OpenAI error shape (:mod:`meter.errors`) with ``connection: close``, and
counted by reason through the callable the application leaves in the ASGI lifespan state under
:data:`meter.serving.options.REFUSALS_STATE_KEY` (``meter_connection_refusals_total``; no request exists to
record them as usage). The
connection then parses nothing more, half-closes, and discards what the client still sends for up to
``LINGER`` seconds: a socket closed with unread input sends a reset, which can destroy the answer before
the client reads it. At most ``MAX_LINGERING`` connections of a process linger at once; past that a
closing connection is closed at once.

Cost per request: a few attribute tests per read and per response, a count of the fields when a head
completes, and a timer only for a head that does not arrive in one read (a connection's first head uses
the timer armed when it opened); fields are summed only for a head completed by a read larger than the
limit. Nothing per header field, nothing per body chunk.

This subclass relies on uvicorn's protocol internals (``parser``, ``cycle``, ``connections``, the
keep-alive timer); pyproject pins the uvicorn versions it was written against, and
``tests/security/test_slow_clients.py`` exercises every rule through a real socket.
"""

from __future__ import annotations

import asyncio
import http
import logging
import math
import time
from typing import Any

import httptools
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from meter.errors import MalformedRequest, MeterError, RequestHeadTooLarge, RequestTimeout, TooManyConnections
from meter.serving.limits import REFUSALS_STATE_KEY, ConnectionLimits

log = logging.getLogger("meter.serving.options")

LINGER = 2.0  # seconds a closing connection reads (and discards) after its last answer
MAX_LINGERING = 256  # closing connections lingering at once, per process
_WARN_EVERY = 10.0  # seconds between two warnings that the connection limit refused someone
_REASONS: dict[type[MeterError] | None, str] = {
    TooManyConnections: "too_many_connections",
    RequestHeadTooLarge: "head_too_large",
    RequestTimeout: "head_timeout",
    MalformedRequest: "malformed",
    None: "head_timeout",  # a connection that sent nothing before the head deadline
}


class ConnectionGuard:
    """What the connections of one server share: the limits, and refusals in progress."""

    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits = limits
        self.lingering = 0
        self._refused_unreported = 0
        self._warned_at = -math.inf

    def connection_refused(self) -> None:
        """Rule 4 refused a connection: a warning, at most one per ``_WARN_EVERY`` seconds."""
        self._refused_unreported += 1
        now = time.monotonic()
        if now - self._warned_at >= _WARN_EVERY:
            log.warning(
                "refused %d client connection(s) with 503: this process holds its maximum of %d "
                "(METER_MAX_CLIENT_CONNECTIONS)",
                self._refused_unreported,
                self.limits.max_connections,
            )
            self._refused_unreported = 0
            self._warned_at = now


class _Refused(Exception):
    """Raised out of a parser callback to stop the parser; the refusal is in ``_refusal``."""


def answer(error: MeterError, *headers: tuple[bytes, bytes]) -> bytes:
    """A whole HTTP/1.1 response carrying ``error`` in the OpenAI shape, closing the connection."""
    body = error.body()
    status = error.status_code
    head = [
        b"HTTP/1.1 %d %s\r\n" % (status, http.HTTPStatus(status).phrase.encode()),
        b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n" % len(body),
    ]
    head += [name + b": " + value + b"\r\n" for name, value in headers]
    return b"".join([*head, b"\r\n", body])


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    # Slots: uvicorn's attributes stay in the instance dict; these would grow it past its next size
    # (measured: 1.2 KiB more per connection without them; 1,000 connections, uvloop).
    __slots__ = (
        "_head_begun",
        "_head_bytes",
        "_head_timeout",
        "_head_timer",
        "_linger_timer",
        "_max_head_bytes",
        "_max_header_fields",
        "_reading_head",
        "_refusal",
        "_refusing",
        "_send_timeout",
        "_send_timer",
        "guard",
    )

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
        *,
        guard: ConnectionGuard,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.guard = guard
        limits = guard.limits
        self.timeout_keep_alive = limits.keepalive_timeout  # type: ignore[assignment]  # uvicorn: int
        self._max_head_bytes = limits.max_head_bytes
        self._max_header_fields = limits.max_header_fields
        self._head_timeout = limits.head_timeout
        self._send_timeout = limits.send_timeout
        self._send_timer: asyncio.TimerHandle | None = None
        # Between the end of one message and the end of the next head, received bytes count (Rule 1).
        self._reading_head = True
        self._head_bytes = 0
        self._head_begun = False  # the parser began a message whose head is not complete
        self._head_timer: asyncio.TimerHandle | None = None
        self._refusal: MeterError | None = None  # raised by a parser callback, answered by data_received
        self._refusing = False  # refused: input is discarded
        self._linger_timer: asyncio.TimerHandle | None = None

    # Connection life

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.connections) >= self.guard.limits.max_connections:  # Rule 4
            self.transport = transport
            self.guard.connection_refused()
            limit = self.guard.limits.max_connections
            message = f"meter is holding its maximum of {limit} client connections; retry shortly."
            self._refuse(TooManyConnections(message), (b"retry-after", b"1"))
            return
        super().connection_made(transport)
        self._head_timer = self.loop.call_later(self._head_timeout, self._head_timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None
        if self._linger_timer is not None:
            self._linger_timer.cancel()
            self._linger_timer = None
            self.guard.lingering -= 1
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        # uvicorn's data_received, with Rules 1 and 2 around the parser and meter's own refusals.
        if self._refusing:
            return
        self._unset_keepalive_if_required()
        if self._reading_head:
            self._head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()  # pragma: no cover - meter runs with ws="none"
            else:
                self._unsupported_upgrade_warning()
            return
        except httptools.HttpParserError:
            refusal, self._refusal = self._refusal, None
            if refusal is None:
                self.logger.warning("Invalid HTTP request received.")
                refusal = MalformedRequest("Invalid HTTP request received.")
            self._refuse(refusal)
            return
        if not self._reading_head:
            return
        if self._head_begun and not self._head_bytes:
            self._head_bytes = self._straddled_head(data)
        if self._head_bytes > self._max_head_bytes:
            self._refuse(self._head_too_large())
        elif self._head_timer is None and (self._head_begun or self._head_bytes):
            # A head (or bytes before one) arrived and is not complete after this read: Rule 2's clock.
            self._head_timer = self.loop.call_later(self._head_timeout, self._head_timed_out)

    def _straddled_head(self, data: bytes) -> int:
        """The bytes of a head that began in this read after another message ended in it (pipelining):
        what the parser delivered (target, fields) plus what it may still hold, which lies past the
        read's second-to-last line end (llhttp refuses bare LF and obs-fold, and hands over a field when
        the next begins). At most the previous message's tail too, when the new head has no line end
        yet: an over-count, never an under-count."""
        last = data.rfind(b"\n")
        held = len(data) - data.rfind(b"\n", 0, last) - 1 if last > 0 else len(data)
        return self._parsed_head() + held

    def _parsed_head(self) -> int:
        """What the parser delivered of the current head: its target and complete fields."""
        return len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)

    # Transport callbacks

    def pause_writing(self) -> None:
        if self.flow is not None:  # None: refused at connection_made, its answer small
            super().pause_writing()
        if self._send_timer is None:  # Rule 7's clock runs while the write buffer is full
            self._send_timer = self.loop.call_later(self._send_timeout, self._send_timed_out)

    def resume_writing(self) -> None:
        if self.flow is not None:
            super().resume_writing()
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None

    def _send_timed_out(self) -> None:
        self._send_timer = None
        log.debug("aborting a client connection that read nothing for %g seconds", self._send_timeout)
        self._count("send_timeout")
        self.transport.abort()  # close() would wait for the buffer to drain: for ever

    # Parser callbacks

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_begun = True

    def on_headers_complete(self) -> None:
        self._cancel_head_timer()
        counted = self._head_bytes
        self._reading_head = self._head_begun = False
        self._head_bytes = 0
        if len(self.headers) > self._max_header_fields:
            self._refusal = RequestHeadTooLarge(
                f"The request has more than {self._max_header_fields} header fields, meter's limit."
            )
            raise _Refused
        # The bytes read since the head began bound its size, unless the read that completed it was past
        # the limit (it may carry the body's start) or began in the message before (0 counted): then
        # what was parsed decides.
        if not 0 < counted <= self._max_head_bytes and self._parsed_head() > self._max_head_bytes:
            self._refusal = self._head_too_large()
            raise _Refused
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._reading_head = True
        self._head_bytes = 0

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self._reading_head and self.cycle.response_complete and not self.transport.is_closing():
            # Rule 6: answered before its body was in. uvicorn would read the rest with no deadline at all.
            self._refusing = True
            self._unset_keepalive_if_required()
            self._linger()

    # Refusals

    def _head_too_large(self) -> RequestHeadTooLarge:
        return RequestHeadTooLarge(
            f"The request line and headers exceed meter's limit of {self._max_head_bytes} bytes."
        )

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if self._head_begun:
            message = f"The request head did not arrive within {self._head_timeout:g} seconds."
            self._refuse(RequestTimeout(message))
        else:
            self._refuse(None)  # nothing of a request came: nothing to answer

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _refuse(self, error: MeterError | None, *headers: tuple[bytes, bytes]) -> None:
        """Answer ``error`` (None: no answer) and close the connection, without cutting a response."""
        self._refusing = True
        self._cancel_head_timer()
        self._unset_keepalive_if_required()
        self._count(_REASONS.get(None if error is None else type(error), "malformed"))
        if error is not None:
            log.debug("refusing a client connection: %d %s", error.status_code, error.code)
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:  # Rule 5
            cycle.keep_alive = False  # that response finishes, then uvicorn closes the connection
            return
        if error is None:
            self.transport.close()  # nothing unread (a client that sent nothing, or bytes already read)
            return
        self.transport.write(answer(error, *headers))
        self._linger()

    def _count(self, reason: str) -> None:
        count = self.app_state.get(REFUSALS_STATE_KEY)
        if count is not None:
            count(reason)

    def _linger(self) -> None:
        """Close after what was written, without a reset: half-close, then discard input until the client
        closes or LINGER seconds pass (closing with unread input would send RST, which can destroy the
        answer before the client reads it)."""
        transport = self.transport
        if self.guard.lingering >= MAX_LINGERING or not transport.can_write_eof():
            transport.close()
            return
        transport.write_eof()
        self.guard.lingering += 1
        self._linger_timer = self.loop.call_later(LINGER, transport.close)  # connection_lost ends the linger
