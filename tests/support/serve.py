"""Run a real ASGI app on a loopback socket in a background thread, for tests that need real
streaming, client disconnects and back-pressure (TestClient and ASGITransport buffer bodies).

Given ``settings``, the server runs as ``meter serve`` runs it (:func:`meter.serving.options.uvicorn_options`:
meter's HTTP protocol with its connection limits, on uvloop); without, uvicorn's own httptools protocol
on asyncio.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import uvicorn

from meter.serving.options import uvicorn_options
from meter.settings import Settings


@dataclass
class RunningServer:
    server: uvicorn.Server
    thread: threading.Thread
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


@contextmanager
def serve_in_thread(
    app: Any, *, lifespan: str = "auto", timeout: float = 10.0, settings: Settings | None = None
) -> Iterator[RunningServer]:
    options = {"loop": "asyncio", "http": "httptools"} if settings is None else uvicorn_options(settings)
    options.update(lifespan=lifespan, log_level="warning")
    config = uvicorn.Config(app, host="127.0.0.1", port=0, **options)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="test-server", daemon=True)
    thread.start()
    started = threading.Event()

    def _poll() -> None:
        while not server.started and thread.is_alive():
            threading.Event().wait(0.01)
        started.set()

    threading.Thread(target=_poll, daemon=True).start()
    if not started.wait(timeout) or not server.started:
        server.should_exit = True
        raise RuntimeError("test server did not start")
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield RunningServer(server, thread, "127.0.0.1", port)
    finally:
        server.should_exit = True
        thread.join(timeout)
        if thread.is_alive():  # a server left running would outlive its test's database and ports
            raise RuntimeError(f"test server did not stop within {timeout} s")
