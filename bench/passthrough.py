"""``python -m bench.passthrough --upstream URL --port N``: the floor meter's stack could reach.

A reverse proxy on exactly meter's stack — raw ASGI on uvicorn (uvloop + httptools, one process, access
log off) forwarding with one shared aiohttp ``ClientSession`` — that observes, records and measures
nothing. ``python -m bench.run --baseline`` runs it beside meter on meter's core; the difference
between the two is what meter's own work costs.

Rule 1: bytes pass unchanged, as in meter: end-to-end request headers go upstream (aiohttp adds only
        ``Host`` and ``Content-Length``), the response is relayed chunk by chunk as it arrives
        (``iter_any``), not decompressed; hop-by-hop headers are dropped in both directions.
Rule 2: nothing else. No parsing, no metrics, no error mapping beyond a bare 502: any cost added here
        would move the floor.
"""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import uvicorn
import yarl

from meter.serving.gc import settle_collector

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

# The fixed list (RFC 9110 §7.6.1) only: names a Connection header lists are not looked for here.
HOP_BY_HOP = frozenset(
    b"connection keep-alive proxy-connection proxy-authenticate proxy-authorization te trailer "
    b"transfer-encoding upgrade".split()
)
_REQUEST_DROP = HOP_BY_HOP | {b"host", b"content-length", b"expect"}
_SKIP_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")


class PassThrough:
    """The ASGI app: ``lifespan`` opens and closes the session, ``http`` forwards one request."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.session: aiohttp.ClientSession | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._forward(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self._lifespan(receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.session = aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(limit=1000),
                    timeout=aiohttp.ClientTimeout(total=None, sock_read=600),
                    auto_decompress=False,
                    skip_auto_headers=_SKIP_AUTO_HEADERS,
                    cookie_jar=aiohttp.DummyCookieJar(),
                )
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.session is not None:
                    await self.session.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _forward(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert self.session is not None, "lifespan startup did not run"
        body = b""
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        target = scope["raw_path"] + (b"?" + scope["query_string"] if scope["query_string"] else b"")
        headers = [
            (name.decode("latin-1"), value.decode("latin-1"))
            for name, value in scope["headers"]
            if name not in _REQUEST_DROP
        ]
        try:
            response = await self.session.request(
                scope["method"],
                yarl.URL(self.upstream + target.decode("latin-1"), encoded=True),
                headers=headers,
                data=body or None,
                allow_redirects=False,
            )
        except (aiohttp.ClientError, TimeoutError):
            await send({"type": "http.response.start", "status": 502, "headers": []})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": response.status,
                    "headers": [(n, v) for n, v in response.raw_headers if n.lower() not in HOP_BY_HOP],
                }
            )
            async for chunk in response.content.iter_any():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except BaseException:
            response.close()  # not read to the end (client gone): drop the connection, do not pool it
            raise
        response.release()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.passthrough", description=__doc__)
    parser.add_argument("--upstream", required=True, help="base URL requests are forwarded to")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args(argv)
    # The same server options and collector settings as ``meter serve``, so the two differ only in
    # the app.
    settle_collector()
    uvicorn.run(
        PassThrough(args.upstream),
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        access_log=False,
        server_header=False,
        date_header=False,
        proxy_headers=False,
        log_level="warning",
        backlog=4096,
    )


if __name__ == "__main__":
    main()
