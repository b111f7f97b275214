"""The tap: a sans-I/O observer of one upstream response, fed the bytes the proxy relays.

The proxy calls ``feed(chunk, now)`` for every body chunk it forwards (the chunk exactly as received,
still compressed if the upstream compressed it) and ``finish()`` once at the end; the observer turns
that into an :class:`Observation`. It never touches the bytes the client gets.

Rule 1: ``feed`` and ``finish`` never raise. A chunk that cannot be parsed is reported to ``on_error``
        with a kind and skipped: "json" (a payload or body that is not a JSON object), "encoding" (an
        unsupported or corrupt content-encoding), "body_too_large" (an event, or a body without a
        readable tail, too large to parse: see Rule 6), "decode_budget" (past the budget: Rule 6),
        "internal" (a bug here). After "encoding", "decode_budget", "internal", and "body_too_large"
        for an event that never ends, the body is no longer read and the answer falls back to what the
        headers (and anything read before) said. (The SSE decoder itself cannot fail: it replaces
        invalid UTF-8, as the spec says.)
Rule 2: the framing comes from the headers: ``text/event-stream`` is decoded incrementally as SSE;
        JSON (or an unlabelled / ``text/*`` body) is buffered up to ``max_body_bytes`` and parsed once
        at ``finish`` (past that, only its last bytes are kept: Rule 6); anything else (audio, images)
        is not read. ``gzip``/``deflate`` bodies are inflated into a copy; other encodings (br, zstd)
        are not read.
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

Rule 6 (the budget; the upstream may be hostile): what the observer inflates and parses is bounded
        per response, and the work of any one ``feed`` or ``finish`` is bounded whatever the bytes:
        * per response (:class:`DecodeBudget`, settings ``METER_OBSERVE_MAX_BYTES`` and
          ``METER_OBSERVE_MAX_RATIO``): at most ``max_bytes`` bytes inflated, and as many of a body,
          or of a stream decoded the long way (the template fast path, which reads one string per
          event, is not counted: a real stream that long still has its usage read); and no more
          than ``max_ratio`` inflated bytes per encoded byte fed (beyond the first MiB, which any
          body may use). Past either: "decode_budget", and the body is no longer read;
        * per step: one ``feed`` inflates at most 128 KiB of input into at most 64 KiB (an event
          stream) or 1 MiB (a body) (urllib3's ``max_length`` and ``unconsumed_tail`` shape); the rest
          of the input waits for the next steps, and ``finish`` takes one more. An event stream with
          more than 16 KiB of input waiting (it arrives faster than it can be parsed at a step a
          read) is skimmed: inflated a body's step at a time but not parsed, and only its last 8 KiB,
          where usage is, parsed at the end ("decode_budget", reported once; the content it skipped
          is not counted). More than 256 KiB of input waiting, or more than a step left at
          ``finish``, is "decode_budget" and the end of reading;
        * an event stream's step may hold at most one line end per 32 bytes (2048 in 64 KiB) and one
          event per 128 bytes (512 in 64 KiB; each costs a parse): a real event is ~150-300 bytes in
          2-3 lines, so floods of blank lines, comments, one-byte fields or tiny events are
          "decode_budget";
        * one event (or a body) is parsed whole only up to ``max_body_bytes`` (1 MiB) and, past 16 KiB,
          only if it holds at most 8192 JSON values (counted as ``{``, ``[`` and ``,``: orjson builds
          ~20 M tiny containers a second, so 1 MiB of ``[[],[],...]`` would take ~25 ms). An event
          over either is skipped ("body_too_large"); an event still growing past ``max_body_bytes``
          (or past 4096 ``data`` lines) stops the reading ("body_too_large"). A body over either is
          read from its last 8 KiB (:func:`meter.tap.usage.tail_members`): its top-level ``usage`` (and
          ``model`` when it is there) still counts, which is where OpenAI and Fireworks put them;
          its id, finish reasons and content do not. Only that tail is kept in memory.
        These bounds assume chunks of at most 64 KiB, which is what meter.forward.upstream hands out.
        With them no step took over ~3 ms on the 2-core machine of the measurements in the commit that
        added them, for any hostile body tried (the worst: a 1 MiB event of non-ASCII text, parsed whole);
        without them one step of a 64 KiB gzip bomb took 2.4 s.

Cost per streamed chunk: one scan of the new bytes for line ends, one ``orjson.loads`` per ``data:``
payload, a few dict lookups. Buffered data is never re-scanned.

Fast path (templates): after a content chunk has been decoded the long way, the observer learns its
shape (:class:`~meter.tap.templates.ChunkTemplate`: the bytes around its text, and around a Responses
event's sequence number). A later chunk that is one or more whole events of that shape, arriving at
an event boundary, is counted by checking its fixed bytes and reading only its text's string literal:
a token stream's chunks are nearly all like that (same id, model and created time, one token of text).
Decoding such a chunk would only have added its text to ``content_chars``, so the Observation is the
same either way; a chunk that differs in any byte outside the holes, or that splits an event, takes
the long way (tests/tap/test_fastpath.py compares both on the recorded fixtures and random
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

from meter import bounds
from meter.bounds import cut
from meter.records import Usage, UsageSource, first_known
from meter.tap.estimate import chars_to_tokens
from meter.tap.fireworks_headers import fireworks_metrics
from meter.tap.sse import SSEDecoder, SSEEvent
from meter.tap.templates import chunk_template, delta_template
from meter.tap.usage import Endpoint, ResponseFacts, endpoint_of, tail_members

__all__ = ["DecodeBudget", "Observation", "ResponseObserver"]

# Rule 6's per-step bounds. Not settings: they bound how long one step holds the event loop, and a
# real response never comes near them.
_SLICE = 64 * 1024  # inflated bytes handed on at a time
_SSE_STEP = 64 * 1024  # inflated bytes of an event stream one feed()/finish() reads at most
_BODY_STEP = 1 << 20  # inflated bytes of a body one feed()/finish() reads at most
_STEP_INPUT = 128 * 1024  # encoded bytes one feed()/finish() inflates at most (~4-8 ns a byte if it
# does not compress: a body's step is bounded by its input as much as by its output)
_SKIM_AFTER = 16 * 1024  # encoded bytes waiting for later steps before a stream is skimmed
_BACKLOG = 256 * 1024  # encoded bytes that may wait for later steps at most
_RATIO_FREE = 1 << 20  # decoded bytes any body may use whatever its ratio (a small body compresses well)
_STEP_LINES = 2048  # lines a step may complete, or one per 32 bytes if more (meter.tap.sse, Rule 6)
_STEP_EVENTS = 512  # events a step may hold, or one per 128 bytes if more
_EVENT_LINES = 4096  # data lines of one event
_BIG = 16 * 1024  # a payload longer than this has its JSON values counted before it is parsed
_MAX_VALUES = 8192  # ... and is parsed only if it holds at most this many
_TAIL = 8 * 1024  # the last bytes of a body too large to parse whole that are kept and read
_NOT_VALUE_MARKS = bytes(c for c in range(256) if c not in b"{[,")  # for bytes.translate
_TEMPLATE_TRIES = 3  # templates learnt per stream at most (a stream whose chunks all differ stops trying)
_APART_EVENTS = 8  # events of one read taken one at a time before the rest goes at once (a Responses
# stream opens with four events that carry no text; see _take_events_apart)


@dataclass(frozen=True, slots=True)
class DecodeBudget:
    """What the observer reads of one response at most (Rule 6): ``max_bytes`` decoded (inflated, or
    as received) bytes, and decoded bytes no more than ``max_ratio`` times the encoded bytes fed, past
    the first MiB. The defaults leave room for real traffic: a 10-minute stream at ~100 tokens/s is
    ~18 MB, an embeddings body tens of MB; gzip of JSON or SSE is ~3-25x (a stream compressed per
    event stays near 20x), a deflate bomb ~1000x."""

    max_bytes: int = 64 * 1024 * 1024
    max_ratio: int = 100


_DEFAULT_BUDGET = DecodeBudget()


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


# A learnt template (meter.tap.templates.ChunkTemplate) with its SSE framing, as (prefix, middle, suffix,
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


def _values(data: bytes) -> int:
    """An upper bound of the JSON values in ``data`` (its ``{``, ``[`` and ``,`` bytes): C speed."""
    return len(data.translate(None, _NOT_VALUE_MARKS))


def _finish_reasons(reasons: tuple[str, ...]) -> tuple[str, ...]:
    """The reasons, or, if they would join to more than ``bounds.FINISH_REASONS`` characters, their
    join cut to that (a record keeps them comma-joined)."""
    if sum(map(len, reasons)) + len(reasons) <= bounds.FINISH_REASONS + 1:
        return reasons
    return (cut(",".join(reasons), bounds.FINISH_REASONS),)


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
        "_fast",
        "_fed",
        "_first_content_at",
        "_header_metrics",
        "_inflater",
        "_json_labelled",
        "_last_now",
        "_max_body_bytes",
        "_max_bytes",
        "_max_ratio",
        "_mode",
        "_object",
        "_on_error",
        "_parsed",
        "_prompt_tokens_estimate",
        "_read",
        "_responses_stream",
        "_status_code",
        "_step",
        "_streamed",
        "_tail",
        "_template",
        "_template_tries",
        "_waiting",
    )

    def __init__(
        self,
        endpoint: str,
        *,
        status_code: int,
        headers: Mapping[str, str],  # upstream response headers, names lower-cased
        prompt_tokens_estimate: int | None = None,
        on_error: Callable[[str], None] | None = None,
        max_body_bytes: int = 1 << 20,
        budget: DecodeBudget = _DEFAULT_BUDGET,
        fast: bool = True,
    ) -> None:
        """``max_body_bytes``: the largest body or event parsed whole (Rule 6). ``fast=False`` turns
        the fast paths off (the SSE decoder's shortcut and the templates): the general path alone,
        which gives the same Observation, and against which the fast paths are tested."""
        self._fast = fast
        self._endpoint = endpoint_of(endpoint)
        self._status_code = status_code
        # Read what we need now: the caller's mapping may change after we return.
        self._header_metrics = fireworks_metrics(headers)
        self._prompt_tokens_estimate = prompt_tokens_estimate
        self._on_error = on_error
        self._max_body_bytes = max_body_bytes
        self._max_bytes = budget.max_bytes
        self._max_ratio = budget.max_ratio
        self._parsed = 0  # stream bytes decoded the long way (Rule 6)
        self._facts = ResponseFacts()
        self._first_content_at: float | None = None
        self._last_now: float | None = None
        self._body: list[bytes] = []
        self._body_len = 0
        self._tail: bytearray | None = None  # a body past max_body_bytes (or skimmed): its last bytes
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
        self._template_tries = _TEMPLATE_TRIES if fast else 0
        self._apart = True  # reads of several events may be taken apart (see _take_events_apart)
        if self._streamed:
            self._decoder = SSEDecoder(max_lines=_STEP_LINES, fast=fast)
        try:
            understood, inflater, deflate = _inflater(headers.get("content-encoding", ""))
        except zlib.error:  # pragma: no cover - zlib refusing valid parameters
            understood, inflater, deflate = False, None, False
        if not understood:
            self._stop("encoding")
        self._inflater = inflater
        if inflater is not None:  # what only inflating needs (Rule 6)
            self._step = _SSE_STEP if self._streamed else _BODY_STEP
            self._read = 0  # inflated bytes
            self._fed = 0  # encoded bytes fed to the inflater
            self._waiting = b""  # encoded bytes left for the next steps
        if deflate:
            self._deflate_head = bytearray()

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
                # Rule 6: what the fast paths above took is not counted: they read only a string
                parsed = self._parsed = self._parsed + len(data)
                events = decoder.feed(data)
                if (
                    decoder.overflowed
                    or parsed > self._max_bytes
                    or (len(events) > _STEP_EVENTS and len(events) > len(data) >> 7)
                ):
                    self._stop("decode_budget")  # too many lines, bytes or events (each a parse)
                    return
                self._at_boundary = self._fast and decoder.at_boundary
                if events:
                    chars += self._events(events)
            if chars and self._first_content_at is None:
                self._first_content_at = now
            if not self._at_boundary and (
                decoder.pending_lines > _EVENT_LINES or decoder.pending_bytes > self._max_body_bytes
            ):
                self._stop("body_too_large")  # an event that never ends
        elif self._mode is _Mode.BODY:
            self._body_len += len(data)
            if self._body_len > self._max_bytes:
                self._stop("decode_budget")
                return
            tail = self._tail
            if tail is not None:
                tail += data
                if len(tail) > 2 * _TAIL:
                    del tail[:-_TAIL]
            elif self._body_len <= self._max_body_bytes:
                self._body.append(data)
            else:  # too large to parse whole: only its last bytes are kept from now on (Rule 6)
                self._body.append(data)
                body = b"".join(self._body)
                self._body = []
                self._object = body.lstrip()[:1] == b"{"
                self._tail = bytearray(body[-_TAIL:])

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
            if len(data) > _BIG and (
                len(data) > self._max_body_bytes
                or data.count("{") + data.count("[") + data.count(",") > _MAX_VALUES
            ):
                self._report("body_too_large")  # Rule 6: skipped, the stream is read on
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
        """One step (Rule 6): inflate at most ``_STEP_INPUT`` bytes of the input waiting from earlier
        steps and ``chunk``, into at most ``self._step`` bytes; the rest waits for the next steps."""
        inflater = self._inflater
        assert inflater is not None
        head = self._deflate_head
        if head is not None:
            head += chunk
        self._fed += len(chunk)
        data = self._waiting + chunk if self._waiting else chunk
        later = b""
        if len(data) > _STEP_INPUT:
            data, later = data[:_STEP_INPUT], data[_STEP_INPUT:]
        step = self._step
        size = min(step, _SLICE)
        try:
            out = inflater.decompress(data, size)
        except zlib.error:
            if head is None:
                self._stop("encoding")
                return
            # "deflate" should be zlib-wrapped, but some servers send raw deflate: retry once as raw.
            self._deflate_head = None
            self._inflater = inflater = zlib.decompressobj(-zlib.MAX_WBITS)
            data, later = bytes(head[:_STEP_INPUT]), bytes(head[_STEP_INPUT:])
            try:
                out = inflater.decompress(data, size)
            except zlib.error:
                self._stop("encoding")
                return
        if head is not None and (out or len(head) > _SLICE):
            self._deflate_head = None  # the format is settled (or the header is too long to retry)
        done = 0
        while True:
            if out:
                done += len(out)
                read = self._read = self._read + len(out)
                if read > self._max_bytes or read > self._max_ratio * self._fed + _RATIO_FREE:
                    self._stop("decode_budget")
                    return
                self._take(out, now)
                if self._mode is _Mode.IGNORE:
                    return
            data = inflater.unconsumed_tail
            if (not data and len(out) < size) or done >= step:
                break  # this step's input is inflated, or its share of output is taken
            size = min(step - done, _SLICE)
            try:
                out = inflater.decompress(data, size)
            except zlib.error:
                self._stop("encoding")
                return
        waiting = self._waiting = data + later if later else data
        if len(waiting) > _BACKLOG:
            self._stop("decode_budget")  # the input comes faster than a step a read takes it
        elif len(waiting) > _SKIM_AFTER and self._decoder is not None:
            self._skim()

    def _skim(self) -> None:
        """An encoded event stream arriving faster than a step a read parses it (Rule 6): from now on
        its bytes are inflated (a body's step at a time) but not parsed, and only its last bytes,
        where usage is, are read at the end (:meth:`_read_stream_tail`)."""
        self._report("decode_budget")
        self._decoder = None
        self._template = None
        self._mode = _Mode.BODY
        self._step = _BODY_STEP
        self._tail = bytearray()

    def _stop(self, kind: str) -> None:
        """Stop reading the body (keeping what it already said) and report why."""
        self._mode = _Mode.IGNORE
        self._body = []
        self._tail = None
        self._decoder = None
        self._inflater = None
        self._waiting = b""
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
        if self._inflater is not None:
            if self._waiting and self._decoder is not None:
                self._skim()  # input still waits: this last step inflates it without parsing
            self._inflate(b"", self._last_now)  # the last step: what waits from earlier reads
            inflater = self._inflater  # None once stopped; raw deflate may have replaced it
            if inflater is None:
                return
            if self._waiting:
                self._stop("decode_budget")  # more than a step still waiting: not read (Rule 6)
                return
            try:
                out = inflater.flush()
            except zlib.error:
                self._stop("encoding")
                return
            if out:
                self._read += len(out)
                self._take(out, self._last_now)
        decoder = self._decoder
        if decoder is not None:
            events = decoder.flush(truncated=aborted)
            if events and self._events(events) and self._first_content_at is None:
                self._first_content_at = self._last_now
        elif self._mode is _Mode.BODY:
            if self._tail is not None and self._streamed:
                self._read_stream_tail(bytes(self._tail[-_TAIL:]), aborted)
            elif self._tail is not None:
                self._read_tail(bytes(self._tail[-_TAIL:]), self._object, aborted)
            elif self._body:
                self._parse_body(b"".join(self._body), aborted)
        self._mode = _Mode.IGNORE  # finish() twice must not apply the body twice
        self._body = []
        self._tail = None

    def _parse_body(self, body: bytes, aborted: bool) -> None:
        start = body.lstrip()[:1]
        if not start:
            return
        if start not in (b"{", b"["):
            if self._json_labelled and not aborted:
                self._report("json")
            return  # an HTML error page or plain text: nothing to read
        if len(body) > _BIG and _values(body) > _MAX_VALUES:
            self._read_tail(body[-_TAIL:], start == b"{", aborted)  # Rule 6
            return
        try:
            obj = orjson.loads(body)
        except orjson.JSONDecodeError:
            if not aborted:  # a cut-off body is expected not to parse
                self._report("json")
            return
        self._facts.add_body(self._endpoint, obj, error_body=self._status_code >= 400)

    def _read_tail(self, tail: bytes, is_object: bool, aborted: bool) -> None:
        """A body too large to parse whole: its top-level members from its last ``usage`` or ``model``
        key on (Rule 6), or "body_too_large" if its tail has none."""
        obj = tail_members(tail) if is_object and not aborted else None
        if obj is None:
            if not aborted:
                self._report("body_too_large")
            return
        self._facts.add_body(self._endpoint, obj, error_body=self._status_code >= 400)

    def _read_stream_tail(self, tail: bytes, aborted: bool) -> None:
        """A skimmed stream (:meth:`_skim`): the events of its last bytes, from the first blank line."""
        tail = tail.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        start = tail.find(b"\n\n")
        if start < 0:
            return
        decoder = SSEDecoder()
        events = decoder.feed(tail[start + 2 :]) + decoder.flush(truncated=aborted)
        if events and self._events(events) and self._first_content_at is None:
            self._first_content_at = self._last_now

    def _observation(self) -> Observation:
        facts = self._facts
        metrics = self._header_metrics if facts.metrics is None else facts.metrics.over(self._header_metrics)
        chars = facts.content_chars
        reasons = facts.ordered_finish_reasons()  # each cut to bounds.FINISH_REASONS already
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
            finish_reasons=reasons if len(reasons) < 2 else _finish_reasons(reasons),
            first_content_at=self._first_content_at,
            error_message=facts.error_message,
            stream_error=facts.stream_error,
            server_ttft_s=metrics.server_ttft_s,
            server_processing_s=metrics.server_processing_s,
            upstream_metrics=dict(metrics.other),
            content_chars=chars,
            streamed=self._streamed,
        )
