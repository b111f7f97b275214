"""A hostile upstream: a raw TCP server on a loopback port that answers every request with exactly the
bytes a test gives it, including ones no HTTP library would send (a head too large, a body that stops
halfway, an answer that never comes), and notices when the proxy hangs up on it."""

from __future__ import annotations

import asyncio
import threading
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

MiB = 1024 * 1024


@dataclass
class Reply:
    """What the upstream writes: ``head`` (status line and headers, up to and including the blank
    line), then each of ``body`` in turn, ``pace`` seconds apart (shaping the traffic, not
    synchronising: a bomb relayed over a while), after ``gate`` is set if there is one (before the
    body). Then ``end``: "close" the connection, or "hang" silent with it open until the proxy hangs
    up."""

    head: bytes = b""
    body: Iterable[bytes] = ()
    pace: float = 0.0
    gate: threading.Event | None = None
    end: str = "close"


def head(status: int = 200, headers: Iterable[tuple[str, str]] = (), *, chunked: bool = True) -> bytes:
    lines = [f"HTTP/1.1 {status} OK", *(f"{name}: {value}" for name, value in headers)]
    if chunked:
        lines.append("Transfer-Encoding: chunked")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def chunked(pieces: Iterable[bytes], *, last: bool = True) -> Iterator[bytes]:
    """``pieces`` in HTTP/1.1 chunked framing (and the terminating chunk if ``last``)."""
    for piece in pieces:
        if piece:
            yield b"%x\r\n%s\r\n" % (len(piece), piece)
    if last:
        yield b"0\r\n\r\n"


def gzip_pieces(parts: Iterable[bytes], *, flush: bool = True) -> Iterator[bytes]:
    """One gzip stream of ``parts``, a piece each (flushed after each, as a streaming server does)."""
    compressor = zlib.compressobj(6, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    for part in parts:
        piece = compressor.compress(part)
        if flush:
            piece += compressor.flush(zlib.Z_SYNC_FLUSH)
        if piece:
            yield piece
    yield compressor.flush()


@dataclass
class HostileUpstream:
    reply: Reply = field(default_factory=Reply)
    host: str = "127.0.0.1"
    port: int = 0
    requests: list[bytes] = field(default_factory=list)  # each request's head and body, as received
    sent: threading.Event = field(default_factory=threading.Event)  # the whole reply was written
    hung_up: threading.Event = field(default_factory=threading.Event)  # the proxy closed the connection

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await reader.readuntil(b"\r\n\r\n")
            lines = request.lower().split(b"\r\n")
            length = next((int(line[15:]) for line in lines if line.startswith(b"content-length:")), 0)
            self.requests.append(request + await reader.readexactly(length))
            reply = self.reply
            if reply.head:
                writer.write(reply.head)
                await writer.drain()
            if reply.gate is not None:
                await asyncio.to_thread(reply.gate.wait, 30)
            for piece in reply.body:
                writer.write(piece)
                await writer.drain()
                if reply.pace:
                    await asyncio.sleep(reply.pace)
            self.sent.set()
            if reply.end == "hang":
                while await reader.read(65536):
                    pass
                self.hung_up.set()
        except (ConnectionError, asyncio.IncompleteReadError):
            self.hung_up.set()
        finally:
            writer.close()

    @contextmanager
    def running(self) -> Iterator[HostileUpstream]:
        loop = asyncio.new_event_loop()
        started = threading.Event()
        server: asyncio.Server | None = None

        async def start() -> None:
            nonlocal server
            server = await asyncio.start_server(self._serve, self.host, 0)
            self.port = server.sockets[0].getsockname()[1]
            started.set()

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.run_until_complete(start())
            loop.run_forever()

        thread = threading.Thread(target=run, name="hostile-upstream", daemon=True)
        thread.start()
        if not started.wait(10):
            raise RuntimeError("hostile upstream did not start")
        try:
            yield self
        finally:

            async def stop() -> None:
                assert server is not None
                server.close()
                for task in asyncio.all_tasks():
                    if task is not asyncio.current_task():
                        task.cancel()

            asyncio.run_coroutine_threadsafe(stop(), loop).result(10)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
            loop.close()
