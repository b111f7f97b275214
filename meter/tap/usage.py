"""Usage extraction: what OpenAI-compatible endpoints say about tokens, ids, models and errors.

Pure functions and one accumulator, fed already-parsed JSON values (dicts from ``orjson.loads``);
nothing here does I/O or knows about the transport. Fireworks' own metrics are read by
meter.tap.fireworks_headers and generated text is measured by meter.tap.estimate. meter.tap.templates
mirrors :meth:`ResponseFacts.add_chunk` / :meth:`ResponseFacts.add_event` for the observer's fast
path and must change with them.

Rule 1: "not reported" is not zero. A field the upstream did not send, or sent as garbage (a string, a
        float, a bool, a negative number), is ``None``.
Rule 2: streamed usage is cumulative. With ``n > 1`` every choice's final chunk may repeat the same
        usage object, so the latest one wins; usage objects are never summed.
Rule 3: both usage namings are read anywhere: chat/completions' ``prompt_tokens``/``completion_tokens``
        and the Responses API's ``input_tokens``/``output_tokens`` (Fireworks mixes them).
Rule 4: Fireworks counts cached tokens inside ``prompt_tokens``; they are kept as reported.
Rule 5: every reader tolerates any JSON shape: unexpected types are skipped, never raised.
Rule 6: what an upstream says is bounded before it is kept (its bytes are relayed unchanged): a token
        count is a plain integer in [0, 2**53), else not reported (a float, a bool, -1 or 10**30 would
        otherwise reach billing, or make the database refuse the record); ids, models, finish reasons
        and error messages are cut to :mod:`meter.bounds`; at most ``MAX_CHOICES`` choices of a body or
        chunk are read, and finish reasons are kept for at most that many choice indexes; at most
        ``MAX_PERF_OBJECTS`` perf_metrics objects are read per response.

Endpoints are recognised by path suffix, so ``/v1/chat/completions``, ``/chat/completions`` and
``/inference/v1/chat/completions`` are the same endpoint.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any

import orjson

from meter import bounds
from meter.bounds import cut
from meter.records import Usage, first_known
from meter.tap.estimate import message_chars, output_chars, text_len
from meter.tap.fireworks_headers import NO_METRICS, FireworksMetrics, perf_metrics

__all__ = [
    "MAX_CHOICES",
    "Endpoint",
    "ResponseFacts",
    "endpoint_of",
    "error_message",
    "tail_members",
    "usage_from_json",
]

MAX_CHOICES = 128  # choices read per body or chunk (OpenAI's largest ``n``), finish reasons kept
MAX_PERF_OBJECTS = 16  # perf_metrics objects read per response (Fireworks sends one; n > 1: one a choice)
MAX_COUNT = 2**53  # a token count at or above this is not a count (JSON's exact integers end there)
_ID, _MODEL, _REASON = bounds.REQUEST_ID, bounds.MODEL, bounds.FINISH_REASONS


class Endpoint(enum.Enum):
    CHAT_COMPLETIONS = "chat/completions"
    COMPLETIONS = "completions"
    EMBEDDINGS = "embeddings"
    RESPONSES = "responses"
    OTHER = "other"


_SUFFIXES = (
    ("/chat/completions", Endpoint.CHAT_COMPLETIONS),  # before "/completions", which it ends with
    ("/completions", Endpoint.COMPLETIONS),
    ("/embeddings", Endpoint.EMBEDDINGS),
    ("/responses", Endpoint.RESPONSES),
)


def endpoint_of(path: str) -> Endpoint:
    """The endpoint a request path names, matched on its suffix (query string and trailing "/" ignored)."""
    path = "/" + path.partition("?")[0].strip("/")
    for suffix, endpoint in _SUFFIXES:
        if path.endswith(suffix):
            return endpoint
    return Endpoint.OTHER


def _count(value: object) -> int | None:
    """A token count: a JSON integer in [0, 2**53), else None (``bool`` is an ``int`` subclass: excluded)."""
    return value if type(value) is int and 0 <= value < MAX_COUNT else None


def _detail(obj: Mapping[str, Any], *names: str) -> int | None:
    details = obj.get(names[0])
    if isinstance(details, dict):
        value = _count(details.get(names[1]))
        if value is not None:
            return value
    if len(names) > 2:
        return _detail(obj, *names[2:])
    return None


def _first_count(obj: Mapping[str, Any], a: str, b: str) -> int | None:
    return first_known(_count(obj.get(a)), _count(obj.get(b)))


def usage_from_json(obj: object) -> Usage | None:
    """Read a ``usage`` object in either naming; None if it is not an object or holds no known count.

    Values are as reported: a missing ``total_tokens`` stays None here (the observer completes it).
    """
    if not isinstance(obj, dict):
        return None
    usage = Usage(
        prompt_tokens=_first_count(obj, "prompt_tokens", "input_tokens"),
        completion_tokens=_first_count(obj, "completion_tokens", "output_tokens"),
        cached_tokens=_detail(
            obj, "prompt_tokens_details", "cached_tokens", "input_tokens_details", "cached_tokens"
        ),
        reasoning_tokens=_detail(
            obj, "completion_tokens_details", "reasoning_tokens", "output_tokens_details", "reasoning_tokens"
        ),
        total_tokens=_count(obj.get("total_tokens")),
    )
    if usage.is_empty and usage.cached_tokens is None and usage.reasoning_tokens is None:
        return None
    return usage


# --- errors ---------------------------------------------------------------------------------------


def error_message(obj: Mapping[str, Any], *, error_body: bool = False) -> str | None:
    """The message of an ``{"error": ...}`` object (OpenAI, Fireworks, a Responses ``error`` event),
    cut to ``meter.bounds.ERROR`` characters.

    With ``error_body`` (a non-2xx answer) the looser shapes ``{"detail": ...}`` and ``{"message": ...}``
    count too; in a successful body they could be ordinary fields.
    """
    message = _error_message(obj, error_body)
    return cut(message, bounds.ERROR) if message is not None else None


def _error_message(obj: Mapping[str, Any], error_body: bool) -> str | None:
    err = obj.get("error")
    if isinstance(err, dict):
        for key in ("message", "type", "code"):
            value = err.get(key)
            if isinstance(value, str) and value:
                return value
        return "error"
    if isinstance(err, str) and err:
        return err
    if obj.get("type") == "error" or error_body:
        for key in ("message", "detail"):
            value = obj.get(key)
            if isinstance(value, str) and value:
                return value
        detail = obj.get("detail")
        if error_body and detail is not None:
            # any JSON value; a large one is bounded by the body's own limits (meter.tap.observer)
            return str(detail)
    return None


# --- bodies too large to parse whole ----------------------------------------------------------------

_TAIL_KEYS = (b'"model"', b'"usage"')
_TAIL_TRIES = 2  # occurrences of each key tried, from the last


def tail_members(tail: bytes) -> dict[str, Any] | None:
    """The top-level members of a JSON object from its last ``"model"`` or ``"usage"`` member to its
    end, read from the object's last bytes ``tail`` alone: what a body too large to parse whole still
    says about usage (OpenAI and Fireworks put ``usage`` last; embeddings put ``model`` just before it).

    A candidate key is taken only if ``{`` + the text from it to the end parses as one JSON object:
    then the text closes exactly the object that held the key and nothing after it, which in a JSON
    document is the top-level one (an unescaped ``"usage"`` followed by ``:`` cannot lie inside a
    string). The earliest such key wins. At most four parses of ``tail``; None if none succeeds."""
    starts: list[int] = []
    for key in _TAIL_KEYS:
        at = len(tail)
        for _ in range(_TAIL_TRIES):
            at = tail.rfind(key, 0, at)
            if at < 0:
                break
            if tail[at + len(key) : at + len(key) + 64].lstrip()[:1] == b":":
                starts.append(at)
    for at in sorted(starts):
        try:
            obj = orjson.loads(b"{" + tail[at:])
        except orjson.JSONDecodeError:
            continue
        if type(obj) is dict:
            return obj
    return None


# --- per-response accumulation ----------------------------------------------------------------------


_TERMINAL_STATUSES = frozenset({"completed", "incomplete", "failed", "cancelled"})


class ResponseFacts:
    """Accumulates what one response says, from a JSON body or from stream chunks/events in order.

    Mutable on purpose (it is fed once per streamed chunk on the hot path); the observer turns it into
    an immutable ``Observation``. ``finish_reasons`` maps choice index to its last reported reason.
    """

    __slots__ = (
        "content_chars",
        "error_message",
        "finish_reasons",
        "metrics",
        "perf_objects",
        "response_id",
        "response_model",
        "stream_error",
        "usage",
    )

    def __init__(self) -> None:
        self.response_id: str | None = None
        self.response_model: str | None = None
        self.usage: Usage | None = None
        self.finish_reasons: dict[int, str] = {}
        self.error_message: str | None = None
        self.stream_error = False
        self.content_chars = 0
        self.metrics: FireworksMetrics | None = None  # from perf_metrics objects, if any came
        self.perf_objects = 0  # perf_metrics objects read (at most MAX_PERF_OBJECTS)

    def ordered_finish_reasons(self) -> tuple[str, ...]:
        return tuple(reason for _, reason in sorted(self.finish_reasons.items()))

    # Non-streamed bodies.

    def add_body(self, endpoint: Endpoint, obj: object, *, error_body: bool = False) -> None:
        """A whole JSON response body."""
        if not isinstance(obj, dict):
            return
        self._ids(obj)
        self._usage(obj.get("usage"))
        self._perf(obj.get("perf_metrics"))
        message = error_message(obj, error_body=error_body)
        if message is not None:
            self.error_message = message
        if endpoint is Endpoint.RESPONSES or (endpoint is Endpoint.OTHER and obj.get("object") == "response"):
            self._response(obj, streamed=False)
            return
        choices = obj.get("choices")
        if type(choices) is not list:
            return
        if len(choices) > MAX_CHOICES:
            choices = choices[:MAX_CHOICES]
        for choice in choices:
            if type(choice) is not dict:
                continue
            msg = choice.get("message")
            if type(msg) is dict:
                self.content_chars += message_chars(msg)
            else:
                self.content_chars += text_len(choice.get("text"))
            self._finish(choice)

    # Streams.

    def add_chunk(self, obj: object) -> int:
        """One ``data:`` payload of a chat/completions stream; returns the content chars it carried."""
        if type(obj) is not dict:
            return 0
        n = 0
        choices = obj.get("choices")
        if type(choices) is list:
            if len(choices) > MAX_CHOICES:
                choices = choices[:MAX_CHOICES]
            for choice in choices:
                if type(choice) is not dict:
                    continue
                delta = choice.get("delta")
                if type(delta) is dict:
                    n += message_chars(delta)
                else:
                    n += text_len(choice.get("text"))
                if choice.get("finish_reason") is not None:
                    self._finish(choice)
        if self.response_id is None or self.response_model is None:
            self._ids(obj)
        usage = obj.get("usage")
        if usage is not None:
            self._usage(usage)
        if "error" in obj:
            message = error_message(obj)
            if message is not None:
                self.error_message = message
                self.stream_error = True
        metrics = obj.get("perf_metrics")
        if metrics is not None:
            self._perf(metrics)
        self.content_chars += n
        return n

    def add_event(self, name: str | None, obj: object) -> int:
        """One event of a Responses API stream (the SSE ``event:`` name, or the data's ``type``);
        returns the content chars it carried. Only ``*.delta`` events count as content, since the
        matching ``*.done`` events repeat the whole text."""
        if type(obj) is not dict:
            return 0
        kind = obj.get("type")
        if type(kind) is not str:
            kind = name or ""
        if kind.endswith(".delta"):
            if kind == "response.audio.delta":  # base64 audio, not text
                return 0
            n = text_len(obj.get("delta"))
            self.content_chars += n
            return n
        response = obj.get("response")
        if type(response) is dict:
            self._response(response, streamed=True)
        elif kind == "error" or "error" in obj:
            message = error_message(obj)
            if message is None and kind == "error":
                message = "error"  # an error event of an odd shape is still one
            if message is not None:
                self.error_message = message
                self.stream_error = True
        return 0

    # Shared pieces.

    def _ids(self, obj: Mapping[str, Any]) -> None:
        if self.response_id is None:
            value = obj.get("id")
            if type(value) is str and value:
                self.response_id = value if len(value) <= _ID else cut(value, _ID)
        if self.response_model is None:
            value = obj.get("model")
            if type(value) is str and value:
                self.response_model = value if len(value) <= _MODEL else cut(value, _MODEL)

    def _usage(self, obj: object) -> None:
        usage = usage_from_json(obj)
        if usage is not None:
            self.usage = usage

    def _perf(self, obj: object) -> None:
        if self.perf_objects >= MAX_PERF_OBJECTS:
            return  # Rule 6: an upstream sending one in every chunk costs no more than this
        self.perf_objects += 1
        metrics = perf_metrics(obj)
        if metrics is not NO_METRICS:
            self.metrics = metrics if self.metrics is None else metrics.over(self.metrics)

    def _finish(self, choice: Mapping[str, Any]) -> None:
        reason = choice.get("finish_reason")
        if type(reason) is not str or not reason:
            return
        index = choice.get("index", 0)
        if type(index) is not int:
            index = 0
        reasons = self.finish_reasons
        if len(reasons) >= MAX_CHOICES and index not in reasons:
            return
        reasons[index] = reason if len(reason) <= _REASON else cut(reason, _REASON)

    def _response(self, obj: Mapping[str, Any], *, streamed: bool) -> None:
        """A Responses API ``response`` object: a body, or the one in response.created/completed/..."""
        self._ids(obj)
        self._usage(obj.get("usage"))
        self._perf(obj.get("perf_metrics"))
        status = obj.get("status")
        if type(status) is str and status in _TERMINAL_STATUSES:
            # An incomplete response's reason ("max_output_tokens") says what "length" says in chat.
            details = obj.get("incomplete_details")
            reason = details.get("reason") if type(details) is dict else None
            self.finish_reasons[0] = cut(reason, _REASON) if type(reason) is str and reason else status
        err = obj.get("error")
        if err is not None:
            message = error_message(obj)
            if message is not None:
                self.error_message = message
                self.stream_error = self.stream_error or streamed
        if not streamed:
            self.content_chars += output_chars(obj.get("output"))
