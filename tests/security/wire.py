"""A raw HTTP/1.1 client on a socket, for tests that send what no HTTP library would: heads that never
end, too many headers, silence. It reads responses with just enough parsing for meter's answers."""

from __future__ import annotations

import json
import select
import socket
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def error(self) -> dict[str, Any]:
        """The OpenAI error object of a JSON error answer."""
        assert self.headers.get("content-type") == "application/json", self.headers
        document = json.loads(self.body)
        assert set(document) == {"error"} and set(document["error"]) == {"message", "type", "param", "code"}
        return dict(document["error"])


@dataclass(eq=False)  # one per connection, hashable by identity
class Wire:
    sock: socket.socket
    buffer: bytes = field(default=b"")

    @classmethod
    def open(cls, host: str, port: int, timeout: float = 10.0) -> Wire:
        sock = socket.create_connection((host, port), timeout=timeout)
        return cls(sock)

    def send(self, data: bytes) -> bool:
        """Send all of ``data``; False when the server closed the connection first."""
        try:
            self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            return False
        return True

    def _fill(self) -> bool:
        chunk = self.sock.recv(65536)
        self.buffer += chunk
        return bool(chunk)

    def response(self) -> Response:
        while b"\r\n\r\n" not in self.buffer:
            if not self._fill():
                raise AssertionError(f"connection closed before a response head: {self.buffer!r}")
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if "content-length" in headers:
            size = int(headers["content-length"])
            while len(self.buffer) < size:
                if not self._fill():
                    raise AssertionError("connection closed inside a response body")
            body, self.buffer = self.buffer[:size], self.buffer[size:]
        else:
            assert headers.get("transfer-encoding") == "chunked", headers
            body = self._chunked()
        return Response(int(status_line.split(" ")[1]), headers, body)

    def _chunked(self) -> bytes:
        body = b""
        while True:
            while b"\r\n" not in self.buffer:
                if not self._fill():
                    raise AssertionError("connection closed inside a chunked body")
            size_line, self.buffer = self.buffer.split(b"\r\n", 1)
            size = int(size_line.split(b";")[0], 16)
            while len(self.buffer) < size + 2:
                if not self._fill():
                    raise AssertionError("connection closed inside a chunk")
            body += self.buffer[:size]
            self.buffer = self.buffer[size + 2 :]
            if size == 0:
                return body

    def closed(self) -> bytes:
        """Wait until the server closes the connection (a FIN, not a reset); return what came first."""
        while True:
            try:
                if not self._fill():
                    rest, self.buffer = self.buffer, b""
                    return rest
            except ConnectionResetError:
                raise AssertionError(f"the server reset the connection after {self.buffer!r}") from None

    def readable(self, timeout: float) -> bool:
        # poll, not select: a long test run holds file descriptors past select()'s limit of 1024
        poller = select.poll()
        poller.register(self.sock, select.POLLIN)
        return bool(poller.poll(timeout * 1000))

    def close(self) -> None:
        self.sock.close()


def request(path: str = "/healthz", *headers: bytes, method: bytes = b"GET", body: bytes = b"") -> bytes:
    lines = [method + b" " + path.encode() + b" HTTP/1.1", b"host: meter", *headers]
    if body or method == b"POST":
        lines.append(b"content-length: %d" % len(body))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def elapsed_since(start: float) -> float:
    return time.monotonic() - start


# The server's clock for a deadline starts when it accepts, which can be before the client's; and
# libuv's timers count whole milliseconds from the loop's cached time.
CLOCK_SLACK = 0.02


def not_before(deadline: float, start: float) -> bool:
    """Whether at least ``deadline`` seconds passed since ``start``, as far as two clocks can tell."""
    return elapsed_since(start) >= deadline - CLOCK_SLACK
