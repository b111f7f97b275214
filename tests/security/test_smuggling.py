"""Request smuggling: ambiguous framing never makes meter forward a request the client hid in another
one's body. meter reads each request body whole and sends the upstream a freshly framed request, so the
upstream sees at most what meter itself parsed; ambiguous heads are refused by the HTTP server
(400 ``malformed_request``, meter.serving.guard)."""

from __future__ import annotations

import socket

import pytest

from tests.security.rawhttp import parse_response

SMUGGLED = b"GET /v1/smuggled HTTP/1.1\r\nHost: x\r\n\r\n"


def exchange(url: str, data: bytes) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := sock.recv(65536):
            out += chunk
    return out


@pytest.mark.parametrize(
    "head",
    [
        # CL.TE: Content-Length and Transfer-Encoding together
        b"Content-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + SMUGGLED,
        # TE.CL, with an obfuscated Transfer-Encoding
        b"Transfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n5c\r\n" + SMUGGLED + b"\r\n0\r\n\r\n",
        b"Transfer-Encoding: xchunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n" + SMUGGLED,
        b"Transfer-Encoding : chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n" + SMUGGLED,
        b"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n0\r\n\r\n" + SMUGGLED,
        # two different Content-Lengths
        b"Content-Length: 0\r\nContent-Length: 44\r\n\r\n" + SMUGGLED,
        # an obsolete line fold hiding a header
        b"X-Note: a\r\n Transfer-Encoding: chunked\r\nContent-Length: 0\r\n\r\n" + SMUGGLED,
        # bare LF line endings, a NUL in a header
        b"Content-Length: 0\n\n" + SMUGGLED,
        b"X-Note: a\x00b\r\nContent-Length: 0\r\n\r\n" + SMUGGLED,
    ],
    ids=["cl-te", "te-cl", "te-xchunked", "te-space", "te-twice", "cl-twice", "obs-fold", "bare-lf", "nul"],
)
def test_ambiguous_framing_never_forwards_a_hidden_request(meter, simulator, head):
    answer = exchange(
        meter.url,
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer fw-smuggler\r\n" + head,
    )
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:100]  # refused by the HTTP server's parser
    assert answer.count(b"HTTP/1.1 ") == 1  # and the connection closed: nothing after it is read
    assert parse_response(answer).error()["code"] == "malformed_request"
    assert list(simulator.sim.received) == []
