"""The tap's fast paths against its general ones: the SSE decoder's whole-event shortcut and the
observer's chunk templates (meter.tap.templates.ChunkTemplate) must give exactly the Observation (timing
included) and the events the long way gives, on the recorded fixtures however they are split, and
on chunks built to look almost like a template's."""

from __future__ import annotations

import gzip
import json
import zlib

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meter.tap.observer import Observation, ResponseObserver
from meter.tap.sse import SSEDecoder, SSEEvent
from meter.tap.templates import chunk_template, delta_template
from tests.support.paths import FIXTURES
from tests.tap.test_observer import CASES, IDS, SSE, split_at, untimed
from tests.tap.test_sse import TRICKY

SSE_FIXTURES = sorted(p.name for p in FIXTURES.glob("*.sse"))
STREAM_CASES = [case for case in CASES if case[0].endswith(".sse")]
STREAM_IDS = [case[0] for case in STREAM_CASES]
CHAT = "/v1/chat/completions"


class Counting(ResponseObserver):
    """A ResponseObserver that counts the events it decoded the long way."""

    __slots__ = ("decoded",)

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.decoded = 0

    def _events(self, events: list[SSEEvent]) -> int:
        self.decoded += len(events)
        return super()._events(events)


def run(
    endpoint: str, chunks: list[bytes], headers: dict[str, str], *, aborted: bool = False, fast: bool = True
) -> tuple[Observation, list[str], int]:
    errors: list[str] = []
    observer = Counting(
        endpoint,
        status_code=200,
        headers=headers,
        prompt_tokens_estimate=7,
        on_error=errors.append,
        fast=fast,
    )
    for i, chunk in enumerate(chunks):
        observer.feed(chunk, float(i))
    return observer.finish(aborted=aborted), errors, observer.decoded


def assert_same(endpoint: str, chunks: list[bytes], headers: dict[str, str], *, aborted: bool = False) -> int:
    """The fast and the general paths agree, timing included, and both agree with the same bytes fed
    one at a time (which no fast path can take: an independent reference). Returns how many events
    the fast run decoded the long way."""
    fast, fast_errors, decoded = run(endpoint, chunks, headers, aborted=aborted)
    general, general_errors, _ = run(endpoint, chunks, headers, aborted=aborted, fast=False)
    assert fast == general
    assert fast_errors == general_errors
    if "content-encoding" not in headers:
        data = b"".join(chunks)
        one_byte = [data[i : i + 1] for i in range(len(data))]
        bytewise, bytewise_errors, _ = run(endpoint, one_byte, headers, aborted=aborted)
        assert untimed(fast) == untimed(bytewise)
        assert fast_errors == bytewise_errors
    return decoded


def events_of(data: bytes) -> list[bytes]:
    """The fixture's events, each with its blank line, as a server flushing per event sends them."""
    return [event + b"\n\n" for event in data.replace(b"\r\n", b"\n").split(b"\n\n") if event.strip()]


# -- the SSE decoder ---------------------------------------------------------------------------------


def decode(chunks: list[bytes], *, fast: bool = True) -> list[SSEEvent]:
    decoder = SSEDecoder(fast=fast)
    events: list[SSEEvent] = []
    for chunk in chunks:
        events += decoder.feed(chunk)
    return events + decoder.flush()


def decode_both(chunks: list[bytes]) -> list[SSEEvent]:
    fast = decode(chunks)
    assert decode(chunks, fast=False) == fast
    return fast


@pytest.mark.parametrize("name", SSE_FIXTURES)
def test_sse_fast_path_gives_the_same_events(name: str) -> None:
    data = (FIXTURES / name).read_bytes()
    whole = decode_both([data])
    assert decode_both(events_of(data)) == decode_both([data.replace(b"\r\n", b"\n")])
    assert decode_both([data[:1], data[1:]]) == whole


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(SSE_FIXTURES), points=st.lists(st.integers(min_value=0), max_size=30))
def test_sse_fast_path_random_splits(name: str, points: list[int]) -> None:
    data = (FIXTURES / name).read_bytes()
    decode_both(split_at(data, points))


@settings(max_examples=60, deadline=None)
@given(points=st.lists(st.integers(min_value=0), max_size=30))
def test_sse_fast_path_tricky_stream(points: list[int]) -> None:
    decode_both(split_at(TRICKY, points))


@pytest.mark.parametrize(
    "chunk",
    [
        b"data: a\rb\n\n",
        b"data: a\r\n\n",
        b"data: a\ndata: b\n\n",
        b"data: a\n\ndata: b\n\n",
        b"data: a\n\n\n",
        b"data:  two spaces\n\n",
        b"data: \xff\xfe\n\n",
        b"data: \n\n",
        b"data: [DONE]\n\n",
        b": comment\n\n",
    ],
)
def test_sse_fast_path_on_odd_chunks(chunk: bytes) -> None:
    for before in ([], [b"data: x\n\n"], [b"data: x"], [b"data: x\r"], [b"event: e\n"], [b"\xef\xbb"]):
        decode_both([*before, chunk, chunk])


def test_sse_fast_path_keeps_the_last_id_and_state() -> None:
    chunks = [b"id: 7\n\n", b"data: a\n\n", b"event: x\n", b"data: b\n\n", b"data: c\r\n\r\n", b"data: d\n\n"]
    assert decode_both(chunks) == [
        SSEEvent("a", None, "7"),
        SSEEvent("b", "x", "7"),
        SSEEvent("c", None, "7"),
        SSEEvent("d", None, "7"),
    ]


# -- the observer on recorded traffic ----------------------------------------------------------------


@pytest.mark.parametrize(("name", "endpoint", "headers", "expected"), STREAM_CASES, ids=STREAM_IDS)
def test_fixture_fed_per_event(
    name: str, endpoint: str, headers: dict[str, str], expected: Observation
) -> None:
    events = events_of((FIXTURES / name).read_bytes())
    assert_same(endpoint, events, headers)
    for cut in range(len(events)):  # and aborted after every event
        assert_same(endpoint, events[:cut], headers, aborted=True)


@pytest.mark.parametrize(("name", "endpoint", "headers", "expected"), CASES, ids=IDS)
def test_fixture_whole_and_in_groups_of_events(
    name: str, endpoint: str, headers: dict[str, str], expected: Observation
) -> None:
    data = (FIXTURES / name).read_bytes()
    assert_same(endpoint, [data], headers)
    events = events_of(data)
    for size in (2, 3, 5):
        assert_same(endpoint, [b"".join(events[i : i + size]) for i in range(0, len(events), size)], headers)


@settings(max_examples=80, deadline=None)
@given(
    case=st.sampled_from(CASES), points=st.lists(st.integers(min_value=0), max_size=40), aborted=st.booleans()
)
def test_fixture_random_splits(
    case: tuple[str, str, dict[str, str], Observation], points: list[int], aborted: bool
) -> None:
    name, endpoint, headers, _ = case
    assert_same(endpoint, split_at((FIXTURES / name).read_bytes(), points), headers, aborted=aborted)


@pytest.mark.parametrize(("name", "endpoint", "headers", "expected"), STREAM_CASES, ids=STREAM_IDS)
def test_fixture_gzipped_per_event(
    name: str, endpoint: str, headers: dict[str, str], expected: Observation
) -> None:
    compressor = zlib.compressobj(wbits=16 + zlib.MAX_WBITS)
    chunks = [
        compressor.compress(e) + compressor.flush(zlib.Z_SYNC_FLUSH)
        for e in events_of((FIXTURES / name).read_bytes())
    ]
    chunks[-1] += compressor.flush()
    assert_same(endpoint, chunks, {**headers, "content-encoding": "gzip"})
    assert_same(
        endpoint, [gzip.compress((FIXTURES / name).read_bytes())], {**headers, "content-encoding": "gzip"}
    )


@pytest.mark.parametrize(
    ("name", "endpoint"),
    [
        ("chat_fireworks_usage_on_finish.sse", CHAT),
        ("chat_openai_usage_separate.sse", CHAT),
        ("chat_reasoning_tools_cached.sse", CHAT),
        ("completions_stream.sse", "/v1/completions"),
        ("responses_stream.sse", "/v1/responses"),
    ],
)
def test_the_fast_path_is_taken_on_token_streams(name: str, endpoint: str) -> None:
    events = events_of((FIXTURES / name).read_bytes())
    decoded = assert_same(endpoint, events, SSE)
    assert decoded < len(events) - 1, "no event was counted by a template"
    # The whole stream in one read (a fast upstream under load): the template the first content
    # event teaches takes the rest of the read; only the "[DONE]" event, which one read per event
    # skips undecoded, is added.
    assert assert_same(endpoint, [b"".join(events)], SSE) <= decoded + 1


# -- the observer on chunks that almost fit a template -------------------------------------------------

HEAD = (
    b'data: {"id":"x1","object":"chat.completion.chunk","created":1,"model":"m",'
    b'"choices":[{"index":0,"delta":{"content":'
)
TAIL = b'},"finish_reason":null}],"usage":null}\n\n'
ROLE = HEAD.replace(b'{"content":', b'{"role":"assistant","content":') + b'""' + TAIL
FINISH = (
    b'data: {"id":"x1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,'
    b'"delta":{},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}\n\n'
)


def content(literal: bytes) -> bytes:
    return HEAD + literal + TAIL


ODD_CHUNKS = [
    content(b'"plain"'),
    content(b'"esc \\" \\\\ \\n \\u00e9 \\ud83d\\ude00 \\/"'),
    content('"raw ünï ✓ 😀"'.encode()),
    content(b'""'),
    content(b"null"),
    content(b"12"),
    content(b'"a","finish_reason":"length"}],"usage":{"prompt_tokens":9}}\n\n' + HEAD[:40] + b'"b"'),
    content(b'"a"}}],"usage":{"prompt_tokens":9,"completion_tokens":9},"x":[{"y":{"z":"b"'),
    content(b'"line\nbreak"'),
    content(b'"a"\n'),
    content(b' "spaced" '),
    content(b'"bad \xff utf8"'),
    content(b'"ctrl \x01"'),
    content(b'"two"') + content(b'"events"'),
    content(b'"then"') + b": keep-alive\n\n" + content(b'"more"'),
    content(b'"then"') + FINISH,
    content(b'"then a partial"') + HEAD,
    b'"rest of a partial"' + TAIL,
    content(b'"crlf"')[:-2] + b"\r\n\r\n",
    content(b'"extra blank"') + b"\n",
    b"id: 9\n" + content(b'"with an id"'),
    b"event: error\n" + content(b'"named"'),
    content(b'"x"').replace(b'"model":"m"', b'"model":"other"'),
    content(b'"x"').replace(b'"index":0', b'"index":1'),
    b"data: [DONE]\n\n",
    content(b'"after done"'),
    b"data: [DONE]\n\n" + content(b'"done, then more"'),
    b"data: [DONE]\n",
]


@settings(max_examples=300, deadline=None)
@given(
    picks=st.lists(st.sampled_from(ODD_CHUNKS), max_size=12),
    texts=st.lists(st.text(), max_size=4),
    ascii_escaped=st.booleans(),
    aborted=st.booleans(),
)
def test_chunks_that_almost_fit_the_template(
    picks: list[bytes], texts: list[str], ascii_escaped: bool, aborted: bool
) -> None:
    encode = (lambda t: json.dumps(t).encode()) if ascii_escaped else orjson.dumps
    chunks = [ROLE, content(b'"learn"'), *(content(encode(text)) for text in texts), *picks, FINISH]
    assert_same(CHAT, chunks, SSE, aborted=aborted)


@settings(max_examples=100, deadline=None)
@given(
    texts=st.lists(st.text(), min_size=1, max_size=8), points=st.lists(st.integers(min_value=0), max_size=10)
)
def test_random_token_streams_split_anywhere(texts: list[str], points: list[int]) -> None:
    data = b"".join([ROLE, *(content(orjson.dumps(text)) for text in texts), FINISH, b"data: [DONE]\n\n"])
    assert_same(CHAT, split_at(data, points), SSE)
    assert_same(CHAT, events_of(data), SSE)


DELTA = (
    b"event: response.output_text.delta\n"
    b'data: {"type":"response.output_text.delta","sequence_number":%s,"item_id":"msg_1",'
    b'"output_index":0,"content_index":0,"delta":%s}\n\n'
)
COMPLETED = (
    b"event: response.completed\n"
    b'data: {"type":"response.completed","sequence_number":99,"response":{"id":"resp_1","object":"response",'
    b'"status":"completed","model":"m","output":[],"usage":{"input_tokens":3,"output_tokens":2,"total_tokens":5}}}\n\n'
)


@pytest.mark.parametrize(
    "number",
    [
        b"5",
        b"0",
        b"05",
        b"-1",
        b"1.5",
        b"1e3",
        b"123456789012345678",
        b"1234567890123456789012345",
        b"",
        b'"7"',
        b"7 ",
    ],
)
def test_responses_deltas_with_odd_sequence_numbers(number: bytes) -> None:
    chunks = [DELTA % (b"3", b'"learn"'), DELTA % (number, b'"odd"'), DELTA % (b"4", b'"x"'), COMPLETED]
    assert_same("/v1/responses", chunks, SSE)


@settings(max_examples=100, deadline=None)
@given(
    items=st.lists(st.tuples(st.integers(min_value=0, max_value=10**20), st.text()), max_size=8),
    points=st.lists(st.integers(min_value=0), max_size=6),
)
def test_random_responses_streams(items: list[tuple[int, str]], points: list[int]) -> None:
    events = [DELTA % (str(n).encode(), orjson.dumps(text)) for n, text in [(1, "learn"), *items]]
    assert_same("/v1/responses", [*events, COMPLETED], SSE)
    assert_same("/v1/responses", split_at(b"".join([*events, COMPLETED]), points), SSE)


def test_other_endpoint_that_turns_out_to_be_a_responses_stream() -> None:
    data = (FIXTURES / "responses_stream_fireworks_incomplete.sse").read_bytes()
    chunks = [ROLE, content(b'"chat first"'), content(b'"again"'), *events_of(data), content(b'"late"')]
    assert_same("/v2/something", chunks, SSE)


def test_a_read_of_events_no_template_takes_goes_whole_after_its_first_content() -> None:
    """A stream of two choices (no template takes its chunks) arriving in one read: its events are
    taken apart only until the first content event has shown that, then the rest of the read goes to
    the SSE decoder at once, and so does every later read; what is observed is unchanged."""
    two_choices = b'{"index":1,"delta":{"content":"z"},"finish_reason":null},{"index":0,"delta":{"content":'
    chunks = [content(b'"t%d"' % i).replace(b'{"index":0,"delta":{"content":', two_choices) for i in range(9)]
    reads = [ROLE + b"".join(chunks[:5]), b"".join(chunks[5:]) + FINISH + b"data: [DONE]\n\n"]
    fed: list[bytes] = []

    class Recording(SSEDecoder):
        def feed(self, data: bytes) -> list[SSEEvent]:
            fed.append(data)
            return super().feed(data)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("meter.tap.observer.SSEDecoder", Recording)
        assert_same(CHAT, reads, SSE)
        fed.clear()
        run(CHAT, reads, SSE)
    assert fed == [ROLE, chunks[0], b"".join(chunks[1:5]), reads[1]]


# -- templates ---------------------------------------------------------------------------------------


def test_a_template_is_only_learnt_from_a_chunk_that_only_carries_text() -> None:
    def template(chunk: bytes) -> object:
        data = chunk[6:-2].decode()
        return chunk_template(data, orjson.loads(data))

    assert template(content(b'"x"')) is not None
    assert template(ROLE) is not None  # the role is one of the fixed bytes; only the text varies
    assert template(FINISH) is None
    assert template(content(b'"x"').replace(b'"usage":null', b'"usage":{"prompt_tokens":1}')) is None
    assert template(content(b'"x"').replace(b'"finish_reason":null', b'"finish_reason":"stop"')) is None
    assert template(content(b'"x"').replace(b'"object"', b'"error":"e","object"')) is None
    assert template(content(b'"x"').replace(b'"id"', b'"perf_metrics":{"a":1},"id"')) is None
    # The key spelled with an escape, and a decoy key that contains the pattern: the split is wrong
    # or ambiguous, and the probe parse refuses it.
    assert template(content(b'"x"').replace(b'{"content":', b'{"con\\u0074ent":')) is None
    assert template(content(b'"x"').replace(b'"model":"m"', b'"model":"m","a\\"content":"y"')) is None
    data = DELTA % (b"3", b'"d"')
    payload = data.split(b"data: ")[1][:-2].decode()
    learnt = delta_template(payload, orjson.loads(payload))
    assert learnt is not None and learnt.middle is not None
