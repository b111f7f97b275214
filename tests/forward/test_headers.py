"""Which response headers cross the proxy: the one-pass split agrees with the rules of
meter.forward.headers."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from meter.forward.headers import client_response_headers, observed, override_headers, split_response_headers

NAMES = [
    b"Content-Type",
    b"content-length",
    b"Connection",
    b"Keep-Alive",
    b"Transfer-Encoding",
    b"fireworks-prompt-tokens",
    b"X-Request-Id",
    b"x-ratelimit-limit-requests",
    b"Set-Cookie",
    b"X-Custom",
]
VALUES = [b"1", b"close", b"keep-alive, x-custom", b"application/json", b"a b", b"X-Custom"]


@given(st.lists(st.tuples(st.sampled_from(NAMES), st.sampled_from(VALUES)), max_size=12))
def test_split_equals_the_rules(headers: list[tuple[bytes, bytes]]) -> None:
    by_name, client = split_response_headers(headers)
    assert client == client_response_headers(headers)
    kept = {name.lower() for name, _ in client}
    expected = {
        name.lower().decode(): value.decode()
        for name, value in headers
        if name.lower() in kept and observed(name.lower())
    }
    assert by_name == expected


def test_connection_named_headers_are_dropped_and_the_rest_keep_their_order() -> None:
    headers = [
        (b"Content-Type", b"text/event-stream"),
        (b"Connection", b"keep-alive, X-Custom"),
        (b"X-Custom", b"hop"),
        (b"Set-Cookie", b"a=1"),
        (b"Set-Cookie", b"b=2"),
        (b"Transfer-Encoding", b"chunked"),
    ]
    by_name, client = split_response_headers(headers)
    assert client == [
        (b"Content-Type", b"text/event-stream"),
        (b"Set-Cookie", b"a=1"),
        (b"Set-Cookie", b"b=2"),
    ]
    assert by_name == {"content-type": "text/event-stream"}  # meter reads no other of these


def test_meter_reads_fireworks_headers_framing_and_the_request_id() -> None:
    headers = [
        (b"Fireworks-Prompt-Tokens", b"9"),
        (b"X-Request-Id", b"r1"),
        (b"Content-Length", b"2"),
        (b"Content-Encoding", b"gzip"),
        (b"x-ratelimit-limit-requests", b"6000"),
        (b"Server", b"uvicorn"),
    ]
    by_name, client = split_response_headers(headers)
    assert by_name == {
        "fireworks-prompt-tokens": "9",
        "x-request-id": "r1",
        "content-length": "2",
        "content-encoding": "gzip",
    }
    assert client == headers  # every one of them still reaches the client


def test_meter_rate_limit_headers_replace_the_upstreams_of_the_same_name() -> None:
    upstream = [(b"x-ratelimit-limit-requests", b"6000"), (b"x-ratelimit-limit-tokens-prompt", b"36000")]
    ours = [(b"x-ratelimit-limit-requests", b"3"), (b"x-ratelimit-remaining-requests", b"2")]
    assert override_headers(upstream, ours) == [(b"x-ratelimit-limit-tokens-prompt", b"36000"), *ours]
