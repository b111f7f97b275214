"""The forward path: a raw ASGI handler for every path that is not meter's own.

request in → read body → identity → forward → relay + observe → exactly one UsageRecord

Rule 1 (transparent): the request body is forwarded byte for byte; status, end-to-end headers and body
        bytes of the response reach the client unchanged, each upstream chunk sent the moment it arrives.
Rule 2 (exactly one record): every request that reached this handler is emitted exactly once, from a
        ``finally``, whatever happened: completed, upstream error, meter error, or client gone.
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
        durability needs) must return at once (the writer queues); ``observe`` (metrics, request log,
        OpenTelemetry) and the span's end run once per record after the response's last byte was
        sent, or from the ``finally`` when there was none: no client waits for them.
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
from meter.bounds import cut, cut_optional
from meter.errors import InternalError, KeyRefusal, MeterError, RequestTimeout, RequestTooLarge, UpstreamError
from meter.forward.headers import (
    override_headers,
    replace_headers,
    split_response_headers,
    swap_credential,
    upstream_request_headers,
)
from meter.forward.ports import QuotaHook, Scope, TenancyHook, TraceHook, settlement_usage
from meter.forward.target import UpstreamBase
from meter.forward.upstream import Upstream, UpstreamResponse
from meter.records import Outcome, UsageRecord, UsageSource, new_event_id
from meter.tap.observer import DecodeBudget, Observation, ResponseObserver
from meter.tap.request import EMPTY, RequestInfo, inspect_request
from meter.tenancy.identity import KeyFingerprinter, request_credential

log = logging.getLogger("meter.forward.handler")

Receive = Callable[[], Any]
Send = Callable[[dict[str, Any]], Any]

CLIENT_CLOSED_REQUEST = 499  # recorded status when the client left before the upstream answered
WATCH_AFTER_S = 0.1  # Rule 4: when the disconnect watcher starts
DEFAULT_BODY_TIMEOUT = 60.0  # seconds between two reads of a request body (nginx's client_body_timeout)


class _Exchange:
    """Mutable per-request state, turned into one immutable UsageRecord at the end."""

    __slots__ = (
        "client_gone",
        "completed",
        "emitted",
        "endpoint",
        "error",
        "info",
        "key_fingerprint",
        "key_suffix",
        "observation",
        "observed",
        "quota_headers",
        "record",
        "rejection",
        "relaying",
        "request_bytes",
        "request_id",
        "reservation",
        "response_bytes",
        "scope",
        "settling",
        "span",
        "start_ns",
        "status",
        "t0",
        "t_client_headers",
        "t_forward",
        "t_upstream_headers",
        "team",
        "watcher",
    )

    def __init__(self, scope: Scope, t0: float, start_ns: int) -> None:
        self.scope = scope
        self.t0 = t0
        self.start_ns = start_ns
        self.emitted = False
        self.observed = False
        self.endpoint: str = scope["path"]
        self.request_id: str | None = None
        self.client_gone = False
        self.relaying = True  # False once the response is complete: a disconnect then is no abort
        self.completed = False
        self.error: MeterError | None = None
        self.info: RequestInfo = EMPTY
        self.key_fingerprint: str | None = None
        self.key_suffix: str | None = None
        self.observation: Observation | None = None
        self.quota_headers: list[tuple[bytes, bytes]] | None = None
        self.record: UsageRecord | None = None
        self.rejection: Any = None
        self.reservation: Any = None
        self.settling: asyncio.Future[Any] | None = None
        self.request_bytes = 0
        self.response_bytes = 0
        self.span: Any = None
        self.status = 0
        self.t_forward: float | None = None
        self.t_upstream_headers: float | None = None
        self.t_client_headers: float | None = None
        self.team = ""
        self.watcher: asyncio.Task[None] | None = None


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
        observe: Callable[[UsageRecord], None] | None = None,
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
        self._observe = observe
        self._max_request_bytes = max_request_bytes
        self._on_observe_error = on_observe_error
        self._decode_budget = decode_budget
        self._clock = clock
        self._settling_on: dict[tuple[Any, ...] | None, asyncio.Future[Any]] = {}  # connection → settle

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        x = _Exchange(scope, self._clock(), time.time_ns())
        try:
            await self._handle(scope, receive, send, x, x.t0, x.start_ns)
        except Exception:
            # A fault of meter's own (Rule 2 still holds): an OpenAI-shaped 500 if the response has
            # not started; if it has, returning without its end makes the server cut the connection.
            log.exception("forwarding %s %s failed", scope.get("method"), cut(str(scope.get("path")), 200))
            x.error = InternalError("meter could not handle this request; its log has the details")
            if x.t_client_headers is None:
                with contextlib.suppress(Exception):
                    await self._send_error(send, x.error, x)
        finally:
            self._finalize(x)
            self._start_settle(x)
            self._observed(x)
            if x.settling is not None:
                await asyncio.shield(x.settling)

    def _finalize(self, x: _Exchange) -> None:
        """Emit the request's one record (Rule 2): the first call wins, later calls do nothing."""
        if x.emitted:
            return
        x.emitted = True
        started_at = datetime.fromtimestamp(x.start_ns / 1e9, UTC)
        try:
            record = self._record(x.scope, x, x.t0, started_at)
        except Exception:  # a fault in building it must not cost the record (Rule 2)
            log.exception("building the usage record failed; a reduced one is kept")
            record = _reduced_record(x, started_at)
        x.record = record
        self._emit(record)

    def _observed(self, x: _Exchange) -> None:
        """Hand the record to the sinks and end the span, once, after the response's last byte went
        out where it could (Rule 5)."""
        record = x.record
        if x.observed or record is None:
            return
        x.observed = True
        if self._observe is not None:
            self._observe(record)
        if x.span is not None and self._tracer is not None:
            self._tracer.finish(x.span, record)

    def _complete(self, x: _Exchange, observer: ResponseObserver) -> None:
        """The response is complete: record it BEFORE the client can see the last byte, so a crash
        between the client's completion and the journal append cannot lose a completed request."""
        x.completed = True
        x.observation = observer.finish(aborted=False)
        self._finalize(x)

    def _start_settle(self, x: _Exchange) -> None:
        """Start settling the request's reservation, once (Rule 6), from its record. A task: a client
        leaving while the store answers must not leave the reservation held until its lease runs
        out; whoever awaits ``x.settling`` shields it."""
        reservation, x.reservation = x.reservation, None
        record = x.record
        if reservation is None or record is None or self._quota is None:
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

    def _settled_on(self, connection: tuple[Any, ...], done: asyncio.Future[Any]) -> None:
        if self._settling_on.get(connection) is done:
            del self._settling_on[connection]

    async def _handle(
        self, scope: Scope, receive: Receive, send: Send, x: _Exchange, t0: float, start_ns: int
    ) -> None:
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        try:
            url = self._url(scope)
            key = request_credential(headers, scope.get("query_string", b""))
            upstream_headers = upstream_request_headers(headers)
            body = await self._read_body(headers, receive, x)
        except MeterError as exc:
            x.error = exc
            await self._send_error(send, exc, x)
            return
        if body is None:  # the client left while sending its body
            x.client_gone = True
            x.status = CLIENT_CLOSED_REQUEST
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
                x.error = exc
                await self._send_error(send, exc, x)
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
                x.rejection = admitted.rejection
                await self._send_rejection(send, admitted.rejection, x)
                return
            x.reservation = admitted.reservation
            x.quota_headers = admitted.headers or None
        if self._tracer is not None:
            x.span = self._tracer.start(scope, x.info, start_ns)
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
            response = await self._upstream.send(scope["method"], url, upstream_headers, body)
            x.t_upstream_headers = self._clock()
            await self._relay(response, send, x)
        except UpstreamError as exc:
            x.error = exc
            if x.t_client_headers is None:
                await self._send_error(send, exc, x)
            # else: the response head is out; leaving it incomplete makes the server cut the connection,
            # the only honest way to tell the client the body is truncated.
        except asyncio.CancelledError:
            if not x.client_gone:
                raise
            task.uncancel()
        finally:
            x.relaying = False
            timer.cancel()
            if x.watcher is not None:
                x.watcher.cancel()
            if response is not None:
                await response.close(abort=not x.completed)
            if x.client_gone and x.t_client_headers is None:
                x.status = CLIENT_CLOSED_REQUEST

    async def _relay(self, response: UpstreamResponse, send: Send, x: _Exchange) -> None:
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
                if not x.emitted and (completes or b"[DONE]" in chunk):
                    # This chunk may complete the response in the client's eyes: the last byte of a
                    # Content-Length body, or a stream's "data: [DONE]" (the openai SDK stops reading
                    # there). Observe it first and, if so, record first.
                    observer = observer or new_observer()
                    observer.feed(chunk, now)
                    if completes or observer.done:
                        self._complete(x, observer)
                        self._start_settle(x)
                    if completes:  # the last body message, not one more empty one after it
                        ended, x.relaying = True, False
                        await send({"type": "http.response.body", "body": chunk, "more_body": False})
                        self._observed(x)
                        continue
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    if x.emitted:  # "data: [DONE]" went out: complete in the client's eyes
                        self._observed(x)
                    continue
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                observer = observer or new_observer()
                observer.feed(chunk, now)
            x.relaying = False
            if not x.emitted:
                # a chunked body ends with the terminator sent next
                self._complete(x, observer or new_observer())
            self._start_settle(x)
            if not ended:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                self._observed(x)
            if x.settling is not None:
                await asyncio.shield(x.settling)
        finally:
            if x.observation is None:
                x.observation = (observer or new_observer()).finish(aborted=True)

    async def _read_body(
        self, headers: list[tuple[bytes, bytes]], receive: Receive, x: _Exchange
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

    async def _send_error(self, send: Send, exc: MeterError, x: _Exchange) -> None:
        body = exc.body()
        x.status = exc.status_code
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
        x.response_bytes = len(body)

    async def _send_rejection(self, send: Send, rejection: Any, x: _Exchange) -> None:
        x.status = rejection.status
        await send({"type": "http.response.start", "status": rejection.status, "headers": rejection.headers})
        await send({"type": "http.response.body", "body": rejection.body, "more_body": False})
        x.response_bytes = len(rejection.body)

    def _record(self, scope: Scope, x: _Exchange, t0: float, started_at: datetime) -> UsageRecord:
        t_end = self._clock()
        obs = x.observation
        if x.rejection is not None:
            outcome = Outcome.REJECTED
        elif x.client_gone:
            outcome = Outcome.ABORTED
        elif x.error is not None:
            outcome = Outcome.PROXY_ERROR
        elif x.status >= 400 or (obs is not None and obs.stream_error):
            outcome = Outcome.UPSTREAM_ERROR
        else:
            outcome = Outcome.OK

        def ms(since: float | None, until: float | None) -> float | None:
            return None if since is None or until is None else (until - since) * 1000.0

        overhead = None
        if x.t_forward is not None:
            overhead = x.t_forward - t0
            if x.t_upstream_headers is not None and x.t_client_headers is not None:
                overhead += x.t_client_headers - x.t_upstream_headers
        usage_kwargs: dict[str, Any] = {}
        ttft_ms = tokens_per_second = None
        if obs is not None:
            usage = obs.usage
            usage_kwargs = {
                "prompt_tokens": usage.prompt_tokens,
                "completion_tokens": usage.completion_tokens,
                "cached_tokens": usage.cached_tokens,
                "reasoning_tokens": usage.reasoning_tokens,
                "total_tokens": usage.total_tokens,
                "response_id": obs.response_id,
                "response_model": obs.response_model,
                "finish_reason": ",".join(obs.finish_reasons) or None,
                "server_ttft_ms": None if obs.server_ttft_s is None else obs.server_ttft_s * 1000.0,
                "server_processing_ms": (
                    None if obs.server_processing_s is None else obs.server_processing_s * 1000.0
                ),
                "upstream_metrics": obs.upstream_metrics,
            }
            if obs.streamed:
                ttft_ms = ms(t0, obs.first_content_at)
            generation_start = obs.first_content_at if obs.streamed else x.t_forward
            if usage.completion_tokens and generation_start is not None and t_end > generation_start:
                tokens_per_second = usage.completion_tokens / (t_end - generation_start)
            if self._tenancy is not None:
                usage_kwargs["cost_nanos"], usage_kwargs["price_ref"] = self._tenancy.cost(
                    started_at, x.info.model, obs.response_model, usage
                )
        if x.rejection is not None:
            error: str | None = x.rejection.message
        elif x.error is not None:
            error = x.error.message
        else:
            error = obs.error_message if obs is not None else None
        return UsageRecord(
            event_id=new_event_id(),
            started_at=started_at,
            method=cut(scope["method"], bounds.METHOD),
            endpoint=cut(scope["path"], bounds.ENDPOINT),
            status_code=x.status,
            outcome=outcome,
            usage_source=obs.usage_source if obs is not None else UsageSource.MISSING,
            stream=x.info.stream,
            key_fingerprint=x.key_fingerprint,
            key_suffix=x.key_suffix,
            team=x.team,
            requested_model=x.info.model,
            request_id=x.request_id,
            duration_ms=(t_end - t0) * 1000.0,
            upstream_headers_ms=ms(t0, x.t_upstream_headers),
            ttft_ms=ttft_ms,
            output_tokens_per_second=tokens_per_second,
            overhead_ms=None if overhead is None else overhead * 1000.0,
            request_bytes=x.request_bytes,
            response_bytes=x.response_bytes,
            error=cut_optional(error, bounds.ERROR),
            **usage_kwargs,
        )


def _reduced_record(x: _Exchange, started_at: datetime) -> UsageRecord:
    """The record of an exchange whose full record could not be built: who, what and how it ended."""
    scope = x.scope
    return UsageRecord(
        event_id=new_event_id(),
        started_at=started_at,
        method=cut(str(scope.get("method", "")), bounds.METHOD),
        endpoint=cut(str(scope.get("path", "")), bounds.ENDPOINT),
        status_code=x.status,
        outcome=Outcome.ABORTED if x.client_gone else Outcome.PROXY_ERROR,
        usage_source=UsageSource.MISSING,
        stream=x.info.stream,
        key_fingerprint=x.key_fingerprint,
        key_suffix=x.key_suffix,
        team=x.team,
        requested_model=x.info.model,
        request_bytes=x.request_bytes,
        response_bytes=x.response_bytes,
        error="meter could not build this request's full record; its log has the details",
    )


async def _watch_disconnect(receive: Receive, task: asyncio.Task[Any], x: _Exchange) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
    if x.relaying:
        x.client_gone = True
        task.cancel()


def _connection(scope: Scope) -> tuple[Any, ...] | None:
    """The client's TCP connection (address and port, as the ASGI server reports them)."""
    client = scope.get("client")
    return tuple(client) if client else None
