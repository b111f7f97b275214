"""Usage extraction: what OpenAI-compatible endpoints say about tokens, ids, models and errors.

Pure functions and one accumulator, fed already-parsed JSON values (dicts from ``orjson.loads``) and
header mappings; nothing here does I/O or knows about the transport. :func:`chunk_template` and
:func:`delta_template` describe a stream event by its JSON text, for the observer's fast path; they
mirror :meth:`ResponseFacts.add_chunk` / :meth:`ResponseFacts.add_event` and must change with them.

Rule 1: "not reported" is not zero. A field the upstream did not send, or sent as garbage (a string, a
        float, a bool, a negative number), is ``None``.
Rule 2: streamed usage is cumulative. With ``n > 1`` every choice's final chunk may repeat the same
        usage object, so the latest one wins; usage objects are never summed.
Rule 3: both usage namings are read anywhere: chat/completions' ``prompt_tokens``/``completion_tokens``
        and the Responses API's ``input_tokens``/``output_tokens`` (Fireworks mixes them).
Rule 4: Fireworks counts cached tokens inside ``prompt_tokens``; they are kept as reported.
Rule 5: every reader tolerates any JSON shape: unexpected types are skipped, never raised.

Endpoints are recognised by path suffix, so ``/v1/chat/completions``, ``/chat/completions`` and
``/inference/v1/chat/completions`` are the same endpoint.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from math import isfinite
from typing import Any, NamedTuple, TypeVar

import orjson

from meter.records import Usage

__all__ = [
    "ChunkTemplate",
    "Endpoint",
    "FireworksHeaders",
    "FireworksMetrics",
    "ResponseFacts",
    "chars_to_tokens",
    "chunk_template",
    "delta_template",
    "endpoint_of",
    "error_message",
    "estimate_prompt_tokens",
    "fireworks_metrics",
    "first_known",
    "perf_metrics",
    "usage_from_json",
]


_T = TypeVar("_T")


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


# --- numbers ------------------------------------------------------------------------------------


def _count(value: object) -> int | None:
    """A token count: a non-negative JSON integer, else None (``bool`` is an ``int`` subclass: excluded)."""
    return value if type(value) is int and value >= 0 else None


def _number(value: object) -> float | None:
    """A finite number given as a JSON number or a decimal string (headers, perf_metrics)."""
    if type(value) is str:
        try:
            value = float(value)
        except ValueError:
            return None
    elif type(value) is int:
        value = float(value)
    if type(value) is float and math.isfinite(value):
        return value
    return None


def _whole(value: float | None) -> int | None:
    """A count given as a decimal (a header "123", a perf_metrics 123.0); None unless whole and >= 0."""
    if value is None or value < 0 or not value.is_integer():
        return None
    return int(value)


def first_known(value: _T | None, fallback: _T | None) -> _T | None:
    """``value`` unless it is None (unlike ``or``, a reported 0 is kept)."""
    return value if value is not None else fallback


def chars_to_tokens(chars: int) -> int:
    """ceil(chars / 4): the usual rule of thumb for English text with BPE tokenizers."""
    return -(-chars // 4)


# --- usage ----------------------------------------------------------------------------------------


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


# --- Fireworks headers and perf_metrics -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FireworksMetrics:
    """What Fireworks says about a request besides the body's usage, from ``fireworks-*`` headers or a
    ``perf_metrics`` object (same hyphenated names, without the ``fireworks-`` prefix). Times are
    seconds; ``other`` holds every other numeric metric under its prefix-less name."""

    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    server_ttft_s: float | None = None
    server_processing_s: float | None = None
    other: dict[str, float] = field(default_factory=dict)

    def over(self, fallback: FireworksMetrics) -> FireworksMetrics:
        """These metrics, with ``fallback`` filling what they lack (perf_metrics over headers)."""
        return FireworksMetrics(
            prompt_tokens=first_known(self.prompt_tokens, fallback.prompt_tokens),
            cached_tokens=first_known(self.cached_tokens, fallback.cached_tokens),
            server_ttft_s=first_known(self.server_ttft_s, fallback.server_ttft_s),
            server_processing_s=first_known(self.server_processing_s, fallback.server_processing_s),
            other={**fallback.other, **self.other},
        )


FireworksHeaders = FireworksMetrics  # the header view is the same record

_NO_METRICS = FireworksMetrics()
_PREFIX = "fireworks-"


# The metrics FireworksMetrics names, by their position in _metrics' list; any other goes to ``other``.
_NAMED = {
    "prompt-tokens": 0,
    "cached-prompt-tokens": 1,
    "server-time-to-first-token": 2,
    "server-processing-time": 3,
}
# ASCII characters no string float() accepts can start with (it takes whitespace, a sign, a digit, a
# point, "inf"/"infinity"/"nan"): such a value is skipped without the cost of float() raising.
_NOT_A_NUMBER_START = frozenset(chr(c) for c in range(128)) - frozenset(
    "0123456789+-.iInN" + "".join(chr(c) for c in range(128) if chr(c).isspace())
)


def _metrics(items: Iterable[tuple[str, object]], prefixed: bool = False) -> FireworksMetrics:
    """``items``: (name, value) pairs; ``prefixed``: only names starting ``fireworks-`` count, and
    without it. Runs for every response (the headers), so the common case is inlined."""
    named: list[float | None] | None = None
    other: dict[str, float] = {}
    cut = len(_PREFIX)
    for name, raw in items:
        if prefixed:
            if not name.startswith(_PREFIX):
                continue
            name = name[cut:]
        if type(raw) is str:
            if raw[:1] in _NOT_A_NUMBER_START:
                continue
            try:
                value: float | None = float(raw)
            except ValueError:
                continue
        else:
            value = _number(raw)
        if value is None or not isfinite(value):
            continue
        slot = _NAMED.get(name)
        if slot is None:
            other[name] = value
        elif named is None:
            named = [None, None, None, None]
            named[slot] = value
        else:
            named[slot] = value
    if named is None:
        return FireworksMetrics(other=other) if other else _NO_METRICS
    prompt, cached = _whole(named[0]), _whole(named[1])
    ttft, processing = named[2], named[3]
    if prompt is None and cached is None and ttft is None and processing is None and not other:
        return _NO_METRICS
    return FireworksMetrics(prompt, cached, ttft, processing, other)


def fireworks_metrics(headers: Mapping[str, str]) -> FireworksMetrics:
    """Numeric ``fireworks-*`` headers (names already lower-cased); non-numeric values are ignored."""
    return _metrics(headers.items(), prefixed=True)


def perf_metrics(obj: object) -> FireworksMetrics:
    """A ``perf_metrics`` object (sent when the client asked ``perf_metrics_in_response: true``)."""
    if not isinstance(obj, dict):
        return _NO_METRICS
    return _metrics((str(name).removeprefix(_PREFIX), value) for name, value in obj.items())


# --- errors ---------------------------------------------------------------------------------------


_MAX_ERROR_CHARS = 500  # a record's ``error`` is a short reason, not the upstream's whole body


def error_message(obj: Mapping[str, Any], *, error_body: bool = False) -> str | None:
    """The message of an ``{"error": ...}`` object (OpenAI, Fireworks, a Responses ``error`` event),
    cut to 500 characters.

    With ``error_body`` (a non-2xx answer) the looser shapes ``{"detail": ...}`` and ``{"message": ...}``
    count too; in a successful body they could be ordinary fields.
    """
    message = _error_message(obj, error_body)
    return message[:_MAX_ERROR_CHARS] if message is not None else None


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
        if error_body and obj.get("detail") is not None:
            return str(obj.get("detail"))
    return None


# --- per-response accumulation ----------------------------------------------------------------------


def _text_len(value: object) -> int:
    return len(value) if type(value) is str else 0


def _message_chars(msg: Mapping[str, Any]) -> int:
    """Generated text of a chat ``message`` or streamed ``delta``: content, reasoning, tool arguments."""
    n = 0
    content = msg.get("content")
    if type(content) is str:
        n += len(content)
    elif type(content) is list:
        n += _parts_chars(content)
    n += _text_len(msg.get("reasoning_content"))
    calls = msg.get("tool_calls")
    if type(calls) is list:
        for call in calls:
            if type(call) is dict:
                fn = call.get("function")
                if type(fn) is dict:
                    n += _text_len(fn.get("arguments"))
    fn = msg.get("function_call")  # the pre-tools API
    if type(fn) is dict:
        n += _text_len(fn.get("arguments"))
    return n


def _parts_chars(parts: list[Any]) -> int:
    n = 0
    for part in parts:
        if type(part) is str:
            n += len(part)
        elif type(part) is dict:
            n += _text_len(part.get("text"))
    return n


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
        for choice in choices:
            if type(choice) is not dict:
                continue
            msg = choice.get("message")
            if type(msg) is dict:
                self.content_chars += _message_chars(msg)
            else:
                self.content_chars += _text_len(choice.get("text"))
            self._finish(choice)

    # Streams.

    def add_chunk(self, obj: object) -> int:
        """One ``data:`` payload of a chat/completions stream; returns the content chars it carried."""
        if type(obj) is not dict:
            return 0
        n = 0
        choices = obj.get("choices")
        if type(choices) is list:
            for choice in choices:
                if type(choice) is not dict:
                    continue
                delta = choice.get("delta")
                if type(delta) is dict:
                    n += _message_chars(delta)
                else:
                    n += _text_len(choice.get("text"))
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
            n = _text_len(obj.get("delta"))
            self.content_chars += n
            return n
        response = obj.get("response")
        if type(response) is dict:
            self._response(response, streamed=True)
        elif kind == "error" or "error" in obj:
            message = error_message(obj)
            if message is not None:
                self.error_message = message
                self.stream_error = True
        return 0

    # Shared pieces.

    def _ids(self, obj: Mapping[str, Any]) -> None:
        if self.response_id is None:
            value = obj.get("id")
            if type(value) is str and value:
                self.response_id = value
        if self.response_model is None:
            value = obj.get("model")
            if type(value) is str and value:
                self.response_model = value

    def _usage(self, obj: object) -> None:
        usage = usage_from_json(obj)
        if usage is not None:
            self.usage = usage

    def _perf(self, obj: object) -> None:
        metrics = perf_metrics(obj)
        if metrics is not _NO_METRICS:
            self.metrics = metrics if self.metrics is None else metrics.over(self.metrics)

    def _finish(self, choice: Mapping[str, Any]) -> None:
        reason = choice.get("finish_reason")
        if type(reason) is not str or not reason:
            return
        index = choice.get("index", 0)
        self.finish_reasons[index if type(index) is int else 0] = reason

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
            self.finish_reasons[0] = reason if type(reason) is str and reason else status
        err = obj.get("error")
        if err is not None:
            message = error_message(obj)
            if message is not None:
                self.error_message = message
                self.stream_error = self.stream_error or streamed
        if not streamed:
            self.content_chars += _output_chars(obj.get("output"))


def _output_chars(output: object) -> int:
    """Generated text in a Responses ``output`` list: message text, reasoning, function arguments."""
    if type(output) is not list:
        return 0
    n = 0
    for item in output:
        if type(item) is not dict:
            continue
        n += _text_len(item.get("arguments"))
        for key in ("content", "summary"):
            parts = item.get(key)
            if type(parts) is list:
                n += _parts_chars(parts)
    return n


# --- chunk templates: a stream's repeated chunk, read without decoding ------------------------------


class ChunkTemplate(NamedTuple):  # a NamedTuple: made once a stream, on the hot path, and cheap
    """A stream event that carried nothing but generated text, as its JSON text around that text's
    string literal (and around a sequence number, if it has one): ``head + <string> + tail``, or
    ``head + <integer> + middle + <string> + tail``.

    Any JSON text of that form, for any string literal and integer, has the template event's
    structure with only those two values changed: each is one lexical token, so the text around it
    parses as before. :class:`ResponseFacts` would therefore do exactly one thing with such an event:
    count ``base + len(string)`` content characters. A token stream is such events nearly all the way
    (same id, model and created time, one token of text each), which lets the observer count them
    without decoding them (meter.observe). ``base``: characters the event's fixed text fields carry
    (usually 0)."""

    head: bytes
    middle: bytes | None  # None: no integer hole
    tail: bytes
    base: int


# Hole values for the check that a template's split is right: unlike any real value, with escapes.
_PROBE_TEXT = '\u2603 probe \\" \u00e9'
_PROBE_LITERAL = orjson.dumps(_PROBE_TEXT).decode()
_PROBE_NUMBER = 987_654_321
_PROBE_DIGITS = str(_PROBE_NUMBER)


def chunk_template(data: str, obj: object) -> ChunkTemplate | None:
    """The template of a chat/completions ``data:`` payload ``data`` that decoded to ``obj``, or None
    unless :meth:`ResponseFacts.add_chunk` would only count its content: one choice, no usage,
    error, perf_metrics or finish_reason, text in ``delta.content`` or ``delta.reasoning_content``
    (chat) or ``text`` (completions)."""
    if type(obj) is not dict or obj.get("usage") is not None or obj.get("perf_metrics") is not None:
        return None
    choices = obj.get("choices")
    if "error" in obj or type(choices) is not list or len(choices) != 1:
        return None
    choice = choices[0]
    if type(choice) is not dict or choice.get("finish_reason") is not None:
        return None
    delta = choice.get("delta")
    if type(delta) is dict:
        key = "content" if type(delta.get("content")) is str else "reasoning_content"
        return _template(data, obj, lambda o: o["choices"][0]["delta"], key, _message_chars(delta))
    return _template(data, obj, lambda o: o["choices"][0], "text", _text_len(choice.get("text")))


def delta_template(data: str, obj: object) -> ChunkTemplate | None:
    """The template of a Responses API ``*.delta`` event's payload (its ``sequence_number`` a hole
    too), or None unless :meth:`ResponseFacts.add_event` would only count its ``delta`` text."""
    if type(obj) is not dict:
        return None
    kind = obj.get("type")
    if type(kind) is not str or not kind.endswith(".delta") or kind == "response.audio.delta":
        return None
    return _template(data, obj, lambda o: o, "delta", _text_len(obj.get("delta")), "sequence_number")


def _template(
    data: str,
    obj: dict[str, Any],
    holder: Callable[[Any], Any],
    key: str,
    chars: int,
    number_key: str | None = None,
) -> ChunkTemplate | None:
    """Split ``data`` around the string literal of ``holder(obj)[key]`` (and the integer of
    ``obj[number_key]`` before it, if there is one), and verify the split by parsing it with other
    values in the holes."""
    value = holder(obj).get(key)
    if type(value) is not str:
        return None
    text = _token_after(data, f'"{key}":', _string_end)
    if text is None:
        return None
    number = None
    if number_key is not None and type(obj.get(number_key)) is int:
        number = _token_after(data, f'"{number_key}":', _digits_end)
        if number is not None and number[1] > text[0]:
            number = None  # after the text: not supported, the number stays fixed
    probe = data[: text[0]] + _PROBE_LITERAL + data[text[1] :]
    if number is not None:
        probe = probe[: number[0]] + _PROBE_DIGITS + probe[number[1] :]
    try:
        parsed = orjson.loads(probe)
        if holder(parsed)[key] != _PROBE_TEXT:
            return None
        holder(parsed)[key] = value
        if number is not None and number_key is not None:
            if parsed[number_key] != _PROBE_NUMBER:
                return None
            parsed[number_key] = obj[number_key]
    except (orjson.JSONDecodeError, LookupError, TypeError):
        return None
    if parsed != obj:
        return None
    base = chars - len(value)
    if number is None:
        return ChunkTemplate(data[: text[0]].encode(), None, data[text[1] :].encode(), base)
    return ChunkTemplate(
        data[: number[0]].encode(), data[number[1] : text[0]].encode(), data[text[1] :].encode(), base
    )


def _token_after(text: str, key: str, end_of: Callable[[str, int], int | None]) -> tuple[int, int] | None:
    """(start, end) of the value token after ``key`` (a quoted key and colon that occurs exactly once
    in ``text``); ``end_of(text, start)`` finds where the token ends."""
    start = text.find(key)
    if start < 0 or text.find(key, start + 1) >= 0:
        return None
    start += len(key)
    while text[start : start + 1] in (" ", "\t"):
        start += 1
    end = end_of(text, start)
    return None if end is None else (start, end)


def _string_end(text: str, start: int) -> int | None:
    if text[start : start + 1] != '"':
        return None
    end = start
    while True:
        end = text.find('"', end + 1)
        if end < 0:
            return None
        if text[end - 1] != "\\":
            return end + 1
        escapes = len(text[start + 1 : end]) - len(text[start + 1 : end].rstrip("\\"))
        if escapes % 2 == 0:  # an escaped backslash, not an escaped quote: the literal ends here
            return end + 1


def _digits_end(text: str, start: int) -> int | None:
    end = start
    while text[end : end + 1].isdigit() and text[end].isascii():
        end += 1
    return end if end > start else None


# --- request-side estimate ---------------------------------------------------------------------------


def _content_chars(content: object) -> int:
    if type(content) is str:
        return len(content)
    if type(content) is list:
        return _parts_chars(content)
    return 0


def _prompt_size(value: object) -> tuple[int, int] | None:
    """(chars, tokens) of a ``prompt``/``input``: text, a list of texts, token ids, or Responses items."""
    if type(value) is str:
        return len(value), 0
    if type(value) is not list:
        return None
    chars = tokens = 0
    for item in value:
        if type(item) is str:
            chars += len(item)
        elif type(item) is int:  # a pre-tokenised prompt: one id is one token
            tokens += 1
        elif type(item) is list:  # a batch of pre-tokenised prompts
            tokens += sum(1 for t in item if type(t) is int)
        elif type(item) is dict:  # a Responses input item: a message, or a tool call / its output
            chars += _content_chars(item.get("content"))
            chars += _text_len(item.get("arguments")) + _text_len(item.get("output"))
    return chars, tokens


def estimate_prompt_tokens(request_json: object) -> int | None:
    """A deliberately rough prompt size: ceil(chars / 4) of the text the client sent (message content,
    ``prompt``, ``input``, ``instructions``), plus one token per pre-tokenised id. It ignores tools,
    images, chat templates and the real tokenizer; it is good for admission estimates and for filling a
    gap, never for billing what the upstream reported. None if the body has none of those fields."""
    if not isinstance(request_json, dict):
        return None
    found = False
    chars = tokens = 0
    messages = request_json.get("messages")
    if type(messages) is list:
        found = True
        for msg in messages:
            if type(msg) is dict:
                chars += _content_chars(msg.get("content"))
    for key in ("prompt", "input"):
        size = _prompt_size(request_json.get(key))
        if size is not None:
            found = True
            chars += size[0]
            tokens += size[1]
    instructions = request_json.get("instructions")
    if type(instructions) is str:
        chars += len(instructions)
    return chars_to_tokens(chars) + tokens if found else None
