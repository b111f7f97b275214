"""No failure on the forward path escapes as a plain-text 500: every one is an OpenAI-shaped answer and
exactly one record (meter.forward.handler)."""

from __future__ import annotations

import socket
import time

import pytest

from meter.forward.handler import Proxy
from meter.records import UsageRecord
from meter.tenancy.identity import KeyFingerprinter
from tests.security.rawhttp import parse_response, raw_request
from tests.support.serve import serve_in_thread

AUTH = (b"Authorization", b"Bearer fw-errors-test-key-0123456789")


class BrokenUpstream:
    """An upstream client with a bug: ``send`` raises something meter.forward.upstream never maps."""

    async def start(self) -> None: ...

    async def send(self, method, url, headers, body):  # type: ignore[no-untyped-def]
        raise RuntimeError("a bug in an upstream client")

    async def aclose(self) -> None: ...


@pytest.mark.integration
def test_a_fault_inside_meter_is_an_openai_500_and_one_record():
    records: list[UsageRecord] = []
    proxy = Proxy(
        upstream=BrokenUpstream(),
        upstream_url="http://127.0.0.1:9",
        fingerprinter=KeyFingerprinter(b"0123456789abcdef"),
        emit=records.append,
        max_request_bytes=1024,
    )
    with serve_in_thread(proxy) as server:
        response = raw_request(server.url, b"/v1/chat/completions", headers=[AUTH], body=b'{"model": "m"}')
    assert response.status == 500
    error = response.error()
    assert error["code"] == "internal_error" and "a bug" not in error["message"]
    assert len(records) == 1
    record = records[0]
    assert (record.status_code, record.outcome.value, record.requested_model) == (500, "proxy_error", "m")


def test_a_client_that_stops_sending_its_body_gets_408_and_a_record(start_meter, simulator):
    meter = start_meter(simulator.url, client_body_timeout=0.3)
    with socket.create_connection((meter.server.host, meter.server.port), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer fw-k\r\nContent-Length: 100\r\n\r\n" + b'{"model": "m", '
        )
        started = time.monotonic()
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
            if b"\r\n\r\n" in data and data.endswith(b"}"):
                break
        waited = time.monotonic() - started
    response = parse_response(data)
    assert response.status == 408
    assert response.error()["code"] == "request_timeout"
    assert 0.25 < waited < 5
    row = meter.rows(1)[0]
    assert (row["status_code"], row["outcome"]) == (408, "proxy_error")
    assert len(simulator.sim.received) == 0
