"""The tap: a sans-I/O observer of one upstream response, fed the bytes the proxy relays.

The proxy calls ``feed(chunk, now)`` for every body chunk it forwards (the chunk exactly as received,
still compressed if the upstream compressed it) and ``finish()`` once at the end; the observer turns
that into an :class:`Observation`. It never touches the bytes the client gets.

Rule 1: ``feed`` and ``finish`` never raise. A chunk that cannot be parsed is reported to ``on_error``
        with a kind and skipped: "json" (a payload or body that is not a JSON object), "encoding" (an
        unsupported or corrupt content-encoding), "body_too_large" (over ``max_body_bytes``), "internal"
        (a bug here). After any but "json" the body is no longer read and the answer falls back to what
        the headers (and anything read before) said. (The SSE decoder itself cannot fail: it replaces
        invalid UTF-8, as the spec says.)
Rule 2: the framing comes from the headers: ``text/event-stream`` is decoded incrementally as SSE;
        JSON (or an unlabelled / ``text/*`` body) is buffered up to ``max_body_bytes`` and parsed once
        at ``finish``; anything else (audio, images) is not read. ``gzip``/``deflate`` bodies are
        inflated into a copy; other encodings (br, zstd) are not read.
Rule 3: where the counts came from (``UsageSource``):
        REPORTED  - the body or stream reported usage (header prompt/cached counts fill fields it
                    lacks), or it reported none but ``fireworks-prompt-tokens`` came and no content
                    was relayed (prompt tokens only);
        ESTIMATED - content was relayed but no usage reported (an aborted stream, a silent upstream):
                    completion = ceil(content_chars / 4), prompt from the header else the request
                    estimate;
        MISSING   - nothing to go on: every count is None, never zero.
        ``total_tokens`` is the reported one, else prompt + completion when both are known.
Rule 4: usage is cumulative, so the latest usage object wins (``n > 1`` streams repeat it per choice).
Rule 5: ``first_content_at`` is the ``now`` of the first ``feed`` whose chunk completed an event with
        non-empty generated text (content, reasoning or tool arguments): meter's time to first token.
        Only streams have it.

Cost per streamed chunk: one scan of the new bytes for line ends, one ``orjson.loads`` per ``data:``
payload, a few dict lookups. Buffered data is never re-scanned.

Fast path (templates): after a content chunk has been decoded the long way, the observer learns its
shape (:class:`~meter.chunk_templates.ChunkTemplate`: the bytes around its text, and around a Responses
event's sequence number). A later chunk that is one or more whole events of that shape, arriving at
an event boundary, is counted by checking its fixed bytes and reading only its text's string literal:
a token stream's chunks are nearly all like that (same id, model and created time, one token of text).
Decoding such a chunk would only have added its text to ``content_chars``, so the Observation is the
same either way; a chunk that differs in any byte outside the holes, or that splits an event, takes
the long way (tests/test_observe_fastpath.py compares both on the recorded fixtures and random
splits). Learning costs one extra parse; a stream learns at most three times. A read holding several
events while a template may still be learnt (a fast upstream's whole stream often arrives in one or
two reads under load) is taken one event at a time until one teaches a template, so the template
takes the rest of that read too (``python -m bench.observer``, "one read": 85 → 55 µs a stream); at
most eight events a read, and no more once a content event showed that no template takes the stream.
"""

from __future__ import annotations

import contextlib
import enum
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import orjson

from meter.chunk_templates import chunk_template, delta_template
from meter.extract import Endpoint, ResponseFacts, endpoint_of
from meter.fireworks_metrics import fireworks_metrics
from meter.records import Usage, UsageSource, first_known
from meter.sse import SSEDecoder, SSEEvent
from meter.token_estimate import chars_to_tokens

__all__ = ["Observation", "ResponseObserver"]

_INFLATE_STEP = 1 << 20  # inflate at most this much per call, so a small "zip bomb" chunk cannot balloon
_TEMPLATE_TRIES = 3  # templates learnt per stream at most (a stream whose chunks all differ stops trying)
_APART_EVENTS = 8  # events of one read taken one at a time before the rest goes at once (a Responses
# stream opens with four events that carry no text; see _take_events_apart)


@dataclass(frozen=True, slots=True)
class Observation:
    """What one response told meter. Times are the caller's monotonic clock (seconds)."""

    usage: Usage
    usage_source: UsageSource
    response_id: str | None = None
    response_model: str | None = None
    finish_reasons: tuple[str, ...] = ()  # one per choice, in choice index order
    first_content_at: float | None = None
    error_message: str | None = None  # from an upstream error body or a mid-stream error event
    stream_error: bool = False  # an error event arrived mid-stream (the status was already 200)
    server_ttft_s: float | None = None
    server_processing_s: float | None = None
    upstream_metrics: dict[str, float] = field(default_factory=dict)
    content_chars: int = 0
    streamed: bool = False


# A learnt template (meter.chunk_templates.ChunkTemplate) with its SSE framing, as (prefix, middle, suffix,
# base, suffix + blank line): an event of its shape is ``prefix + contents + suffix``, or ``prefix +
# digits + middle + contents + suffix``, where ``contents`` is a string literal's inside: prefix (or
# middle) ends with its opening quote, suffix starts with its closing one.
_Template = tuple[bytes, bytes | None, bytes, int, bytes]


def _block_chars(data: bytes, start: int, stop: int, template: _Template) -> int | None:
    """The content characters of the event ``data[start:stop]`` (its lines without the blank line
    ending it) if it has the template's shape, else None.

    Exact: the bytes between the quotes are taken only if orjson reads quote + them + quote as a JSON
    string, so they hold no unescaped quote and no raw line break; the event is then one ``data:``
    line (after the template's ``event:`` line, if it has one) whose JSON differs from the template
    event's only in that string (and the integer)."""
    prefix, middle, suffix, base, _ = template
    if not (data.startswith(prefix, start, stop) and data.endswith(suffix, start, stop)):
        return None
    begin = start + len(prefix)
    if middle is not None:
        found = data.find(middle, begin, stop)
        digits = data[begin:found]
        if found < 0 or not digits.isdigit() or len(digits) > 18 or (digits[0] == 0x30 and len(digits) > 1):
            return None  # not a plain JSON integer, read as the template's was
        begin = found + len(middle)
    try:
        value = orjson.loads(data[begin - 1 : stop - len(suffix) + 1])
    except orjson.JSONDecodeError:
        return None
    return base + len(value)


class _Mode(enum.Enum):
    SSE = "sse"
    BODY = "body"
    IGNORE = "ignore"


def _mode_of(content_type: str) -> _Mode:
    if "text/event-stream" in content_type:
        return _Mode.SSE
    if "json" in content_type or not content_type or content_type.startswith("text/"):
        return _Mode.BODY
    return _Mode.IGNORE


def _inflater(content_encoding: str) -> tuple[bool, zlib._Decompress | None, bool]:
    """(understood, decompressor or None for identity, is_deflate)."""
    if not content_encoding:
        return True, None, False
    codings = [c for c in (part.strip() for part in content_encoding.lower().split(",")) if c]
    codings = [c for c in codings if c != "identity"]
    if not codings:
        return True, None, False
    if codings == ["gzip"] or codings == ["x-gzip"]:
        return True, zlib.decompressobj(16 + zlib.MAX_WBITS), False
    if codings == ["deflate"]:
        return True, zlib.decompressobj(zlib.MAX_WBITS), True
    return False, None, False


class ResponseObserver:
    """Accumulates one response; see the module docstring for the rules."""

    __slots__ = (
        "_apart",
        "_at_boundary",
        "_body",
        "_body_len",
        "_decoder",
        "_deflate_head",
        "_done",
        "_endpoint",
        "_facts",
        "_first_content_at",
        "_header_metrics",
        "_inflater",
        "_json_labelled",
        "_last_now",
        "_max_body_bytes",
        "_mode",
        "_on_error",
        "_prompt_tokens_estimate",
        "_responses_stream",
        "_status_code",
        "_streamed",
        "_template",
        "_template_tries",
    )

    def __init__(
        self,
        endpoint: str,
        *,
        status_code: int,
        headers: Mapping[str, str],  # upstream response headers, names lower-cased
        prompt_tokens_estimate: int | None = None,
        on_error: Callable[[str], None] | None = None,
        max_body_bytes: int = 16 * 1024 * 1024,
    ) -> None:
        self._endpoint = endpoint_of(endpoint)
        self._status_code = status_code
        # Read what we need now: the caller's mapping may change after we return.
        self._header_metrics = fireworks_metrics(headers)
        self._prompt_tokens_estimate = prompt_tokens_estimate
        self._on_error = on_error
        self._max_body_bytes = max_body_bytes
        self._facts = ResponseFacts()
        self._first_content_at: float | None = None
        self._last_now: float | None = None
        self._body: list[bytes] = []
        self._body_len = 0
        self._decoder: SSEDecoder | None = None
        self._inflater: zlib._Decompress | None = None
        self._deflate_head: bytearray | None = None  # deflate input until the first output (see _inflate)
        content_type = headers.get("content-type", "").lower()
        self._json_labelled = "json" in content_type
        self._mode = _mode_of(content_type)
        self._streamed = self._mode is _Mode.SSE
        self._responses_stream = self._endpoint is Endpoint.RESPONSES
        self._template: _Template | None = None  # see _take
        self._at_boundary = False  # the decoder is at an event boundary (SSEDecoder.at_boundary)
        self._done = False  # the stream's "data: [DONE]" event was seen
        self._template_tries = _TEMPLATE_TRIES if self._FAST else 0
        self._apart = True  # reads of several events may be taken apart (see _take_events_apart)
        if self._streamed:
            self._decoder = SSEDecoder()
        try:
            understood, inflater, deflate = _inflater(headers.get("content-encoding", ""))
        except zlib.error:  # pragma: no cover - zlib refusing valid parameters
            understood, inflater, deflate = False, None, False
        if not understood:
            self._stop("encoding")
        self._inflater = inflater
        if deflate:
            self._deflate_head = bytearray()

    _FAST = True  # class switch for tests that compare the fast paths with the general ones

    # --- feeding ------------------------------------------------------------------------------

    def feed(self, chunk: bytes, now: float) -> None:
        """One body chunk exactly as relayed; ``now`` is the caller's monotonic clock."""
        if self._mode is _Mode.IGNORE or not chunk:
            return
        self._last_now = now
        try:
            if self._inflater is None:
                self._take(chunk, now)
            else:
                self._inflate(chunk, now)
        except Exception:
            self._stop("internal")

    def _take(self, data: bytes, now: float | None) -> None:
        """Decoded (inflated) body bytes."""
        decoder = self._decoder
        if decoder is not None:
            chars = 0
            template = self._template
            if template is not None and self._at_boundary:
                # The common case first, inline: the chunk is one event of the template's shape.
                prefix, middle, _, base, suffix = template
                if middle is None and data.startswith(prefix) and data.endswith(suffix):
                    try:
                        value = orjson.loads(data[len(prefix) - 1 : len(data) - len(suffix) + 1])
                    except orjson.JSONDecodeError:
                        pass
                    else:
                        chars = base + len(value)  # a string: see _block_chars
                        self._facts.content_chars += chars
                        if chars and self._first_content_at is None:
                            self._first_content_at = now
                        return
                elif middle is not None and data[-2:] == b"\n\n":  # a Responses delta, say
                    n = _block_chars(data, 0, len(data) - 2, template)
                    if n is not None:
                        self._facts.content_chars += n
                        if n and self._first_content_at is None:
                            self._first_content_at = now
                        return
            if self._apart and self._template_tries:
                cut = data.find(b"\n\n") + 2  # a blank line: an event ends there
                if 2 <= cut < len(data):
                    self._take_events_apart(data, now, cut)
                    return
            if template is not None and self._at_boundary:
                prefix = template[0]
                if data[-2:] == b"\n\n" and data.startswith(prefix):  # several events, the first alike
                    chars, used = self._templated(data, template)
                    if used:
                        self._facts.content_chars += chars
                        data = data[used:]
            if data == b"data: [DONE]\n\n" and self._at_boundary:
                data = b""  # one event that says nothing (and leaves the decoder as it is)
                self._done = True
            if data:
                events = decoder.feed(data)
                self._at_boundary = self._FAST and decoder.at_boundary
                if events:
                    chars += self._events(events)
            if chars and self._first_content_at is None:
                self._first_content_at = now
            if decoder.buffered_bytes > self._max_body_bytes:  # a "line" that never ends
                self._stop("body_too_large")
        elif self._mode is _Mode.BODY:
            self._body_len += len(data)
            if self._body_len > self._max_body_bytes:
                self._stop("body_too_large")
            else:
                self._body.append(data)

    def _take_events_apart(self, data: bytes, now: float | None, cut: int) -> None:
        """A read of several events while a template may still be learnt (a fast upstream's whole
        stream can come in one or two reads): its first events are taken one at a time until one
        teaches a new template, and the rest of the read then goes back to ``_take`` at once, where
        that template takes the events like it. After ``_APART_EVENTS`` events that taught nothing,
        or a content event no template can take (several choices, tool calls: ``_learn``), the
        stream's reads go whole from then on, the general path taking such a read at a lower cost.
        ``cut``: where the first event ends."""
        template = self._template
        start = 0
        for _ in range(_APART_EVENTS):
            self._take(data[start:cut], now)
            start = cut
            if self._decoder is None:  # stopped (body_too_large)
                return
            if self._template is not template or not self._template_tries or not self._apart:
                break
            cut = data.find(b"\n\n", start) + 2
            if cut < 2 or cut >= len(data):
                break  # one event left
        else:
            self._apart = False
        self._take(data[start:], now)

    def _templated(self, data: bytes, template: _Template) -> tuple[int, int]:
        """(content characters, bytes used) of the leading events of ``data`` that have the learnt
        template's shape; each would only have counted its text and left the decoder at an event
        boundary. ``data`` starts at a boundary and ends with a blank line."""
        chars = used = 0
        while used < len(data):
            stop = data.find(b"\n\n", used)
            n = _block_chars(data, used, stop, template)
            if n is None:
                break
            chars += n
            used = stop + 2
        return chars, used

    def _learn(self, name: str | None, data: str, obj: object, responses: bool) -> None:
        """Learn a template from a content event that came the long way, unless the one we have would
        have taken it (it came split, say) or the event is not one line."""
        if "\n" in data:
            return
        frame = b"data: " if name is None else b"event: " + name.encode() + b"\ndata: "
        block = frame + data.encode()
        if self._template is not None and _block_chars(block, 0, len(block), self._template) is not None:
            return
        learnt = delta_template(data, obj) if responses else chunk_template(data, obj)
        if learnt is None:
            self._apart = False  # content no template takes (several choices, tool calls): see _take
            return
        self._template_tries -= 1
        suffix = b'"' + learnt.tail
        if learnt.middle is None:
            self._template = (frame + learnt.head + b'"', None, suffix, learnt.base, suffix + b"\n\n")
        else:
            middle = learnt.middle + b'"'
            self._template = (frame + learnt.head, middle, suffix, learnt.base, suffix + b"\n\n")

    def _events(self, events: list[SSEEvent]) -> int:
        """Apply decoded events; returns the content chars they carried."""
        facts = self._facts
        responses = self._responses_stream
        chars = 0
        for event in events:
            data = event.data
            if data == "[DONE]":
                self._done = True
                continue
            if not data or data.isspace():
                continue
            try:
                obj = orjson.loads(data)
            except orjson.JSONDecodeError:
                self._report("json")
                continue
            if type(obj) is not dict:
                self._report("json")
                continue
            name = event.event
            if responses:
                n = facts.add_event(name, obj)
                if n and self._template_tries:  # a text delta: its successors may be alike
                    self._learn(name, data, obj, True)
            elif name is None or name == "message":
                if self._endpoint is Endpoint.OTHER and "type" in obj and "choices" not in obj:
                    # An unrecognised path streaming Responses-style events: read it as one.
                    self._responses_stream = responses = True
                    self._template = None  # a chat chunk's template means nothing there
                    n = facts.add_event(name, obj)
                else:
                    n = facts.add_chunk(obj)
                    if n and name is None and self._template_tries:  # its successors may be alike
                        self._learn(None, data, obj, False)
            else:  # a named event ("error", ...) in a chat stream
                n = facts.add_event(name, obj)
            chars += n
        return chars

    def _inflate(self, chunk: bytes, now: float | None) -> None:
        inflater = self._inflater
        assert inflater is not None
        head = self._deflate_head
        if head is not None:
            head += chunk
        try:
            out = inflater.decompress(chunk, _INFLATE_STEP)
        except zlib.error:
            if head is None:
                self._stop("encoding")
                return
            # "deflate" should be zlib-wrapped, but some servers send raw deflate: retry once as raw.
            self._deflate_head = None
            self._inflater = inflater = zlib.decompressobj(-zlib.MAX_WBITS)
            try:
                out = inflater.decompress(bytes(head), _INFLATE_STEP)
            except zlib.error:
                self._stop("encoding")
                return
        if out and head is not None:
            self._deflate_head = None  # the format is settled
        while True:
            if out:
                self._take(out, now)
                if self._mode is _Mode.IGNORE:
                    return
            tail = inflater.unconsumed_tail
            if not tail and len(out) < _INFLATE_STEP:
                return
            try:
                out = inflater.decompress(tail, _INFLATE_STEP)
            except zlib.error:
                self._stop("encoding")
                return

    def _stop(self, kind: str) -> None:
        """Stop reading the body (keeping what it already said) and report why."""
        self._mode = _Mode.IGNORE
        self._body = []
        self._decoder = None
        self._inflater = None
        self._report(kind)

    def _report(self, kind: str) -> None:
        if self._on_error is not None:
            with contextlib.suppress(Exception):  # a broken metrics callback must not break the stream
                self._on_error(kind)

    @property
    def done(self) -> bool:
        """The stream has sent its ``data: [DONE]`` event: a client reading with the openai SDK stops
        there and considers the response complete, whether or not more bytes follow."""
        return self._done

    # --- finishing ------------------------------------------------------------------------------

    def finish(self, *, aborted: bool = False) -> Observation:
        """The observation so far. ``aborted``: the body was cut off (client gone, upstream reset), so
        a trailing fragment is dropped rather than reported as unparseable."""
        try:
            self._drain(aborted)
            return self._observation()
        except Exception:
            self._report("internal")
            return Observation(usage=Usage(), usage_source=UsageSource.MISSING, streamed=self._streamed)

    def _drain(self, aborted: bool) -> None:
        if self._mode is _Mode.IGNORE:
            return
        inflater = self._inflater
        if inflater is not None:
            try:
                out = inflater.flush()
            except zlib.error:
                self._stop("encoding")
                return
            if out:
                self._take(out, self._last_now)
        decoder = self._decoder
        if decoder is not None:
            events = decoder.flush(truncated=aborted)
            if events and self._events(events) and self._first_content_at is None:
                self._first_content_at = self._last_now
        elif self._mode is _Mode.BODY and self._body:
            self._parse_body(b"".join(self._body), aborted)
        self._mode = _Mode.IGNORE  # finish() twice must not apply the body twice
        self._body = []

    def _parse_body(self, body: bytes, aborted: bool) -> None:
        start = body.lstrip()[:1]
        if not start:
            return
        if start not in (b"{", b"["):
            if self._json_labelled and not aborted:
                self._report("json")
            return  # an HTML error page or plain text: nothing to read
        try:
            obj = orjson.loads(body)
        except orjson.JSONDecodeError:
            if not aborted:  # a cut-off body is expected not to parse
                self._report("json")
            return
        self._facts.add_body(self._endpoint, obj, error_body=self._status_code >= 400)

    def _observation(self) -> Observation:
        facts = self._facts
        metrics = self._header_metrics if facts.metrics is None else facts.metrics.over(self._header_metrics)
        chars = facts.content_chars
        body = facts.usage
        if body is not None:
            source = UsageSource.REPORTED
            prompt = first_known(body.prompt_tokens, metrics.prompt_tokens)
            completion = body.completion_tokens
            cached = first_known(body.cached_tokens, metrics.cached_tokens)
            reasoning = body.reasoning_tokens
            total = body.total_tokens
        elif metrics.prompt_tokens is not None and chars == 0:
            source = UsageSource.REPORTED
            prompt, cached = metrics.prompt_tokens, metrics.cached_tokens
            completion = reasoning = total = None
        elif chars > 0:
            source = UsageSource.ESTIMATED
            prompt = first_known(metrics.prompt_tokens, self._prompt_tokens_estimate)
            completion, cached, reasoning, total = chars_to_tokens(chars), metrics.cached_tokens, None, None
        else:
            source = UsageSource.MISSING
            prompt = completion = cached = reasoning = total = None
        if total is None and prompt is not None and completion is not None:
            total = prompt + completion
        usage = Usage(prompt, completion, cached, reasoning, total)
        return Observation(
            usage=usage,
            usage_source=source,
            response_id=facts.response_id,
            response_model=facts.response_model,
            finish_reasons=facts.ordered_finish_reasons(),
            first_content_at=self._first_content_at,
            error_message=facts.error_message,
            stream_error=facts.stream_error,
            server_ttft_s=metrics.server_ttft_s,
            server_processing_s=metrics.server_processing_s,
            upstream_metrics=dict(metrics.other),
            content_chars=chars,
            streamed=self._streamed,
        )
