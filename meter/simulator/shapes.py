"""Response bodies, SSE events and headers, shaped as Fireworks' OpenAI-compatible API sends them.

Chat and completions streams (``data: {json}\\n\\n`` events, then ``data: [DONE]\\n\\n``):

1. chat only: one role chunk per choice, ``delta: {"role": "assistant"}``;
2. one chunk per generated token per choice, in token order (choices interleaved);
3. one finish chunk per choice, carrying ``finish_reason`` and, as Fireworks does, the request's
   cumulative ``usage`` (every choice's finish chunk repeats the same usage), plus ``perf_metrics``
   when asked for;
4. with ``stream_options.include_usage`` the finish chunks carry ``usage: null`` like every other
   chunk, and usage comes on one more chunk with ``choices: []`` (OpenAI's convention).

Responses-API streams are named events (``event: <type>\\ndata: {json}\\n\\n``), no ``[DONE]``:
``response.created``, ``response.in_progress``, ``response.output_item.added``,
``response.content_part.added``, one ``response.output_text.delta`` per token,
``response.output_text.done``, ``response.content_part.done``, ``response.output_item.done``,
``response.completed`` (the full response object with usage).

Rule: token chunks are made by splicing the token into bytes pre-serialised once per stream
(:class:`ChunkTemplates`), because they are the simulator's hottest path under load.

This module is pure: orjson and the standard library only.
"""

from __future__ import annotations

import base64
import math
import struct
from functools import lru_cache
from typing import Any

import orjson

from .plan import Api, Plan
from .tokens import completion_text

DONE = b"data: [DONE]\n\n"
DEPLOYMENT_REPLICA = "sim-0"
_MARK = "\x1fTOKEN\x1f"
_MARK_JSON = orjson.dumps(_MARK)[1:-1]  # as orjson escapes it inside a JSON string

# Static, Fireworks-style rate-limit headers (values per minute, as the serverless tier reports them).
RATE_LIMIT_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"x-ratelimit-limit-requests", b"6000"),
    (b"x-ratelimit-remaining-requests", b"5999"),
    (b"x-ratelimit-limit-tokens-prompt", b"3600000"),
    (b"x-ratelimit-remaining-tokens-prompt", b"3599000"),
    (b"x-ratelimit-limit-tokens-generated", b"36000"),
    (b"x-ratelimit-remaining-tokens-generated", b"35900"),
    (b"x-ratelimit-over-limit", b"no"),
)
JSON_TYPE = (b"content-type", b"application/json")
SSE_TYPE = (b"content-type", b"text/event-stream")
NO_CACHE = (b"cache-control", b"no-cache")
TOKENIZER_SECONDS = 0.0001


def seconds(value: float) -> bytes:
    return b"%.6f" % value


def fireworks_headers(
    plan: Plan, ttft: float, processing: float, concurrent: int
) -> list[tuple[bytes, bytes]]:
    """The ``fireworks-*`` headers. Only the prompt counts and time to first token are final on a
    stream: its headers leave before the rest is generated (as on the real service)."""
    return [
        (b"fireworks-prompt-tokens", b"%d" % plan.prompt_tokens),
        (b"fireworks-cached-prompt-tokens", b"%d" % plan.cached_tokens),
        (b"fireworks-server-time-to-first-token", seconds(ttft)),
        (b"fireworks-server-processing-time", seconds(processing)),
        (b"fireworks-prefill-duration", seconds(ttft / 2)),
        (b"fireworks-prefill-queue-duration", b"0.000000"),
        (b"fireworks-generation-queue-duration", b"0.000000"),
        (b"fireworks-tokenizer-duration", seconds(TOKENIZER_SECONDS)),
        (b"fireworks-tokenizer-queue-duration", b"0.000000"),
        (b"fireworks-num-concurrent-requests", b"%d" % concurrent),
        (b"fireworks-deployment-replica", DEPLOYMENT_REPLICA.encode()),
    ]


def perf_metrics(plan: Plan, ttft: float, processing: float, concurrent: int) -> dict[str, Any]:
    """The ``perf_metrics`` object: the headers' values under hyphenated keys without the
    ``fireworks-`` prefix; counts and durations as numbers, the replica as a string."""
    return {
        "prompt-tokens": plan.prompt_tokens,
        "cached-prompt-tokens": plan.cached_tokens,
        "completion-tokens": plan.total_completion_tokens,
        "server-time-to-first-token": round(ttft, 6),
        "server-processing-time": round(processing, 6),
        "prefill-duration": round(ttft / 2, 6),
        "prefill-queue-duration": 0.0,
        "generation-queue-duration": 0.0,
        "tokenizer-duration": TOKENIZER_SECONDS,
        "tokenizer-queue-duration": 0.0,
        "num-concurrent-requests": concurrent,
        "deployment-replica": DEPLOYMENT_REPLICA,
    }


def chat_usage(plan: Plan) -> dict[str, Any]:
    completion = plan.total_completion_tokens
    return {
        "prompt_tokens": plan.prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": plan.prompt_tokens + completion,
        "prompt_tokens_details": {"cached_tokens": plan.cached_tokens},
    }


def responses_usage(plan: Plan) -> dict[str, Any]:
    output = plan.total_completion_tokens
    return {
        "input_tokens": plan.prompt_tokens,
        "input_tokens_details": {"cached_tokens": plan.cached_tokens},
        "output_tokens": output,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": plan.prompt_tokens + output,
    }


# -- non-streamed bodies ---------------------------------------------------------------------------


def chat_body(plan: Plan, ident: str, created: int, perf: dict[str, Any] | None) -> bytes:
    text = completion_text(plan.completion_tokens)
    body: dict[str, Any] = {
        "id": "chatcmpl-" + ident,
        "object": "chat.completion",
        "created": created,
        "model": plan.model,
        "choices": [
            {
                "index": i,
                "message": {"role": "assistant", "content": text},
                "finish_reason": plan.finish_reason,
                "logprobs": None,
            }
            for i in range(plan.n)
        ],
        "usage": chat_usage(plan),
    }
    if perf is not None:
        body["perf_metrics"] = perf
    return orjson.dumps(body)


def completions_body(plan: Plan, ident: str, created: int, perf: dict[str, Any] | None) -> bytes:
    text = completion_text(plan.completion_tokens)
    body: dict[str, Any] = {
        "id": "cmpl-" + ident,
        "object": "text_completion",
        "created": created,
        "model": plan.model,
        "choices": [
            {"index": i, "text": text, "logprobs": None, "finish_reason": plan.finish_reason}
            for i in range(plan.n)
        ],
        "usage": chat_usage(plan),
    }
    if perf is not None:
        body["perf_metrics"] = perf
    return orjson.dumps(body)


@lru_cache(maxsize=64)
def embedding_vector(dimensions: int) -> tuple[list[float], str]:
    """One deterministic unit vector per dimension count, as floats and as base64 little-endian
    float32 (the OpenAI SDK asks for base64 unless told otherwise). Every input gets the same one."""
    raw = [math.sin(j + 1.0) for j in range(dimensions)]
    norm = math.sqrt(sum(x * x for x in raw))
    floats = [struct.unpack("<f", struct.pack("<f", x / norm))[0] for x in raw]  # float32-exact
    return floats, base64.b64encode(struct.pack(f"<{dimensions}f", *floats)).decode()


def embeddings_body(plan: Plan, perf: dict[str, Any] | None) -> bytes:
    floats, encoded = embedding_vector(plan.dimensions)
    vector: Any = encoded if plan.base64 else floats
    body: dict[str, Any] = {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": vector} for i in range(plan.embedding_inputs)
        ],
        "model": plan.model,
        "usage": {"prompt_tokens": plan.prompt_tokens, "total_tokens": plan.prompt_tokens},
    }
    if perf is not None:
        body["perf_metrics"] = perf
    return orjson.dumps(body)


def _message_item(ident: str, text: str, status: str) -> dict[str, Any]:
    content = (
        [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]
        if status == "completed"
        else []
    )
    return {
        "id": "msg_" + ident,
        "type": "message",
        "status": status,
        "role": "assistant",
        "content": content,
    }


def response_object(
    plan: Plan,
    request: dict[str, Any],
    ident: str,
    created: int,
    *,
    done: bool,
    perf: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The Responses-API ``response`` object: in progress (no output, no usage) or completed."""
    obj: dict[str, Any] = {
        "id": "resp_" + ident,
        "object": "response",
        "created_at": created,
        "status": "completed" if done else "in_progress",
        "error": None,
        "incomplete_details": None,
        "instructions": request.get("instructions"),
        "max_output_tokens": request.get("max_output_tokens"),
        "model": plan.model,
        "output": [_message_item(ident, completion_text(plan.completion_tokens), "completed")]
        if done
        else [],
        "parallel_tool_calls": True,
        "previous_response_id": request.get("previous_response_id"),
        "reasoning": {"effort": None, "summary": None},
        "store": request.get("store", True),
        "temperature": request.get("temperature", 1.0),
        "text": {"format": {"type": "text"}},
        "tool_choice": "auto",
        "tools": [],
        "top_p": request.get("top_p", 1.0),
        "truncation": "disabled",
        "usage": responses_usage(plan) if done else None,
        "user": request.get("user"),
        "metadata": request.get("metadata") or {},
    }
    if perf is not None:
        obj["perf_metrics"] = perf
    return obj


def non_streamed_body(
    plan: Plan, request: dict[str, Any], ident: str, created: int, perf: dict[str, Any] | None
) -> bytes:
    if plan.api is Api.CHAT:
        return chat_body(plan, ident, created, perf)
    if plan.api is Api.COMPLETIONS:
        return completions_body(plan, ident, created, perf)
    if plan.api is Api.EMBEDDINGS:
        return embeddings_body(plan, perf)
    return orjson.dumps(response_object(plan, request, ident, created, done=True, perf=perf))


# -- streams ---------------------------------------------------------------------------------------


def sse(payload: Any) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


class ChunkTemplates:
    """The SSE events of one chat or completions stream. Token chunks are ``head[i] + token + tail``,
    serialised once per stream (see the module rule)."""

    __slots__ = ("_base", "_chat", "_heads", "_tail", "plan")

    def __init__(self, plan: Plan, ident: str, created: int) -> None:
        self.plan = plan
        self._chat = plan.api is Api.CHAT
        self._base: dict[str, Any] = {
            "id": ("chatcmpl-" if self._chat else "cmpl-") + ident,
            "object": "chat.completion.chunk" if self._chat else "text_completion",
            "created": created,
            "model": plan.model,
        }
        heads: list[bytes] = []
        tail = b""
        for i in range(plan.n):
            template = sse(self._chunk(i, _MARK, None))
            head, _, tail = template.rpartition(_MARK_JSON)
            heads.append(head)
        self._heads = heads
        self._tail = tail

    def _chunk(self, index: int, text: str | None, finish_reason: str | None) -> dict[str, Any]:
        if self._chat:
            delta = {} if text is None else {"content": text}
            choice: dict[str, Any] = {
                "index": index,
                "delta": delta,
                "finish_reason": finish_reason,
                "logprobs": None,
            }
        else:
            choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        chunk = {**self._base, "choices": [choice]}
        if self.plan.include_usage:
            chunk["usage"] = None
        return chunk

    def role(self, index: int) -> bytes:
        """Chat only: the first chunk of a choice."""
        chunk = self._chunk(index, None, None)
        chunk["choices"][0]["delta"] = {"role": "assistant"}
        return sse(chunk)

    def token(self, index: int, token: bytes) -> bytes:
        return self._heads[index] + token + self._tail

    def finish(self, index: int, perf: dict[str, Any] | None) -> bytes:
        chunk = self._chunk(index, None, self.plan.finish_reason)
        if not self.plan.include_usage:
            chunk["usage"] = chat_usage(self.plan)
        if perf is not None:
            chunk["perf_metrics"] = perf
        return sse(chunk)

    def usage(self) -> bytes:
        """The separate ``choices: []`` chunk of ``stream_options.include_usage``."""
        return sse({**self._base, "choices": [], "usage": chat_usage(self.plan)})


class ResponseEvents:
    """The named SSE events of one Responses-API stream, numbering ``sequence_number`` as it goes."""

    __slots__ = ("_created", "_ident", "_item_id", "_request", "_seq", "plan")

    def __init__(self, plan: Plan, request: dict[str, Any], ident: str, created: int) -> None:
        self.plan = plan
        self._request = request
        self._ident = ident
        self._created = created
        self._item_id = "msg_" + ident
        self._seq = 0

    def _event(self, kind: str, fields: dict[str, Any]) -> bytes:
        payload = {"type": kind, "sequence_number": self._seq, **fields}
        self._seq += 1
        return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"

    def opening(self) -> list[bytes]:
        """Everything before the first delta."""
        pending = response_object(self.plan, self._request, self._ident, self._created, done=False)
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        where = {"item_id": self._item_id, "output_index": 0, "content_index": 0}
        return [
            self._event("response.created", {"response": pending}),
            self._event("response.in_progress", {"response": pending}),
            self._event(
                "response.output_item.added",
                {"output_index": 0, "item": _message_item(self._ident, "", "in_progress")},
            ),
            self._event("response.content_part.added", {**where, "part": part}),
        ]

    def delta(self, token: bytes) -> bytes:
        return self._event(
            "response.output_text.delta",
            {
                "item_id": self._item_id,
                "output_index": 0,
                "content_index": 0,
                "delta": token.decode(),
                "logprobs": [],
            },
        )

    def closing(self, perf: dict[str, Any] | None) -> list[bytes]:
        text = completion_text(self.plan.completion_tokens)
        where = {"item_id": self._item_id, "output_index": 0, "content_index": 0}
        part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
        final = response_object(self.plan, self._request, self._ident, self._created, done=True, perf=perf)
        return [
            self._event("response.output_text.done", {**where, "text": text, "logprobs": []}),
            self._event("response.content_part.done", {**where, "part": part}),
            self._event("response.output_item.done", {"output_index": 0, "item": final["output"][0]}),
            self._event("response.completed", {"response": final}),
        ]

    def error(self, payload: dict[str, Any]) -> bytes:
        """Fireworks' mid-stream error body, framed as a Responses ``error`` event."""
        return self._event("error", payload)
