"""HTTP/1.1 by hand, for requests no client library would send (odd targets, repeated or non-ASCII
headers), and a canary listener that notices any connection made to it."""

from __future__ import annotations

import json
import socket
import threading
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit


@dataclass
class RawResponse:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def header(self, name: bytes) -> bytes | None:
        return next((v for n, v in self.headers if n.lower() == name), None)

    def error(self) -> dict[str, Any]:
        """The OpenAI-shaped error of a JSON answer (asserts it has that shape)."""
        assert self.header(b"content-type") == b"application/json", self.headers
        error = json.loads(self.body)["error"]
        assert set(error) == {"message", "type", "param", "code"}, error
        assert error["message"]
        return error  # type: ignore[no-any-return]


def raw_request(
    url: str,
    target: bytes,
    *,
    method: bytes = b"POST",
    headers: list[tuple[bytes, bytes]] | None = None,
    body: bytes = b"",
    timeout: float = 10.0,
) -> RawResponse:
    """Send one request exactly as given (plus Host, Content-Length and Connection: close) to the
    server at ``url`` and read its whole answer."""
    parts = urlsplit(url)
    head = [method + b" " + target + b" HTTP/1.1", b"Host: " + parts.netloc.encode()]
    head += [name + b": " + value for name, value in headers or []]
    head += [b"Content-Length: " + str(len(body)).encode(), b"Connection: close"]
    with socket.create_connection((parts.hostname, parts.port), timeout=timeout) as sock:
        sock.sendall(b"\r\n".join(head) + b"\r\n\r\n" + body)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return parse_response(data)


def parse_response(data: bytes) -> RawResponse:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ")[1])
    headers = [tuple(line.split(b": ", 1)) for line in lines[1:]]
    pairs = [(name, value) for name, value in headers]  # type: ignore[misc]
    if any(n.lower() == b"transfer-encoding" and v == b"chunked" for n, v in pairs):
        body = _dechunk(body)
    return RawResponse(status, pairs, body)


def _dechunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, rest = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += rest[:size]
        data = rest[size + 2 :]
    return out


@dataclass
class Canary:
    """A TCP listener on a loopback port that counts the connections made to it."""

    host: str = "127.0.0.1"
    port: int = 0
    connections: int = 0
    _sock: socket.socket | None = field(default=None, repr=False)

    def __enter__(self) -> Canary:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, 0))
        sock.listen(64)
        self.port = sock.getsockname()[1]
        self._sock = sock
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def _accept(self) -> None:
        assert self._sock is not None
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            self.connections += 1
            conn.close()

    def __exit__(self, *exc: object) -> None:
        if self._sock is not None:
            self._sock.close()
