"""The simulator as a raw ASGI 3 application: routing, authentication, timing, streaming, inspection.

A request goes: route -> read body -> record -> Authorization -> ``x-sim-*`` overrides -> injected
error? -> JSON -> :func:`.plan.plan_request` -> wait time to first token -> answer (one JSON body, or
an SSE stream flushed one ASGI ``send`` per event).

Rule 1: every API request lands in exactly one terminal counter of :class:`.SimulatorStats` (see
        :mod:`.config`); ``/_sim/*`` inspection requests are neither counted nor recorded.
Rule 2: a client that goes away is noticed while waiting (time to first token, between tokens): a
        stream stops generating at once and counts in ``streams_cancelled``. A background task awaits
        ``receive()`` for ``http.disconnect`` and wakes the sleeper, so the check costs one attribute
        read per token. A stream without token delay yields to the loop every :data:`YIELD_EVERY`
        tokens, so it neither starves other connections nor outruns a disconnect by more than that.
Rule 3: a zero delay costs nothing: no timer and no per-token ``asyncio.sleep(0)``; a non-streamed
        request without a time to first token answers without creating a task.
Rule 4: only a non-streamed answer has a final ``fireworks-server-processing-time``; a stream's
        headers leave at its first token, carrying the time until then.

Paths are Fireworks' (``/v1/...``), also accepted under ``/inference/v1/...`` as the real base URL is
``https://api.fireworks.ai/inference``. Inspection: ``GET /_sim/stats``, ``GET /_sim/requests[?limit=N]``,
``POST /_sim/reset``.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qs

import orjson

from .asgi import DisconnectWatch, Receive, Scope, Send, lifespan, read_body, send_json
from .config import ReceivedRequest, SimulatorConfig, SimulatorStats
from .faults import (
    METHOD_NOT_ALLOWED,
    MIDSTREAM_TOKENS,
    MISSING_AUTH,
    RETRY_AFTER_SECONDS,
    UNKNOWN_PATH,
    Fault,
    invalid_request,
)
from .plan import NO_OVERRIDES, Api, Plan, PlanError, parse_overrides, plan_request
from .shapes import (
    DONE,
    NO_CACHE,
    RATE_LIMIT_HEADERS,
    SSE_TYPE,
    ChunkTemplates,
    ResponseEvents,
    fireworks_headers,
    non_streamed_body,
    perf_metrics,
    sse,
)
from .tokens import token_bytes

ROUTES: dict[str, Api] = {
    "/v1/chat/completions": Api.CHAT,
    "/v1/completions": Api.COMPLETIONS,
    "/v1/embeddings": Api.EMBEDDINGS,
    "/v1/responses": Api.RESPONSES,
}
MODELS_PATH = "/v1/models"
MODELS = (
    "accounts/fireworks/models/llama-v3p1-8b-instruct",
    "accounts/fireworks/models/llama-v3p3-70b-instruct",
    "accounts/fireworks/models/deepseek-v3p1",
    "accounts/fireworks/models/qwen3-30b-a3b",
    "nomic-ai/nomic-embed-text-v1.5",
)
_MODEL_CREATED = 1_700_000_000
DEFAULT_CONFIG = SimulatorConfig()
YIELD_EVERY = 128  # token steps between yields of a stream without token delay (rule 2)
_RATE_LIMITED_HEADERS = (
    *(h for h in RATE_LIMIT_HEADERS if h[0] != b"x-ratelimit-over-limit"),
    (b"x-ratelimit-over-limit", b"yes"),
    (b"retry-after", b"%d" % RETRY_AFTER_SECONDS),
)


class Simulator:
    """A Fireworks-compatible upstream as an ASGI app: ``await sim(scope, receive, send)``."""

    def __init__(self, config: SimulatorConfig = DEFAULT_CONFIG) -> None:
        self.config = config
        self.received: deque[ReceivedRequest] = deque(maxlen=config.record_requests)
        self.stats = SimulatorStats()
        self._ttft = config.ttft_ms / 1000
        self._token_delay = config.token_delay_ms / 1000
        # ids: a random per-instance prefix and a counter, unique and far cheaper than uuid4()
        self._id_prefix = os.urandom(4).hex()
        self._ids = itertools.count()
        self._models_body = orjson.dumps({"object": "list", "data": [self._model(m) for m in MODELS]})

    def reset(self) -> None:
        self.received.clear()
        self.stats.reset()

    @staticmethod
    def _model(model_id: str) -> dict[str, Any]:
        return {"id": model_id, "object": "model", "owned_by": "fireworks", "created": _MODEL_CREATED}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind != "http":
            if kind == "lifespan":
                await lifespan(receive, send)
            return
        path: str = scope["path"]
        if path.startswith("/_sim/"):
            await self._inspect(scope, receive, send, path)
            return
        stats = self.stats
        stats.requests += 1
        stats.in_flight += 1
        try:
            await self._handle(scope, receive, send, path)
        finally:
            stats.in_flight -= 1

    async def _handle(self, scope: Scope, receive: Receive, send: Send, path: str) -> None:
        start = time.perf_counter()
        body = await read_body(receive)
        if body is None:
            self.stats.cancelled += 1
            return
        authorized = False
        sim_headers: dict[str, str] | None = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorized = value[:7].lower() == b"bearer " and bool(value[7:].strip())
            elif name.startswith(b"x-sim-"):
                if sim_headers is None:
                    sim_headers = {}
                sim_headers[name.decode("latin-1")] = value.decode("latin-1")
        if self.received.maxlen:
            self.received.append(
                ReceivedRequest(
                    scope["method"],
                    path,
                    scope.get("query_string", b"").decode("latin-1"),
                    [(n.decode("latin-1"), v.decode("latin-1")) for n, v in scope["headers"]],
                    body,
                )
            )
        ident = f"{self._id_prefix}{next(self._ids):012x}"

        api_path = path[10:] if path.startswith("/inference/") else path
        api = ROUTES.get(api_path)
        is_models = api_path == MODELS_PATH or api_path.startswith(MODELS_PATH + "/")
        if api is None and not is_models:
            await self._fail(send, UNKNOWN_PATH, ident)
            return
        if not authorized:
            await self._fail(send, MISSING_AUTH, ident)
            return
        try:
            overrides = parse_overrides(sim_headers) if sim_headers else NO_OVERRIDES
        except PlanError as exc:
            await self._fail(send, exc.fault, ident)
            return
        if overrides.injection is not None and (api is None or not overrides.injection.midstream):
            await self._fail(send, overrides.injection.fault, ident)
            return
        if api is None:
            await self._models(scope, send, api_path, ident)
            return
        if scope["method"] != "POST":
            await self._fail(send, METHOD_NOT_ALLOWED, ident, [(b"allow", b"POST")])
            return
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            await self._fail(send, invalid_request(f"Invalid JSON body: {exc}"), ident)
            return
        try:
            plan = plan_request(
                api, data, default_tokens=self.config.completion_tokens, cached_tokens=overrides.cached_tokens
            )
        except PlanError as exc:
            await self._fail(send, exc.fault, ident)
            return
        injection = overrides.injection or plan.injection
        if injection is not None and not (injection.midstream and plan.stream):
            await self._fail(send, injection.fault, ident)
            return
        ttft = self._ttft if overrides.ttft_ms is None else overrides.ttft_ms / 1000
        if plan.stream:
            delay = self._token_delay if overrides.token_delay_ms is None else overrides.token_delay_ms / 1000
            fault = injection.fault if injection is not None else None
            await self._stream(receive, send, plan, data, ident, start, ttft, delay, fault)
        else:
            await self._respond(receive, send, plan, data, ident, start, ttft)

    async def _fail(
        self, send: Send, fault: Fault, ident: str, extra: Iterable[tuple[bytes, bytes]] = ()
    ) -> None:
        self.stats.errors += 1
        limits = _RATE_LIMITED_HEADERS if fault.status == 429 else RATE_LIMIT_HEADERS
        await send_json(
            send, fault.status, fault.body(), [(b"x-request-id", ident.encode()), *limits, *extra]
        )

    async def _models(self, scope: Scope, send: Send, api_path: str, ident: str) -> None:
        if scope["method"] != "GET":
            await self._fail(send, METHOD_NOT_ALLOWED, ident, [(b"allow", b"GET")])
            return
        if api_path == MODELS_PATH:
            body = self._models_body
        else:
            body = orjson.dumps(self._model(api_path[len(MODELS_PATH) + 1 :]))
        self.stats.completed += 1
        await send_json(send, 200, body, [(b"x-request-id", ident.encode()), *RATE_LIMIT_HEADERS])

    async def _respond(
        self, receive: Receive, send: Send, plan: Plan, data: Any, ident: str, start: float, ttft: float
    ) -> None:
        stats = self.stats
        if ttft > 0:
            watch = DisconnectWatch(receive)
            try:
                alive = await watch.sleep(ttft)
            finally:
                watch.close()
            if not alive:
                stats.cancelled += 1
                return
        first = time.perf_counter() - start
        perf = (
            perf_metrics(plan, first, time.perf_counter() - start, stats.in_flight)
            if plan.perf_metrics
            else None
        )
        body = non_streamed_body(plan, data, ident, int(time.time()), perf)
        processing = time.perf_counter() - start
        headers = [
            (b"x-request-id", ident.encode()),
            *fireworks_headers(plan, first, processing, stats.in_flight),
            *RATE_LIMIT_HEADERS,
        ]
        stats.completed += 1
        stats.tokens_generated += plan.total_completion_tokens
        await send_json(send, 200, body, headers)

    async def _stream(
        self,
        receive: Receive,
        send: Send,
        plan: Plan,
        data: Any,
        ident: str,
        start: float,
        ttft: float,
        delay: float,
        fault: Fault | None,
    ) -> None:
        """``fault`` set: fail with it after :data:`MIDSTREAM_TOKENS` tokens."""
        stats = self.stats
        stats.streams_started += 1
        watch = DisconnectWatch(receive)
        try:
            if ttft > 0 and not await watch.sleep(ttft):
                stats.streams_cancelled += 1
                return
            first = time.perf_counter() - start
            headers = [
                SSE_TYPE,
                NO_CACHE,
                (b"x-request-id", ident.encode()),
                *fireworks_headers(plan, first, first, stats.in_flight),
                *RATE_LIMIT_HEADERS,
            ]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            created = int(time.time())
            tokens = (
                plan.completion_tokens if fault is None else min(MIDSTREAM_TOKENS, plan.completion_tokens)
            )

            if plan.api is Api.RESPONSES:
                events = ResponseEvents(plan, data, ident, created)
                opening: list[bytes] = events.opening()
                render: Callable[[bytes], Iterable[bytes]] = lambda token: (events.delta(token),)  # noqa: E731
            else:
                chunks = ChunkTemplates(plan, ident, created)
                opening = [chunks.role(i) for i in range(plan.n)] if plan.api is Api.CHAT else []
                if plan.n == 1:
                    render = lambda token: (chunks.token(0, token),)  # noqa: E731
                else:
                    choices = range(plan.n)
                    render = lambda token: [chunks.token(i, token) for i in choices]  # noqa: E731
            for event in opening:
                await send({"type": "http.response.body", "body": event, "more_body": True})

            try:
                alive = await self._generate(send, watch, tokens, delay, plan.n, render)
            except OSError:  # servers other than uvicorn may raise on writing to a closed connection
                alive = False
            if not alive:
                stats.streams_cancelled += 1
                return

            if fault is not None:
                tail = events.error(fault.payload()) if plan.api is Api.RESPONSES else sse(fault.payload())
                stats.errors += 1
                await send({"type": "http.response.body", "body": tail, "more_body": False})
                return

            now = time.perf_counter() - start
            perf = perf_metrics(plan, first, now, stats.in_flight) if plan.perf_metrics else None
            if plan.api is Api.RESPONSES:
                closing = events.closing(perf)
            else:
                closing = [chunks.finish(i, perf) for i in range(plan.n)]
                if plan.include_usage:
                    closing.append(chunks.usage())
                closing.append(DONE)
            last = len(closing) - 1
            stats.completed += 1
            for i, event in enumerate(closing):
                await send({"type": "http.response.body", "body": event, "more_body": i != last})
        finally:
            watch.close()

    async def _generate(
        self,
        send: Send,
        watch: DisconnectWatch,
        tokens: int,
        delay: float,
        width: int,
        render: Callable[[bytes], Iterable[bytes]],
    ) -> bool:
        """Send ``tokens`` steps of ``width`` chunks each, ``delay`` apart; False if the client left."""
        stats = self.stats
        for k in range(tokens):
            if k:
                if delay > 0:
                    if not await watch.sleep(delay):
                        return False
                elif not k % YIELD_EVERY:
                    await asyncio.sleep(0)
            if watch.disconnected:
                return False
            for chunk in render(token_bytes(k)):
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            stats.tokens_generated += width
        return not watch.disconnected

    async def _inspect(self, scope: Scope, receive: Receive, send: Send, path: str) -> None:
        await read_body(receive)
        method = scope["method"]
        if path == "/_sim/stats" and method == "GET":
            body = orjson.dumps(self.stats.snapshot())
        elif path == "/_sim/requests" and method == "GET":
            query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
            recent = list(self.received)
            limit = query.get("limit", [""])[0]
            if limit.isdigit():
                recent = recent[-int(limit) :] if int(limit) else []
            body = orjson.dumps([r.summary() for r in recent])
        elif path == "/_sim/reset" and method == "POST":
            self.reset()
            body = orjson.dumps(self.stats.snapshot())
        else:
            fault = (
                UNKNOWN_PATH
                if path not in ("/_sim/stats", "/_sim/requests", "/_sim/reset")
                else METHOD_NOT_ALLOWED
            )
            await send_json(send, fault.status, fault.body(), ())
            return
        await send_json(send, 200, body, ())


def create_simulator(config: SimulatorConfig | None = None) -> Simulator:
    return Simulator(config or SimulatorConfig())
