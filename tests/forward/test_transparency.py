"""Byte-exact transparency, unbuffered streaming, hop-by-hop headers and client disconnects, proven
against a scripted upstream on a real loopback socket."""

from __future__ import annotations

import socket
import threading

import httpx
import openai

from tests.conftest import wait_for
from tests.support.upstreams import Script

_HEAD = b'data: {"id":"c1","object":"chat.completion.chunk","model":"m",'
SSE_CHUNKS = [
    _HEAD + b'"choices":[{"index":0,"delta":{"role":"assistant"}}]}\n\n',
    _HEAD + b'"choices":[{"index":0,"delta":{"content":"Hello"}}]}\n\n',
    _HEAD + b'"choices":[{"index":0,"delta":{},"finish_reason":"stop"}],'
    b'"usage":{"prompt_tokens":7,"completion_tokens":1,"total_tokens":8}}\n\n',
    b"data: [DONE]\n\n",
]


def test_request_bytes_path_query_and_headers_reach_upstream_unchanged(scripted, start_meter):
    upstream, server = scripted
    upstream.script = Script(headers=[(b"content-type", b"application/json")], chunks=[b"{}"])
    meter = start_meter(server.url)
    body = b'{"model":"accounts/x/models/y",  "messages":[{"role":"user","content":"h\\u00e9 \xc3\xa9"}]}\n'
    response = httpx.post(
        f"{meter.url}/v1/chat/completions?a=1&b=%2F%20x",
        content=body,
        headers={
            "Authorization": "Bearer fw-secret-key-1234",
            "Content-Type": "application/json",
            "X-Custom": "kept",
            "Connection": "keep-alive, X-Hop",
            "X-Hop": "dropped because Connection lists it",
            "Keep-Alive": "timeout=5",
        },
    )
    assert response.status_code == 200
    received = upstream.received[0]
    assert received.body == body
    assert received.raw_path == b"/v1/chat/completions"
    assert received.query_string == b"a=1&b=%2F%20x"
    names = [name for name, _ in received.headers]
    headers = dict(received.headers)
    assert headers[b"authorization"] == b"Bearer fw-secret-key-1234"
    assert headers[b"x-custom"] == b"kept"
    assert headers[b"content-type"] == b"application/json"
    assert headers[b"content-length"] == str(len(body)).encode()
    assert headers[b"host"] == f"127.0.0.1:{server.port}".encode()
    assert b"x-hop" not in names and b"keep-alive" not in names
    # meter's HTTP client adds nothing of its own (no user-agent, accept or accept-encoding defaults)
    client_names = {
        b"authorization",
        b"x-custom",
        b"content-type",
        b"content-length",
        b"host",
        b"accept",
        b"accept-encoding",
        b"user-agent",
        b"connection",
    }
    assert set(names) <= client_names
    assert headers.get(b"user-agent", b"").startswith(b"python-httpx")


def test_response_status_headers_and_bytes_reach_client_unchanged(scripted, start_meter):
    upstream, server = scripted
    body = b'{"error":{"message":"rate limited","type":"rate_limit_error"}}'
    upstream.script = Script(
        status=429,
        headers=[
            (b"content-type", b"application/json"),
            (b"retry-after", b"7"),
            (b"x-ratelimit-remaining-requests", b"0"),
            (b"fireworks-server-processing-time", b"0.012"),
            (b"x-request-id", b"req-abc"),
            (b"set-cookie", b"a=1"),
            (b"set-cookie", b"b=2"),
            (b"content-length", str(len(body)).encode()),
        ],
        chunks=[body],
    )
    meter = start_meter(server.url)
    response = httpx.post(f"{meter.url}/v1/chat/completions", json={"model": "m"})
    assert response.status_code == 429
    assert response.content == body
    assert response.headers["retry-after"] == "7"
    assert response.headers["x-ratelimit-remaining-requests"] == "0"
    assert response.headers["fireworks-server-processing-time"] == "0.012"
    assert response.headers.get_list("set-cookie") == ["a=1", "b=2"]
    row = meter.rows(1)[0]
    assert row["status_code"] == 429
    assert row["outcome"] == "upstream_error"
    assert row["request_id"] == "req-abc"


def test_gzip_body_is_relayed_compressed_and_still_metered(scripted, start_meter):
    import gzip

    upstream, server = scripted
    plain = (
        b'{"id":"x","model":"m","choices":[{"finish_reason":"stop"}],'
        b'"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}'
    )
    compressed = gzip.compress(plain)
    upstream.script = Script(
        headers=[(b"content-type", b"application/json"), (b"content-encoding", b"gzip")], chunks=[compressed]
    )
    meter = start_meter(server.url)
    with (
        httpx.Client() as client,
        client.stream("POST", f"{meter.url}/v1/chat/completions", json={"model": "m"}) as response,
    ):
        raw = b"".join(response.iter_raw())
    assert raw == compressed
    row = meter.rows(1)[0]
    assert (row["prompt_tokens"], row["completion_tokens"], row["usage_source"]) == (3, 4, "reported")


def test_stream_chunks_are_relayed_as_they_arrive(scripted, start_meter):
    """Chunk 2 is held by the upstream until the client has seen chunk 1: a buffering proxy deadlocks."""
    upstream, server = scripted
    gates = {i: threading.Event() for i in range(1, len(SSE_CHUNKS))}
    upstream.script = Script(
        headers=[(b"content-type", b"text/event-stream")], chunks=SSE_CHUNKS, gates=gates
    )
    meter = start_meter(server.url)
    received: list[bytes] = []
    with (
        httpx.Client(timeout=10) as client,
        client.stream(
            "POST", f"{meter.url}/v1/chat/completions", json={"model": "m", "stream": True}
        ) as response,
    ):
        chunks = response.iter_raw()
        for index, expected in enumerate(SSE_CHUNKS):
            got = b""
            while len(got) < len(expected):
                got += next(chunks)
            assert got == expected
            received.append(got)
            if index + 1 in gates:
                gates[index + 1].set()
    assert b"".join(received) == b"".join(SSE_CHUNKS)
    row = meter.rows(1)[0]
    assert row["outcome"] == "ok" and row["stream"] == 1
    assert (row["prompt_tokens"], row["completion_tokens"], row["total_tokens"]) == (7, 1, 8)
    assert row["ttft_ms"] is not None and row["ttft_ms"] <= row["duration_ms"]


def test_client_disconnect_closes_upstream_connection_and_records_abort(scripted, start_meter):
    upstream, server = scripted
    gates = {2: threading.Event()}  # never released: the upstream "generates" forever
    upstream.script = Script(
        headers=[(b"content-type", b"text/event-stream")], chunks=SSE_CHUNKS, gates=gates
    )
    meter = start_meter(server.url)
    with (
        httpx.Client(timeout=10) as client,
        client.stream(
            "POST",
            f"{meter.url}/v1/chat/completions",
            json={"model": "m", "stream": True},
            headers={"Authorization": "Bearer fw-0123456789abcdefghijklmn-abcdefgh"},
        ) as response,
    ):
        got = b""
        chunks = response.iter_raw()
        while len(got) < len(SSE_CHUNKS[0]) + len(SSE_CHUNKS[1]):
            got += next(chunks)
        # leaving the block closes the client's connection mid-stream
    assert upstream.disconnected.wait(5), "meter did not close the upstream connection"
    row = meter.rows(1)[0]
    assert row["outcome"] == "aborted"
    assert row["usage_source"] == "estimated"
    assert row["completion_tokens"] == 2  # ceil(len("Hello") / 4)
    assert row["key_suffix"] == "...efgh"


def test_client_disconnect_while_waiting_for_first_byte(scripted, start_meter):
    upstream, server = scripted
    upstream.script = Script(
        headers=[(b"content-type", b"text/event-stream")], chunks=SSE_CHUNKS, gates={0: threading.Event()}
    )
    meter = start_meter(server.url)
    sock = socket.create_connection(("127.0.0.1", meter.server.port))
    body = b'{"model":"m","stream":true}'
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    wait_for(lambda: upstream.received, message="upstream to get the request")
    sock.close()
    assert upstream.disconnected.wait(5)
    row = meter.rows(1)[0]
    assert row["outcome"] == "aborted"
    assert row["usage_source"] == "missing"
    assert row["prompt_tokens"] is None and row["completion_tokens"] is None


def test_record_is_emitted_before_the_client_can_see_its_response_complete(scripted, start_meter):
    """A crash right after the client got its last byte must not lose the record: meter appends it to
    the journal before it sends the byte that completes the response (no waiting needed below)."""
    upstream, server = scripted
    body = b'{"id":"x","model":"m","usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}}'
    upstream.script = Script(
        headers=[(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        chunks=[body[:20], body[20:]],
    )
    meter = start_meter(server.url)
    assert httpx.post(f"{meter.url}/v1/chat/completions", json={"model": "m"}).content == body
    assert len(meter.durable()) == 1

    upstream.script = Script(headers=[(b"content-type", b"text/event-stream")], chunks=SSE_CHUNKS)
    with httpx.Client() as client, client.stream("POST", f"{meter.url}/v1/chat/completions", json={}) as r:
        assert b"".join(r.iter_raw()) == b"".join(SSE_CHUNKS)
    assert len(meter.durable()) == 2

    # The openai SDK stops reading a stream at "data: [DONE]": an upstream that keeps the connection
    # open after it (a keep-alive comment it has not sent yet) must not delay the record past that.
    held = threading.Event()
    upstream.script = Script(
        headers=[(b"content-type", b"text/event-stream")],
        chunks=[*SSE_CHUNKS, b": keep-alive\n\n"],
        gates={len(SSE_CHUNKS): held},
    )
    client = openai.OpenAI(base_url=f"{meter.url}/v1", api_key="fw_any_key_0000", max_retries=0)
    try:
        chunks = list(client.chat.completions.create(model="m", messages=[], stream=True))
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 1
        assert len(meter.durable()) == 3, "the client saw [DONE] before meter recorded the stream"
    finally:
        held.set()
        client.close()
    rows = meter.rows(3)
    assert [(row["outcome"], row["completion_tokens"]) for row in rows] == [("ok", 2), ("ok", 1), ("ok", 1)]
