"""The SSE decoder: WHATWG framing rules, and the same events however the bytes are split."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meter.tap.sse import SSEDecoder, SSEEvent
from tests.support.paths import FIXTURES

SSE_FIXTURES = sorted(p.name for p in FIXTURES.glob("*.sse"))


def decode(*chunks: bytes) -> list[SSEEvent]:
    decoder = SSEDecoder()
    events: list[SSEEvent] = []
    for chunk in chunks:
        events += decoder.feed(chunk)
    return events + decoder.flush()


def split_at(data: bytes, points: list[int]) -> list[bytes]:
    cuts = sorted({p % (len(data) + 1) for p in points})
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


# A stream exercising every rule at once: BOM, all three line endings, comments, multi-line data,
# event names, ids, a field without a colon, multibyte text, an event with no data.
TRICKY = (
    "\ufeffevent: greeting\rdata: hé\r\ndata:  two spaces\nid: 7\n\n"
    ": keep-alive\r\n\r\n"
    "event: nothing\nid: 8\n\n"  # no data: not dispatched, but the id sticks
    'data\ndata:€𝄞\r\rretry: 3000\nunknown: x\ndata: {"a": 1}\n\n'
    "data: last without blank line"
).encode()

TRICKY_EVENTS = [
    SSEEvent(data="hé\n two spaces", event="greeting", id="7"),
    SSEEvent(data="\n€𝄞", event=None, id="8"),
    SSEEvent(data='{"a": 1}', event=None, id="8"),
    SSEEvent(data="last without blank line", event=None, id="8"),
]


def test_tricky_stream_whole() -> None:
    assert decode(TRICKY) == TRICKY_EVENTS


def test_tricky_stream_byte_at_a_time() -> None:
    assert decode(*(TRICKY[i : i + 1] for i in range(len(TRICKY)))) == TRICKY_EVENTS


@given(st.lists(st.integers(min_value=0), max_size=30))
def test_tricky_stream_random_splits(points: list[int]) -> None:
    assert decode(*split_at(TRICKY, points)) == TRICKY_EVENTS


@pytest.mark.parametrize("name", SSE_FIXTURES)
def test_fixture_byte_at_a_time_matches_whole(name: str) -> None:
    data = (FIXTURES / name).read_bytes()
    whole = decode(data)
    assert whole  # every fixture has events
    assert decode(*(data[i : i + 1] for i in range(len(data)))) == whole


@settings(max_examples=50)
@given(name=st.sampled_from(SSE_FIXTURES), points=st.lists(st.integers(min_value=0), max_size=40))
def test_fixture_random_splits_match_whole(name: str, points: list[int]) -> None:
    data = (FIXTURES / name).read_bytes()
    assert decode(*split_at(data, points)) == decode(data)


def test_crlf_split_between_chunks_is_one_line_ending() -> None:
    # If the LF after a chunk-final CR counted as a line of its own, "a" would be dispatched alone.
    assert decode(b"data: a\r", b"\ndata: b\r", b"\n\r", b"\n") == [SSEEvent("a\nb")]


def test_lone_cr_line_endings() -> None:
    assert decode(b"data: a\rdata: b\r\rdata: c\r\r") == [SSEEvent("a\nb"), SSEEvent("c")]


def test_cr_then_cr_across_chunks_is_a_blank_line() -> None:
    assert decode(b"data: a\r", b"\r", b"data: b\r\r") == [SSEEvent("a"), SSEEvent("b")]


def test_multibyte_character_split_across_chunks() -> None:
    data = "data: 日本\n\n".encode()
    cut = data.index("本".encode()) + 1
    assert decode(data[:cut], data[cut:]) == [SSEEvent("日本")]


def test_invalid_utf8_is_replaced_not_raised() -> None:
    assert decode(b"data: \xff\xfe\n\n") == [SSEEvent("\ufffd\ufffd")]


def test_only_one_space_after_colon_is_dropped() -> None:
    assert decode(b"data:x\n\ndata:  y\n\n") == [SSEEvent("x"), SSEEvent(" y")]


def test_comments_and_events_without_data_are_not_dispatched() -> None:
    assert decode(b": ping\n\n:\n\nevent: x\n\nid: 1\n\n") == []


def test_event_name_resets_after_dispatch_and_id_persists() -> None:
    events = decode(b"event: a\nid: 1\ndata: 1\n\ndata: 2\n\nid\ndata: 3\n\n")
    assert events == [SSEEvent("1", "a", "1"), SSEEvent("2", None, "1"), SSEEvent("3", None, "")]


def test_id_with_nul_is_ignored() -> None:
    assert decode(b"id: 1\n\nid: a\x00b\ndata: x\n\n") == [SSEEvent("x", None, "1")]


def test_empty_event_name_means_default() -> None:
    assert decode(b"event:\ndata: x\n\n") == [SSEEvent("x", None, None)]


def test_bom_only_at_start() -> None:
    bom = b"\xef\xbb\xbf"
    assert decode(bom + b"data: x\n\n") == [SSEEvent("x")]
    assert decode(bom[:1], bom[1:2], bom[2:] + b"data: x\n\n") == [SSEEvent("x")]
    # A second BOM is not a stream start: it stays part of the field name, which is then unknown.
    assert decode(bom + bom + b"data: x\n\n") == []


def test_stream_shorter_than_a_bom() -> None:
    assert decode(b"\xef") == []
    assert decode(b"\xef", b"") == []


def test_flush_dispatches_pending_event_and_truncated_drops_fragment() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b'data: {"usage": 1}\n') == []
    assert decoder.flush() == [SSEEvent('{"usage": 1}')]

    decoder = SSEDecoder()
    assert decoder.feed(b'data: {"usage": 1}\ndata: {"cut') == []
    assert decoder.flush(truncated=True) == [SSEEvent('{"usage": 1}')]

    decoder = SSEDecoder()
    assert decoder.feed(b'data: {"cut') == []
    assert decoder.flush(truncated=True) == []


def test_flush_on_empty_decoder() -> None:
    assert SSEDecoder().flush() == []


def test_buffered_bytes_counts_the_unterminated_line() -> None:
    decoder = SSEDecoder()
    decoder.feed(b"data: abc")
    decoder.feed(b"def")
    assert decoder.buffered_bytes == 12
    decoder.feed(b"\ndata: x")
    assert decoder.buffered_bytes == 7
    decoder.feed(b"\n\n")
    assert decoder.buffered_bytes == 0


def test_long_line_fed_in_small_pieces_is_linear() -> None:
    # 200k one-byte feeds of one line; a quadratic rejoin would take minutes, this takes well under 1s.
    decoder = SSEDecoder()
    for _ in range(200_000):
        decoder.feed(b"x")
    assert decoder.feed(b"\n\n") == []  # field "xxx...": unknown, ignored
    assert decoder.buffered_bytes == 0


def test_event_is_frozen() -> None:
    event = SSEEvent("x")
    with pytest.raises(AttributeError):
        event.data = "y"  # type: ignore[misc]
