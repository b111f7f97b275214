"""The upstream client: one shared keep-alive connection pool, responses streamed chunk by chunk.

Two interchangeable clients sit behind :class:`Upstream` (setting ``METER_UPSTREAM_CLIENT``):

* ``aiohttp`` (default): aiohttp's client directly. The fastest on the benchmark
  (docs/performance.md), which is why the forward path uses it rather than httpx's default transport.
* ``httpx``: httpx with its default (httpcore) transport, the documented alternative.

Rule 1: bytes pass unchanged. No client adds headers of its own beyond ``Host`` and ``Content-Length``
        (which describe the same body), and none decompresses the response.
Rule 2: a response not read to the end is closed with its connection (``close(abort=True)``), so an
        upstream generating for a client that left stops at once instead of filling a pooled socket.
Rule 3: third-party exceptions are mapped here to :mod:`meter.errors`; nothing above this module
        knows which client is in use.
Rule 4 (the upstream may be hostile): a response head is bounded as nginx bounds one: a status line
        or header field over 8190 bytes, or more than 128 header fields, is refused
        (:class:`~meter.errors.UpstreamProtocolError`, 502) with either client: aiohttp's parser
        enforces them; with httpx, h11 refuses only a head over httpcore's 100 KiB, so the same
        limits are checked here once the head is in (h11 has parsed it by then: ~30 ms for 14,000
        one-byte fields on a slow machine; aiohttp's C parser stops at the 129th). A body
        is handed on in chunks of at most 64 KiB: a larger read is sliced, and the event loop runs
        its other tasks between slices, so that the proxy's work on one chunk (relaying it, and
        meter.tap.observer's bounded step) is bounded whatever one read of the socket held.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Protocol

import aiohttp
import yarl

from meter.errors import UpstreamError, UpstreamProtocolError, UpstreamTimeout, UpstreamUnreachable

if TYPE_CHECKING:
    import httpx  # imported when an httpx client is configured: ~7 MB the default path does not need


class UpstreamResponse(Protocol):
    @property
    def status(self) -> int: ...

    @property
    def headers(self) -> Sequence[tuple[bytes, bytes]]:
        """As received: original case, order and repeats."""
        ...

    def chunks(self) -> AsyncIterator[bytes]: ...

    async def close(self, *, abort: bool) -> None: ...


class Upstream(Protocol):
    async def start(self) -> None: ...

    async def send(
        self, method: str, url: str, headers: list[tuple[str, str]], body: bytes
    ) -> UpstreamResponse: ...

    async def aclose(self) -> None: ...


MAX_LINE = 8190  # bytes of the status line (aiohttp's default, nginx's large header buffer)
MAX_FIELD = 8190  # bytes of one header field
MAX_HEADERS = 128  # header fields of a response head
MAX_CHUNK = 64 * 1024  # bytes of a body chunk handed on (Rule 4)


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) < 300 else text[:297] + "..."


def _too_many_headers(count: int) -> UpstreamProtocolError:
    return UpstreamProtocolError(
        f"upstream sent an invalid HTTP response: {count} header fields, more than {MAX_HEADERS}"
    )


def _httpx_head_problem(response: httpx.Response) -> str | None:
    """What is wrong with a head httpx accepted, by aiohttp's limits (Rule 4), or None."""
    raw = response.headers.raw
    if len(raw) > MAX_HEADERS:
        return f"{len(raw)} header fields, more than {MAX_HEADERS}"
    if any(len(name) + len(value) + 2 > MAX_FIELD for name, value in raw):
        return f"a header field over {MAX_FIELD} bytes"
    if len(response.extensions.get("reason_phrase", b"")) + 13 > MAX_LINE:
        return f"a status line over {MAX_LINE} bytes"
    return None


async def _sliced(chunk: bytes) -> AsyncIterator[bytes]:
    """``chunk`` in pieces of at most MAX_CHUNK bytes, letting the event loop run between them."""
    for start in range(0, len(chunk), MAX_CHUNK):
        if start:
            await asyncio.sleep(0)
        yield chunk[start : start + MAX_CHUNK]


# aiohttp ---------------------------------------------------------------------------------------

_SKIP_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")


class _AiohttpResponse:
    __slots__ = ("_response", "headers", "status")

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self.status = response.status
        self.headers = response.raw_headers

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.content.iter_any():
                if len(chunk) <= MAX_CHUNK:
                    yield chunk
                else:
                    async for piece in _sliced(chunk):
                        yield piece
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise UpstreamTimeout(f"upstream stopped sending mid-response: {_describe(exc)}") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamUnreachable(f"upstream connection broke mid-response: {_describe(exc)}") from exc

    async def close(self, *, abort: bool) -> None:
        if abort:
            self._response.close()
        else:
            self._response.release()


# aiohttp counts header fields from 3.13 on (and refuses more than 128 by default); older ones do not
_AIOHTTP_LIMITS: dict[str, int] = {"max_line_size": MAX_LINE, "max_field_size": MAX_FIELD}
if "max_headers" in inspect.signature(aiohttp.ClientSession).parameters:
    _AIOHTTP_LIMITS["max_headers"] = MAX_HEADERS


class AiohttpUpstream:
    def __init__(self, *, connect_timeout: float, read_timeout: float, max_connections: int) -> None:
        self._timeout = aiohttp.ClientTimeout(total=None, connect=connect_timeout, sock_read=read_timeout)
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=self._max_connections, ttl_dns_cache=300)
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=self._timeout,
            auto_decompress=False,
            skip_auto_headers=_SKIP_AUTO_HEADERS,
            cookie_jar=aiohttp.DummyCookieJar(),  # a proxy must not keep one client's cookies for the next
            **_AIOHTTP_LIMITS,  # type: ignore[arg-type]
        )

    async def send(
        self, method: str, url: str, headers: list[tuple[str, str]], body: bytes
    ) -> UpstreamResponse:
        assert self._session is not None, "AiohttpUpstream.start() was not awaited"
        try:
            response = await self._session.request(
                method,
                yarl.URL(url, encoded=True),  # encoded=True: the client's percent-encoding is kept as sent
                headers=headers,
                data=body or None,
                allow_redirects=False,
            )
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise UpstreamTimeout(f"upstream did not respond in time: {_describe(exc)}") from exc
        except aiohttp.ClientResponseError as exc:
            raise UpstreamProtocolError(f"upstream sent an invalid HTTP response: {_describe(exc)}") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamUnreachable(f"cannot reach upstream: {_describe(exc)}") from exc
        if len(response.raw_headers) > MAX_HEADERS:  # an aiohttp that does not count them (Rule 4)
            response.close()
            raise _too_many_headers(len(response.raw_headers))
        return _AiohttpResponse(response)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


# httpx -----------------------------------------------------------------------------------------


class _HttpxResponse:
    __slots__ = ("_response", "headers", "status")

    def __init__(self, response: httpx.Response) -> None:
        self._response = response
        self.status = response.status_code
        self.headers = response.headers.raw

    async def chunks(self) -> AsyncIterator[bytes]:
        import httpx

        try:
            async for chunk in self._response.aiter_raw():
                if len(chunk) <= MAX_CHUNK:
                    yield chunk
                else:  # a read larger than meter hands on in one piece (meter.tap.observer, Rule 6)
                    async for piece in _sliced(chunk):
                        yield piece
        except httpx.TimeoutException as exc:
            raise UpstreamTimeout(f"upstream stopped sending mid-response: {_describe(exc)}") from exc
        except httpx.HTTPError as exc:
            raise UpstreamUnreachable(f"upstream connection broke mid-response: {_describe(exc)}") from exc

    async def close(self, *, abort: bool) -> None:
        # httpx closes (rather than pools) a connection whose response was not read to the end.
        await self._response.aclose()


class HttpxUpstream:
    def __init__(self, *, connect_timeout: float, read_timeout: float, max_connections: int) -> None:
        import httpx

        self._timeout = httpx.Timeout(
            connect=connect_timeout, read=read_timeout, write=read_timeout, pool=None
        )
        self._limits = httpx.Limits(
            max_connections=max_connections, max_keepalive_connections=max_connections
        )
        self._client: httpx.AsyncClient | None = None

    async def start(self) -> None:
        import httpx

        transport = httpx.AsyncHTTPTransport(limits=self._limits)
        self._client = httpx.AsyncClient(transport=transport, timeout=self._timeout, follow_redirects=False)

    async def send(
        self, method: str, url: str, headers: list[tuple[str, str]], body: bytes
    ) -> UpstreamResponse:
        import httpx

        assert self._client is not None, "HttpxUpstream.start() was not awaited"
        # httpx.Request directly, not client.build_request(): the client's default headers would be added.
        # Bytes: httpx encodes text header values as ASCII and refuses the rest (meter.forward.headers,
        # Rule 4).
        raw = [(name.encode(), value.encode()) for name, value in headers]
        request = httpx.Request(method, url, headers=raw, content=body)
        try:
            response = await self._client.send(request, stream=True)
        except httpx.TimeoutException as exc:
            raise UpstreamTimeout(f"upstream did not respond in time: {_describe(exc)}") from exc
        except httpx.RemoteProtocolError as exc:
            raise UpstreamProtocolError(f"upstream sent an invalid HTTP response: {_describe(exc)}") from exc
        except httpx.HTTPError as exc:
            raise UpstreamUnreachable(f"cannot reach upstream: {_describe(exc)}") from exc
        problem = _httpx_head_problem(response)
        if problem is not None:  # h11 bounds only the head's whole size (Rule 4)
            await response.aclose()
            raise UpstreamProtocolError(f"upstream sent an invalid HTTP response: {problem}")
        return _HttpxResponse(response)

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()


def create_upstream(
    client: str, *, connect_timeout: float, read_timeout: float, max_connections: int
) -> Upstream:
    if client == "aiohttp":
        return AiohttpUpstream(
            connect_timeout=connect_timeout, read_timeout=read_timeout, max_connections=max_connections
        )
    if client == "httpx":
        return HttpxUpstream(
            connect_timeout=connect_timeout, read_timeout=read_timeout, max_connections=max_connections
        )
    raise ValueError(f"unknown upstream client {client!r}")


__all__ = ["Upstream", "UpstreamError", "UpstreamResponse", "create_upstream"]
