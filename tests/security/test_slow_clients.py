"""Slow and abusive clients against meter's serving edge (meter.serving.guard), on a real loopback socket
behind the server configuration `meter serve` uses: oversized and endless heads, too many headers, heads
that never finish, idle keep-alives, more connections than allowed; and the normal client unaffected."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from prometheus_client import CollectorRegistry

from meter.app import create_app
from meter.errors import SettingsError
from meter.settings import load_settings
from meter.simulator import SimulatorConfig, create_simulator
from tests.conftest import wait_for
from tests.security.wire import Wire, not_before, request
from tests.support.serve import RunningServer, serve_in_thread

KEY = b"authorization: Bearer fw-edge-key-0001"
CHAT = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}).encode()


@pytest.fixture(scope="module")
def upstream() -> Iterator[RunningServer]:
    """One simulator for the module (each test starts its own meter, with its own limits)."""
    with serve_in_thread(create_simulator(SimulatorConfig())) as server:
        yield server


@pytest.fixture
def edge(tmp_path: Path, upstream: RunningServer) -> Iterator[Callable[..., RunningServer]]:
    """Start a meter served as `meter serve` serves it, with these settings (typed values)."""
    with ExitStack() as stack:

        def start(**overrides: Any) -> RunningServer:
            db = tmp_path / f"meter-{len(stack._exit_callbacks)}.db"
            environ = {"METER_DATABASE_URL": f"sqlite:///{db}", "METER_UPSTREAM_URL": upstream.url}
            settings = load_settings(environ, **overrides)
            app = create_app(settings, registry=CollectorRegistry())
            return stack.enter_context(serve_in_thread(app, lifespan="on", settings=settings))

        yield start


def wire(server: RunningServer) -> Wire:
    return Wire.open(server.host, server.port)


# Rule 1: the head's size and its header count


def test_an_oversized_head_is_answered_431_in_the_openai_shape(edge):
    server = edge(max_request_head_bytes=4096)
    client = wire(server)
    client.send(request("/v1/chat/completions", KEY, b"x-padding: " + b"a" * 5000, method=b"POST", body=CHAT))
    answer = client.response()
    assert answer.status == 431 and answer.headers["connection"] == "close"
    assert answer.error()["code"] == "request_header_fields_too_large"
    assert answer.error()["type"] == "invalid_request_error"
    assert "4096 bytes" in answer.error()["message"]
    assert client.closed() == b""


def test_a_head_that_never_ends_is_refused_once_past_the_limit_not_at_the_deadline(edge):
    """Megabytes of header value, sent in pieces with no end of line: refused while still arriving."""
    server = edge(max_request_head_bytes=8192, client_header_timeout=60.0)
    client = wire(server)
    assert client.send(b"GET /healthz HTTP/1.1\r\nhost: meter\r\nx-endless: ")
    sent = 0
    while not client.readable(0) and client.send(b"a" * 1024):
        sent += 1024
        assert sent < 64 * 1024 * 1024, "no answer while the head kept coming"
    answer = client.response()  # the head never ended: the answer came while it was arriving
    assert answer.status == 431 and answer.error()["code"] == "request_header_fields_too_large"
    client.close()


def test_a_head_within_the_limit_is_served(edge):
    server = edge(max_request_head_bytes=8192)
    client = wire(server)
    client.send(request("/healthz", b"x-padding: " + b"a" * 7000))
    assert client.response().status == 200


def test_too_many_header_fields_are_answered_431(edge):
    server = edge(max_request_headers=20)
    fields = [b"x-field-%d: 1" % i for i in range(21)]  # with host: 22 fields
    client = wire(server)
    client.send(request("/healthz", *fields))
    answer = client.response()
    assert answer.status == 431 and answer.error()["code"] == "request_header_fields_too_large"
    assert "20 header fields" in answer.error()["message"]
    assert client.closed() == b""
    within = wire(server)
    within.send(request("/healthz", *fields[:19]))  # with host: 20
    assert within.response().status == 200


# Rule 2: the head's deadline


def test_a_head_that_never_finishes_gets_408_at_the_deadline(edge):
    server = edge(client_header_timeout=0.3)
    client = wire(server)
    start = time.monotonic()
    client.send(b"POST /v1/chat/completions HTTP/1.1\r\nhost: meter\r\ncontent-type: appl")
    answer = client.response()
    assert not_before(0.3, start)
    assert answer.status == 408 and answer.headers["connection"] == "close"
    assert answer.error()["code"] == "request_timeout"
    assert client.closed() == b""


def test_a_head_trickled_a_byte_at_a_time_is_cut_at_the_deadline(edge):
    """The deadline is for the whole head, however steadily its bytes arrive."""
    server = edge(client_header_timeout=0.3)
    client = wire(server)
    start = time.monotonic()
    client.send(b"GET /healthz HTTP/1.1\r\nx-slow: ")
    while not client.readable(0.02):
        assert client.send(b"a"), "closed without an answer"
    answer = client.response()
    assert not_before(0.3, start)
    assert answer.status == 408


def test_a_connection_that_sends_nothing_is_closed_at_the_deadline_without_an_answer(edge):
    server = edge(client_header_timeout=0.3)
    client = wire(server)
    start = time.monotonic()
    assert client.closed() == b""
    assert not_before(0.3, start)


def test_the_deadline_restarts_for_each_head_of_a_kept_alive_connection(edge):
    """A second head that starts late (after the first head's deadline) is still served, and its own
    deadline runs from its first byte."""
    server = edge(client_header_timeout=0.3, client_keepalive_timeout=30.0)
    client = wire(server)
    client.send(request())
    assert client.response().status == 200
    assert not client.readable(0.4)  # idle past one head deadline: still open (keep-alive applies)
    start = time.monotonic()
    client.send(b"GET /healthz HTTP/1.1\r\n")
    answer = client.response()
    assert answer.status == 408 and not_before(0.3, start)


# Rule 3: idle keep-alive


def test_an_idle_keep_alive_connection_is_closed_after_the_timeout(edge):
    server = edge(client_keepalive_timeout=0.3, client_header_timeout=30.0)
    client = wire(server)
    client.send(request())
    assert client.response().status == 200
    start = time.monotonic()
    assert client.closed() == b""  # no answer: nothing was asked
    assert not_before(0.3, start)


def test_a_kept_alive_connection_serves_several_requests(edge):
    server = edge(client_keepalive_timeout=30.0)
    client = wire(server)
    for _ in range(3):
        client.send(request("/v1/chat/completions", KEY, method=b"POST", body=CHAT))
        answer = client.response()
        assert answer.status == 200 and json.loads(answer.body)["usage"]["completion_tokens"] == 3


# Rule 4: connections


def test_connections_beyond_the_limit_get_503_while_existing_ones_keep_working(edge):
    server = edge(max_client_connections=3)
    held = [wire(server) for _ in range(3)]
    for client in held:  # each is the server's: it answered on it
        client.send(request())
        assert client.response().status == 200
    extra = wire(server)
    answer = extra.response()  # answered at once, before any request
    assert answer.status == 503 and answer.headers["retry-after"] == "1"
    assert answer.error() == {
        "message": "meter is holding its maximum of 3 client connections; retry shortly.",
        "type": "api_error",
        "param": None,
        "code": "too_many_connections",
    }
    assert extra.closed() == b""
    for client in held:
        client.send(request("/v1/chat/completions", KEY, method=b"POST", body=CHAT))
        assert client.response().status == 200
    held.pop().close()

    def served() -> bool:
        client = wire(server)
        client.send(request())
        ok = client.response().status == 200
        client.close()
        return ok

    wait_for(served, message="a connection once one closed")


def test_the_openai_sdk_sees_the_503_as_a_retryable_api_error(edge):
    server = edge(max_client_connections=1)
    holder = wire(server)
    holder.send(request())
    assert holder.response().status == 200
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="fw-edge-key-0001", max_retries=0)
    with pytest.raises(openai.APIStatusError) as refused:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    assert refused.value.status_code == 503
    assert refused.value.code == "too_many_connections"


# Rules 5 and 6: bodies and responses are not cut


def test_a_pipelined_oversized_head_does_not_cut_the_response_before_it(edge):
    server = edge(max_request_head_bytes=4096)
    client = wire(server)
    first = request("/v1/chat/completions", KEY, method=b"POST", body=CHAT)
    client.send(first + b"GET /healthz HTTP/1.1\r\nx-padding: " + b"a" * 8000 + b"\r\n\r\n")
    answer = client.response()
    assert answer.status == 200 and json.loads(answer.body)["usage"]["completion_tokens"] == 3
    rest = client.closed()  # nothing more, or a whole 431 after the whole response
    assert rest == b"" or rest.startswith(b"HTTP/1.1 431 ")


def test_an_endless_head_read_together_with_the_request_before_it_is_still_counted(edge):
    """A request and the start of an endless second head in one write: meter reads both at once (one
    read takes up to 256 kB), the second head's bytes counted though the read began inside the first
    message. Refused at once, not held until the deadline."""
    server = edge(max_request_head_bytes=4096, client_header_timeout=60.0)
    client = wire(server)
    first = request("/v1/chat/completions", KEY, method=b"POST", body=CHAT)
    client.send(first + b"GET /healthz HTTP/1.1\r\nhost: meter\r\nx-endless: " + b"a" * 100_000)
    assert client.response().status == 200  # the first request is answered whole...
    rest = client.closed()  # ...then the connection ends, long before the head deadline
    assert rest == b"" or rest.startswith(b"HTTP/1.1 431 ")


def test_a_slow_body_is_not_cut_by_the_head_deadline(edge):
    """The head deadline ends with the head: a body that takes longer is the forward path's business."""
    server = edge(client_header_timeout=0.3)
    client = wire(server)
    head, _, body = request("/v1/chat/completions", KEY, method=b"POST", body=CHAT).partition(b"\r\n\r\n")
    client.send(head + b"\r\n\r\n" + body[:5])
    assert not client.readable(0.6)  # past the head deadline, waiting for the body
    client.send(body[5:])
    assert client.response().status == 200


def test_a_connection_answered_before_its_body_arrived_is_closed_not_drained_forever(edge):
    """meter answers 413 on a declared length at once; the client then sends a little of that body and
    stops. uvicorn alone would go on reading it, with no deadline: its keep-alive timer, armed after the
    response, is cancelled by the body's bytes and never armed again."""
    server = edge(max_request_bytes=1000, client_keepalive_timeout=60.0, client_header_timeout=60.0)
    client = wire(server)
    client.send(b"POST /v1/chat/completions HTTP/1.1\r\nhost: meter\r\ncontent-length: 100000\r\n\r\n")
    answer = client.response()
    assert answer.status == 413
    client.send(b"{" * 100)
    assert client.closed() == b""  # within the linger, not after a minute's timeouts


# Rule 7: slow readers


def established(port: int) -> int:
    """Established connections whose local port is ``port`` (the server's side of each)."""
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "01":
            count += 1
    return count


def test_a_client_that_stops_reading_a_stream_loses_its_connection(edge):
    """A long stream the client does not read: once meter's write buffer has stayed full for the send
    timeout, meter aborts the connection (and the forward path lets the upstream go)."""
    server = edge(client_send_timeout=0.5)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window: meter's buffer fills
    sock.settimeout(10)
    sock.connect((server.host, server.port))
    client = Wire(sock)
    body = json.dumps(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100_000, "stream": True}
    ).encode()
    client.send(request("/v1/chat/completions", KEY, method=b"POST", body=body))
    assert client.readable(10)  # the stream began; from here on the client reads nothing
    wait_for(lambda: established(server.port) == 0, message="meter to drop the connection")
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except ConnectionResetError:
        pass
    assert b"[DONE]" not in received  # cut, not finished
    again = wire(server)
    again.send(request("/v1/chat/completions", KEY, method=b"POST", body=CHAT))
    assert again.response().status == 200


def test_a_slow_but_steady_reader_gets_the_whole_stream(edge):
    """The send timeout is for a buffer that stays full, not for a stream that takes long: a reader that
    pauses now and then fills meter's buffer (20,000 chunks are ~5 MB, past the kernel's send buffer)
    and drains it again, and gets everything (with a deadline well above its pauses, so that a loaded
    machine slowing the reader down does not cut it)."""
    server = edge(client_send_timeout=5.0)
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="fw-edge-key-0001", max_retries=0)
    stream = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=20_000, stream=True
    )
    contents = 0
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            contents += 1
            if contents % 2000 == 0:
                time.sleep(0.1)  # pacing the reader (not synchronising): 1 s of pauses over the stream
    assert contents == 20_000


# The client meter is for


def test_the_openai_sdk_is_unaffected(edge):
    server = edge()
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="fw-edge-key-0001", max_retries=0)
    reply = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi " * 20_000}], max_tokens=4
    )
    assert reply.usage is not None and reply.usage.completion_tokens == 4
    chunks = list(
        client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=5, stream=True
        )
    )
    assert sum(1 for chunk in chunks if chunk.choices and chunk.choices[0].delta.content) == 5
    extra = {f"x-custom-{i}": "v" * 100 for i in range(40)}  # a generous but legal head: ~5 KB, 40 fields
    again = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=2, extra_headers=extra
    )
    assert again.usage is not None and again.usage.completion_tokens == 2


def test_a_slow_upstream_stream_is_not_cut_by_any_client_timeout(edge, tmp_path):
    """The limits are about what the client sends: a stream that outlasts every one of them arrives
    whole."""
    slow = create_simulator(SimulatorConfig(token_delay_ms=100))
    with serve_in_thread(slow) as upstream:
        db = tmp_path / "slow.db"
        settings = load_settings(
            {"METER_DATABASE_URL": f"sqlite:///{db}", "METER_UPSTREAM_URL": upstream.url},
            client_header_timeout=0.2,
            client_keepalive_timeout=0.2,
        )
        app = create_app(settings, registry=CollectorRegistry())
        with serve_in_thread(app, lifespan="on", settings=settings) as server:
            client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="fw-edge-key-0001", max_retries=0)
            stream = client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=6, stream=True
            )
            contents = [c for c in stream if c.choices and c.choices[0].delta.content]
            assert len(contents) == 6  # ~0.6 s of tokens, three times each client timeout


def test_a_malformed_request_is_answered_400_in_the_openai_shape(edge):
    server = edge()
    client = wire(server)
    client.send(b"NOT HTTP AT ALL\r\n\r\n")
    answer = client.response()
    assert answer.status == 400 and answer.error()["code"] == "malformed_request"


def test_refusals_are_counted_by_reason_on_metrics(edge):
    """No usage record can exist for a request that never completed its head: /metrics counts them."""
    server = edge(max_request_head_bytes=4096, client_header_timeout=0.3)
    oversized = wire(server)
    oversized.send(request("/v1/models", KEY, b"x-padding: " + b"a" * 5000))
    assert oversized.response().status == 431
    malformed = wire(server)
    malformed.send(b"NOT HTTP AT ALL\r\n\r\n")
    assert malformed.response().status == 400
    silent = wire(server)
    assert silent.closed() == b""  # closed at the head deadline

    def counts() -> dict[str, float]:
        text = httpx.get(f"{server.url}/metrics").text
        return {
            line.split('"')[1]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("meter_connection_refusals_total{")
        }

    wait_for(lambda: counts()["head_timeout"] >= 1, message="the silent connection's refusal counted")
    assert counts() == {
        "too_many_connections": 0,
        "head_too_large": 1,
        "head_timeout": 1,
        "malformed": 1,
        "send_timeout": 0,
    }


# Settings


@pytest.mark.parametrize(
    "name",
    [
        "METER_MAX_REQUEST_HEAD_BYTES",
        "METER_MAX_REQUEST_HEADERS",
        "METER_CLIENT_HEADER_TIMEOUT",
        "METER_CLIENT_KEEPALIVE_TIMEOUT",
        "METER_CLIENT_SEND_TIMEOUT",
        "METER_MAX_CLIENT_CONNECTIONS",
    ],
)
def test_each_limit_refuses_zero_and_names_itself(name):
    with pytest.raises(SettingsError, match=name):
        load_settings({name: "0"})


def test_the_defaults_are_nginx_like():
    settings = load_settings({})
    assert settings.max_request_head_bytes == 32 * 1024
    assert settings.max_request_headers == 100
    assert settings.client_header_timeout == 60.0
    assert settings.client_keepalive_timeout == 75.0
    assert settings.client_send_timeout == 60.0
    assert settings.max_client_connections == 1024


@pytest.mark.integration
def test_socket_helper_sees_a_reset_as_a_failure():
    """The tests above rely on Wire.closed() telling a graceful close from a reset."""
    listener = socket.create_server(("127.0.0.1", 0))
    client = Wire.open("127.0.0.1", listener.getsockname()[1])
    accepted, _ = listener.accept()
    client.send(b"unread")
    wait_for(lambda: accepted.recv(1, socket.MSG_PEEK), message="the bytes to arrive")
    accepted.close()  # unread input: the kernel resets
    with pytest.raises(AssertionError, match="reset"):
        client.closed()
    listener.close()
