"""ASGI plumbing the simulator needs and no framework provides cheaply: reading a body, answering
JSON, the lifespan handshake, and noticing a client that goes away.

:class:`DisconnectWatch` invariant: once the body is read, the only message ``receive()`` can yield is
``http.disconnect``; a background task awaits it, so waiting for it costs nothing per token, and any
:meth:`DisconnectWatch.sleep` in progress returns at once when it arrives.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

from .shapes import JSON_TYPE

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class DisconnectWatch:
    """Awaits ``http.disconnect`` in the background and cuts short any :meth:`sleep` (see the module)."""

    __slots__ = ("_loop", "_sleeper", "_task", "disconnected")

    def __init__(self, receive: Receive) -> None:
        self.disconnected = False
        self._sleeper: asyncio.Future[None] | None = None
        self._loop = asyncio.get_running_loop()
        self._task = self._loop.create_task(self._watch(receive))

    async def _watch(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self.disconnected = True
        if self._sleeper is not None and not self._sleeper.done():
            self._sleeper.set_result(None)

    async def sleep(self, seconds: float) -> bool:
        """Wait ``seconds``; False as soon as the client is gone."""
        if self.disconnected:
            return False
        future: asyncio.Future[None] = self._loop.create_future()
        self._sleeper = future
        timer = self._loop.call_later(seconds, _resolve, future)
        try:
            await future
        finally:
            timer.cancel()
            self._sleeper = None
        return not self.disconnected

    def close(self) -> None:
        self._task.cancel()


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


async def read_body(receive: Receive) -> bytes | None:
    """The whole request body, or None if the client went away first."""
    message = await receive()
    if message["type"] != "http.request":
        return None
    body: bytes = message.get("body", b"")
    if not message.get("more_body", False):
        return body
    parts = [body]
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        parts.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(parts)


async def send_json(send: Send, status: int, body: bytes, headers: Iterable[tuple[bytes, bytes]]) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [JSON_TYPE, (b"content-length", b"%d" % len(body)), *headers],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
