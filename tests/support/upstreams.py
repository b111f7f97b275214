"""A scripted upstream for byte-exact transparency tests: it records exactly what it received and answers
with exactly the bytes a test gives it, optionally pausing between chunks until the test releases it."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Received:
    method: str
    path: str
    raw_path: bytes
    query_string: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes


@dataclass
class Script:
    status: int = 200
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    chunks: list[bytes] = field(default_factory=list)
    # gates[i] is set by the test to let chunk i out; a missing entry means "send at once"
    gates: dict[int, threading.Event] = field(default_factory=dict)


class ScriptedUpstream:
    def __init__(self) -> None:
        self.received: list[Received] = []
        self.script = Script()
        self.disconnected = threading.Event()
        self.on_request: Callable[[Received], None] | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        request = Received(
            scope["method"],
            scope["path"],
            scope.get("raw_path") or b"",
            scope["query_string"],
            list(scope["headers"]),
            body,
        )
        self.received.append(request)
        script = self.script
        watcher = asyncio.ensure_future(_wait_disconnect(receive))
        try:
            await send({"type": "http.response.start", "status": script.status, "headers": script.headers})
            for index, chunk in enumerate(script.chunks):
                gate = script.gates.get(index)
                while gate is not None and not gate.is_set():
                    if watcher.done():  # the proxy hung up on us
                        self.disconnected.set()
                        return
                    await asyncio.sleep(0.005)  # polls a threading.Event the test sets
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            watcher.cancel()


async def _wait_disconnect(receive: Any) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
