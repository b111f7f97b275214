"""The forward path: a raw ASGI handler for every path that is not meter's own.

request in → read body → identity → admit → forward → relay + observe → exactly one UsageRecord

The request's life is the state machine of :mod:`meter.forward.exchange`; :meth:`Proxy._advance` is its
one transition function, and the only place that records, settles and publishes.

Rule 1 (transparent): the request body is forwarded byte for byte; status, end-to-end headers and body
        bytes of the response reach the client unchanged, each upstream chunk sent the moment it arrives.
Rule 2 (exactly one record): every request that reached this handler ends exactly once (COMPLETE,
        ABORTED or FAILED), whatever happened, and its record is journaled on that transition: where
        the path ends it, or from a ``finally`` that ends what is still open. meter's own answers
        (errors, quota refusals) are recorded before they are sent.
Rule 3 (observing never breaks forwarding): a chunk is sent to the client before the observer sees it,
        and the observer never raises. The exception is a chunk that may complete the response in the
        client's eyes (Rule 2's record comes first): the last of a Content-Length body, or one holding
        a stream's ``data: [DONE]``.
Rule 4 (the client leaving stops the upstream): a watcher task waits for ``http.disconnect`` and cancels
        the relay; the upstream response is then closed together with its connection, so the provider
        stops generating. The watcher starts only once an exchange has lasted ``WATCH_AFTER_S``
        (a timer is far cheaper than a task, and most non-streamed exchanges are over sooner): a
        client that left earlier is noticed then, so the upstream stops at most that much later.
Rule 5 (the hot path never waits on a sink): ``emit`` (the journal append, the one step a record's
        durability needs) must return at once (the writer queues); ``publish`` (metrics, request log,
        OpenTelemetry) and the span's end run on the PUBLISHED transition, after the response's
        last byte was sent, or from the ``finally`` when there was none: no client waits for them.
Rule 6 (quotas: reserve, then settle once): with a quota hook, a request is admitted after its key is
        resolved and before anything is sent upstream; a refused one gets the hook's 429/503 and is
        recorded as ``rejected``. An admitted request's reservation is settled exactly once with what
        the record says it used: the settle starts before the byte that completes the response and
        is awaited after it (the store's round trip overlaps the last send instead of delaying it),
        or, if the exchange ended otherwise, in the ``finally``; either way shielded from
        cancellation. A client sending request after request on a keep-alive connection is judged
        on its settled spend, never on a reservation still held: with an ordered store (the
        in-memory and Redis ones) the settle task's first step, which takes the settle's place in
        the store's order, runs before the task serving the connection's next request can start
        (the loop runs ready callbacks first in, first out), so the next admit comes after it;
        with any other store the next request on the connection is admitted only once that settle
        is done. (A request on another connection or replica that arrives before the settle
        reaches the store — a round trip, plus up to the Redis store's 5 ms linger — can see the
        reservation instead: conservative, except for a response that cost more than it reserved,
        which the quota bound already counts as in flight.) The hook's ``x-ratelimit-*`` headers
        replace the upstream's on responses to keys with rate limits: the one documented change to
        response headers.

Timings (all from one monotonic clock, origin = the moment the ASGI server handed meter the request):
``upstream_headers_ms`` until the upstream's response head, ``ttft_ms`` until the first streamed chunk
carrying content was relayed, ``duration_ms`` until the last byte was relayed, and ``overhead_ms`` =
(time before the upstream request was sent) + (time from the upstream's response head to the client's).
The raw ASGI handler bypasses litestar's routing on purpose: the forward path is the hot path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from meter import bounds
from meter.bounds import cut
from meter.errors import InternalError, KeyRefusal, MeterError, RequestTimeout, RequestTooLarge, UpstreamError
from meter.forward.exchange import ENDS, Exchange, Phase, Scope, advance, build_record, reduced_record
from meter.forward.headers import (
    override_headers,
    replace_headers,
    split_response_headers,
    swap_credential,
    upstream_request_headers,
)
from meter.forward.ports import QuotaHook, TenancyHook, TraceHook, settlement_usage
from meter.forward.target import UpstreamBase
from meter.forward.upstream import Upstream, UpstreamResponse
from meter.records import UsageRecord
from meter.tap.observer import DecodeBudget, ResponseObserver
from meter.tap.request import inspect_request
from meter.tenancy.identity import KeyFingerprinter, request_credential

log = logging.getLogger("meter.forward.handler")

Receive = Callable[[], Any]
Send = Callable[[dict[str, Any]], Any]

CLIENT_CLOSED_REQUEST = 499  # recorded status when the client left before the upstream answered
WATCH_AFTER_S = 0.1  # Rule 4: when the disconnect watcher starts
DEFAULT_BODY_TIMEOUT = 60.0  # seconds between two reads of a request body (nginx's client_body_timeout)
_LIVE = frozenset({Phase.FORWARDING, Phase.RELAYING})  # a disconnect now is an abort (Rule 4)


class Proxy:
    def __init__(
        self,
        *,
        upstream: Upstream,
        upstream_url: str,
        fingerprinter: KeyFingerprinter,
        emit: Callable[[UsageRecord], None],
        max_request_bytes: int,
        body_timeout: float = DEFAULT_BODY_TIMEOUT,
        publish: Callable[[UsageRecord], None] | None = None,
        on_observe_error: Callable[[str], None] | None = None,
        decode_budget: DecodeBudget = DecodeBudget(),  # noqa: B008 (frozen)
        tracer: TraceHook | None = None,
        tenancy: TenancyHook | None = None,
        quota: QuotaHook | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self._tracer = tracer
        self._tenancy = tenancy
        self._quota = quota
        self._upstream = upstream
        self._target = UpstreamBase(upstream_url)
        self._body_timeout = body_timeout
        self._fingerprinter = fingerprinter
        self._emit = emit
        self._publish = publish
        self._max_request_bytes = max_request_bytes
        self._on_observe_error = on_observe_error
        self._decode_budget = decode_budget
        self._clock = clock
        self._price = tenancy.cost if tenancy is not None else None
        self._settling_on: dict[tuple[Any, ...] | None, asyncio.Task[object]] = {}  # connection → settle

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        x = Exchange(scope, self._clock(), time.time_ns())
        try:
            await self._handle(scope, receive, send, x)
        except Exception:
            # A fault of meter's own (Rule 2 still holds): an OpenAI-shaped 500 if the response has
            # not started; if it has, returning without its end makes the server cut the connection.
            log.exception("forwarding %s %s failed", scope.get("method"), cut(str(scope.get("path")), 200))
            error = InternalError("meter could not handle this request; its log has the details")
            if x.phase not in ENDS and x.phase is not Phase.PUBLISHED:
                if x.t_client_headers is None:
                    with contextlib.suppress(Exception):
                        await self._fail(send, x, error)
                else:
                    x.error = error
        finally:
            if x.phase not in ENDS and x.phase is not Phase.PUBLISHED:
                self._advance(x, Phase.ABORTED if x.client_gone else Phase.FAILED)
            if x.phase is not Phase.PUBLISHED:
                self._advance(x, Phase.PUBLISHED)
            if x.settling is not None:
                await asyncio.shield(x.settling)

    # The one transition function ----------------------------------------------------------------

    def _advance(self, x: Exchange, to: Phase) -> None:
        """Move ``x`` to ``to`` (meter.forward.exchange, Rule 1) and do what entering it means: an end
        journals the record and starts settling (Rules 2 and 6); PUBLISHED hands the record to the
        sinks and ends the span (Rule 5)."""
        x.phase = advance(x.phase, to)
        if to in ENDS:
            x.end = to
            try:
                record = build_record(x, to, self._clock(), self._price)
            except Exception:  # a fault in building it must not cost the record (Rule 2)
                log.exception("building the usage record failed; a reduced one is kept")
                record = reduced_record(x, to)
            x.record = record
            self._emit(record)
            self._start_settle(x, record)
        elif to is Phase.PUBLISHED:
            published = x.record
            assert published is not None  # PUBLISHED follows an end (exchange, Rule 2)
            if self._publish is not None:
                self._publish(published)
            if x.span is not None and self._tracer is not None:
                self._tracer.finish(x.span, published)

    def _start_settle(self, x: Exchange, record: UsageRecord) -> None:
        """Start settling the request's reservation (Rule 6), from its record. A task: a client
        leaving while the store answers must not leave the reservation held until its lease runs
        out; whoever awaits ``x.settling`` shields it."""
        reservation, x.reservation = x.reservation, None
        if reservation is None or self._quota is None:
            return
        settling = x.settling = self._quota.start_settle(
            reservation, settlement_usage(record), record.cost_usd, datetime.now(UTC)
        )
        if self._quota.ordered:
            return  # the next admit on this connection is ordered after it (Rule 6)
        connection = _connection(x.scope)
        if connection is not None:
            self._settling_on[connection] = settling
            settling.add_done_callback(lambda done: self._settled_on(connection, done))

    def _settled_on(self, connection: tuple[Any, ...], done: asyncio.Task[object]) -> None:
        if self._settling_on.get(connection) is done:
            del self._settling_on[connection]

    # The path -----------------------------------------------------------------------------------

    async def _handle(self, scope: Scope, receive: Receive, send: Send, x: Exchange) -> None:
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        try:
            url = self._url(scope)
            key = request_credential(headers, scope.get("query_string", b""))
            upstream_headers = upstream_request_headers(headers)
            body = await self._read_body(headers, receive, x)
        except MeterError as exc:
            await self._fail(send, x, exc)
            return
        if body is None:  # the client left while sending its body
            x.client_gone = True
            x.status = CLIENT_CLOSED_REQUEST
            self._advance(x, Phase.ABORTED)
            return
        x.request_bytes = len(body)
        x.info = inspect_request(body)
        if self._tenancy is None:
            if key is not None:
                identity = self._fingerprinter.identify(key)
                x.key_fingerprint, x.key_suffix = identity.fingerprint, identity.suffix or None
        else:
            try:
                who = self._tenancy.resolve(key)
            except MeterError as exc:  # refused: 401 (unknown/revoked/expired), 500 or 503
                if isinstance(exc, KeyRefusal):
                    x.team, x.key_fingerprint, x.key_suffix = exc.team, exc.fingerprint, exc.suffix or None
                await self._fail(send, x, exc)
                return
            x.team, x.key_fingerprint, x.key_suffix = who.team, who.fingerprint, who.suffix or None
            if who.upstream_authorization is not None:
                upstream_headers = swap_credential(upstream_headers, who.upstream_authorization)
        if self._quota is not None:
            if self._settling_on:
                previous = self._settling_on.get(_connection(scope))
                if previous is not None:  # this connection's previous response (Rule 6)
                    await asyncio.shield(previous)
            admitted = await self._quota.admit(
                x.team, x.key_fingerprint, x.info, datetime.now(UTC), endpoint=x.endpoint
            )
            if not admitted.allowed:
                rejection = admitted.rejection
                assert rejection is not None  # a refusal always carries its answer
                x.rejection, x.status = rejection, rejection.status
                x.response_bytes = len(rejection.body)
                self._advance(x, Phase.FAILED)  # recorded before the client sees it (Rule 2)
                await send(
                    {"type": "http.response.start", "status": rejection.status, "headers": rejection.headers}
                )
                await send({"type": "http.response.body", "body": rejection.body, "more_body": False})
                return
            x.reservation = admitted.reservation
            x.quota_headers = admitted.headers or None
        self._advance(x, Phase.ADMITTED)
        if self._tracer is not None:
            x.span = self._tracer.start(scope, x.info, x.start_ns)
            upstream_headers = replace_headers(upstream_headers, self._tracer.propagation_headers(x.span))

        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()

        def start_watching() -> None:
            x.watcher = loop.create_task(_watch_disconnect(receive, task, x))

        timer = loop.call_later(WATCH_AFTER_S, start_watching)
        response: UpstreamResponse | None = None
        try:
            x.t_forward = self._clock()
            self._advance(x, Phase.FORWARDING)
            response = await self._upstream.send(scope["method"], url, upstream_headers, body)
            x.t_upstream_headers = self._clock()
            await self._relay(response, send, x)
        except UpstreamError as exc:
            if x.t_client_headers is None:
                await self._fail(send, x, exc)
            else:
                # The response head is out: leaving it incomplete makes the server cut the connection,
                # the only honest way to tell the client the body is truncated.
                x.error = exc
                self._advance(x, Phase.FAILED)
        except asyncio.CancelledError:
            if not x.client_gone:
                raise
            task.uncancel()
            if x.t_client_headers is None:
                x.status = CLIENT_CLOSED_REQUEST
            self._advance(x, Phase.ABORTED)
        finally:
            timer.cancel()
            if x.watcher is not None:
                x.watcher.cancel()
            if response is not None:
                await response.close(abort=x.end is not Phase.COMPLETE)

    async def _relay(self, response: UpstreamResponse, send: Send, x: Exchange) -> None:
        lowered, client_headers = split_response_headers(response.headers)

        def new_observer() -> ResponseObserver:
            return ResponseObserver(
                x.endpoint,
                status_code=response.status,
                headers=lowered,
                prompt_tokens_estimate=x.info.prompt_tokens_estimate,
                on_error=self._on_observe_error,
                budget=self._decode_budget,
            )

        def complete(observer: ResponseObserver) -> None:
            """The response is complete: recorded BEFORE the client can see the byte that completes
            it, so a crash between the client's completion and the journal append cannot lose it."""
            x.observation = observer.finish(aborted=False)
            self._advance(x, Phase.COMPLETE)

        observer: ResponseObserver | None = None
        x.status = response.status
        request_id = lowered.get("x-request-id")
        x.request_id = None if request_id is None else cut(request_id, bounds.REQUEST_ID)
        declared = lowered.get("content-length")
        expected = int(declared) if declared is not None and declared.isdigit() else None
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": response.status,
                    "headers": (
                        client_headers
                        if x.quota_headers is None
                        else override_headers(client_headers, x.quota_headers)
                    ),
                }
            )
            x.t_client_headers = self._clock()
            self._advance(x, Phase.RELAYING)
            # The observer is made when first needed: reading the fireworks-* headers delays neither
            # the head nor a stream's first chunk.
            clock = self._clock
            ended = False  # the client was sent more_body=False
            async for chunk in response.chunks():
                if ended:
                    break  # past the declared length: the upstream client does not hand these out
                now = clock()
                x.response_bytes += len(chunk)
                completes = expected is not None and x.response_bytes >= expected
                if x.phase is Phase.RELAYING and (completes or b"[DONE]" in chunk):
                    # This chunk may complete the response in the client's eyes: the last byte of a
                    # Content-Length body, or a stream's "data: [DONE]" (the openai SDK stops reading
                    # there). Observe it first and, if so, record first.
                    observer = observer or new_observer()
                    observer.feed(chunk, now)
                    if completes or observer.done:
                        complete(observer)
                    if completes:  # the last body message, not one more empty one after it
                        ended = True
                        await send({"type": "http.response.body", "body": chunk, "more_body": False})
                        self._advance(x, Phase.PUBLISHED)
                        continue
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    if x.end is Phase.COMPLETE:  # "data: [DONE]" went out: complete in the client's eyes
                        self._advance(x, Phase.PUBLISHED)
                    continue
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                observer = observer or new_observer()
                observer.feed(chunk, now)
            if x.phase is Phase.RELAYING:  # a chunked body ends with the terminator sent next
                complete(observer or new_observer())
            if not ended:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                if x.phase is Phase.COMPLETE:
                    self._advance(x, Phase.PUBLISHED)
            if x.settling is not None:
                await asyncio.shield(x.settling)
        finally:
            if x.observation is None:
                x.observation = (observer or new_observer()).finish(aborted=True)

    async def _read_body(
        self, headers: list[tuple[bytes, bytes]], receive: Receive, x: Exchange
    ) -> bytes | None:
        limit = self._max_request_bytes
        declared = next((v for n, v in headers if n == b"content-length"), None)
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise RequestTooLarge(
                f"request body of {int(declared)} bytes exceeds meter's limit of {limit} bytes"
            )
        parts: list[bytes] = []
        size = 0
        timeout = self._body_timeout
        loop = asyncio.get_running_loop()
        try:
            # One deadline, moved on at every read: a client that stops sending is answered 408.
            async with asyncio.timeout(timeout) as deadline:
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return None
                    chunk = message.get("body", b"")
                    if chunk:
                        size += len(chunk)
                        if size > limit:
                            raise RequestTooLarge(f"request body exceeds meter's limit of {limit} bytes")
                        parts.append(chunk)
                    if not message.get("more_body", False):
                        break
                    deadline.reschedule(loop.time() + timeout)
        except TimeoutError:
            raise RequestTimeout(
                f"the request body stopped arriving: nothing for {timeout:g} s (METER_CLIENT_BODY_TIMEOUT)"
            ) from None
        x.request_bytes = size
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _url(self, scope: Scope) -> str:
        """The upstream URL (meter.forward.target); raises InvalidTarget (400)."""
        raw_path: bytes | None = scope.get("raw_path")
        if raw_path is None:  # a server that keeps only the decoded path
            raw_path = quote(scope["path"], safe="/:@!$&'()*+,;=-._~").encode("ascii")
        return self._target.url(raw_path, scope.get("query_string", b""))

    async def _fail(self, send: Send, x: Exchange, exc: MeterError) -> None:
        """End the exchange FAILED with meter's own answer: recorded first, then sent (Rule 2)."""
        body = exc.body()
        x.error, x.status, x.response_bytes = exc, exc.status_code, len(body)
        self._advance(x, Phase.FAILED)
        await send(
            {
                "type": "http.response.start",
                "status": exc.status_code,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body, "more_body": False})


async def _watch_disconnect(receive: Receive, task: asyncio.Task[Any], x: Exchange) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
    if x.phase in _LIVE:
        x.client_gone = True
        task.cancel()


def _connection(scope: Scope) -> tuple[Any, ...] | None:
    """The client's TCP connection (address and port, as the ASGI server reports them)."""
    client = scope.get("client")
    return tuple(client) if client else None
