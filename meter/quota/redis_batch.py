"""The Redis store's script calls, coalesced and pipelined on one connection, in the order they were made.

A busy proxy admits and settles many requests in the same turn of the event loop. Sent one by one through
redis-py's client API, each call pays its whole per-command path: pool checkout under a lock and a
condition, observability hooks, packing, release — ~140 µs of meter's CPU per call on the project's
machine, against ~60 µs for the same EVALSHA written and read on a connection already in hand. So
this module opens one connection as the client's pool would and keeps it: the calls queued since the last
write go out as one pipelined write (packed by hiredis' C ``pack_command``: the same bytes as redis-py's
pure-Python asyncio packer, at a fraction of its cost), written by one writer task, and one reader task
reads the replies as they come. A write does not wait for the replies of the previous one.

Urgent calls (reserves: a request waits on them) are written on the next iteration of the loop
(``call_soon``), after every callback that was already ready, so a call made alone goes out alone, at
once. Deferred calls (settles: nobody waits on them but the settle task) wait up to ``linger`` seconds
for the next urgent call and go out in its write: on this machine every round trip costs each process
a system call and a wake-up (~75 µs of CPU and ~110 µs of the request's time per request, measured
sequentially), and a settle riding with the next request's reserve saves one.

Rule 1 (order): Redis runs the calls in the order they were made, whichever write carries them: one
        connection, one writer, and a batch is queued whole. So a settle made before a reserve is
        applied before it, even when the settle is still waiting for company.
Rule 2: each call keeps its own outcome. A script error fails that call only. A script is loaded (SCRIPT
        LOAD) on each new connection in the write that first calls it, so a restarted Redis knows it
        again; a NOSCRIPT all the same (a SCRIPT FLUSH on a live connection) reloads the script and
        retries that call, which then loses its place in Rule 1's order. An error of the connection
        (refused, reset, no reply within the client's socket timeout of a write: the link's watchdog)
        fails every call written or queued on it that has no reply yet, as it would have failed each
        of them sent alone; the next call opens a new connection.
Rule 3: Redis runs each script atomically whatever the batch; a pipeline without MULTI only saves round
        trips.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from typing import Any

from hiredis import pack_command
from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

DEFAULT_LINGER = 0.005  # seconds a deferred call waits for an urgent one to travel with


def _load_command(script: AsyncScript) -> bytes:
    command: tuple[Any, ...] = ("SCRIPT", "LOAD", script.script)
    packed: bytes = pack_command(command)
    return packed


class _Call:
    __slots__ = ("args", "deferred", "future", "keys", "reloaded", "script")

    def __init__(
        self,
        script: AsyncScript,
        keys: list[str],
        args: list[Any],
        future: asyncio.Future[Any],
        deferred: bool,
    ) -> None:
        self.script, self.keys, self.args, self.future = script, keys, args, future
        self.deferred = deferred
        self.reloaded = False


class _Link:
    """One connection: batches written in order by one writer, replies read in order by one reader.
    Broken by its first connection error, then replaced (the batcher opens a new one)."""

    def __init__(self, batcher: ScriptBatcher) -> None:
        self._batcher = batcher
        self.connection: AbstractConnection | None = None
        self._outbox: deque[list[_Call]] = deque()  # queued, not yet written
        self._inflight: deque[_Call | None] = deque()  # written, no reply yet (None: a SCRIPT LOAD's)
        self._written: deque[float] = deque()  # when each of them was written (loop time)
        self._watchdog: asyncio.TimerHandle | None = None
        self._loaded: set[str] = set()  # scripts loaded on this connection
        self.writer: asyncio.Task[None] | None = None
        self.reader: asyncio.Task[None] | None = None
        self.broken = False
        self.closing = False

    @property
    def busy(self) -> bool:
        return bool(self._outbox or self._inflight)

    def send(self, batch: list[_Call]) -> None:
        self._outbox.append(batch)
        if self.writer is None:
            self.writer = asyncio.ensure_future(self._write())

    async def _write(self) -> None:
        try:
            if self.connection is None:
                connection = self.connection = self._batcher.new_connection()
                await asyncio.wait_for(connection.connect(), self._batcher.connect_timeout)  # type: ignore[no-untyped-call]
            connection = self.connection
            while self._outbox and not self.broken:
                batch = self._outbox.popleft()
                # A script this connection has not loaded yet is loaded in the same write, before its
                # first call: a NOSCRIPT retry would take the call out of Rule 1's order.
                loads = {c.script.sha: c.script for c in batch if c.script.sha not in self._loaded}
                self._loaded.update(loads)
                packed = [_load_command(script) for script in loads.values()]
                packed += [
                    pack_command(("EVALSHA", c.script.sha, len(c.keys), *c.keys, *c.args)) for c in batch
                ]
                self._inflight.extend([None] * len(loads))  # before the write: the reader may be waiting
                self._inflight.extend(batch)
                loop = asyncio.get_running_loop()
                self._written.extend([loop.time()] * (len(loads) + len(batch)))
                if self._watchdog is None and self._batcher.timeout is not None:
                    self._watchdog = loop.call_at(loop.time() + self._batcher.timeout, self._check)
                await connection.send_packed_command(b"".join(packed), check_health=False)
                if self.reader is None and not self.broken:
                    self.reader = asyncio.ensure_future(self._read(connection))
        except Exception as exc:
            self.fail(exc)
        finally:
            self.writer = None

    async def _read(self, connection: AbstractConnection) -> None:
        try:
            while self._inflight and not self.broken:
                try:
                    reply: Any = await connection.read_response()
                except ResponseError as exc:  # a reply like any other: the connection stays in step
                    reply = exc
                call = self._inflight.popleft()
                self._written.popleft()
                if call is None:
                    continue  # a SCRIPT LOAD (if it failed, its calls get NOSCRIPT and retry: Rule 2)
                if isinstance(reply, NoScriptError) and not call.reloaded:
                    # Redis forgot the script on a live connection (SCRIPT FLUSH): load it again in
                    # the next write, with this call, once (Rule 2)
                    call.reloaded = True
                    self._loaded.discard(call.script.sha)
                    self._batcher.requeue(call)
                    continue
                if call.deferred:  # its waiter resumes after the urgent calls read with it
                    asyncio.get_running_loop().call_soon(self._batcher.resolve, call, reply)
                else:
                    self._batcher.resolve(call, reply)
        except Exception as exc:
            self.fail(exc)
        finally:
            self.reader = None

    def _check(self) -> None:
        """The watchdog: the oldest call without a reply may wait ``timeout`` seconds since its write
        (the client's socket timeout, ``METER_QUOTA_TIMEOUT``: one timer per connection instead of
        one per read and write)."""
        self._watchdog = None
        if self.broken or not self._written:
            return
        loop = asyncio.get_running_loop()
        timeout = self._batcher.timeout
        assert timeout is not None
        deadline = self._written[0] + timeout
        if loop.time() >= deadline:
            self.fail(RedisTimeoutError(f"no reply from Redis within {timeout:g}s"))
        else:
            self._watchdog = loop.call_at(deadline, self._check)

    def fail(self, exc: Exception) -> None:
        """Rule 2: the connection is gone; so are the replies of everything written or queued on it."""
        if self.broken:
            return
        self.broken = True
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        calls = [*self._inflight, *(call for batch in self._outbox for call in batch)]
        self._inflight.clear()
        self._written.clear()
        self._outbox.clear()
        for call in calls:
            if call is not None and not call.future.done():
                call.future.set_exception(exc)
        if not self.closing:
            self._batcher.retire(self)

    async def aclose(self, timeout: float) -> None:
        """Wait (at most ``timeout``) for the replies of what was sent, then close the connection."""
        if self.closing:
            return
        self.closing = True
        if not self.broken:
            deadline = asyncio.get_running_loop().time() + timeout
            while self.busy and (left := deadline - asyncio.get_running_loop().time()) > 0:
                # (the writer starts the reader: look again after each task ends)
                running = [t for t in (self.writer, self.reader) if t is not None]
                if not running:
                    break
                await asyncio.wait(running, timeout=left, return_when=asyncio.FIRST_COMPLETED)
            if self.busy:
                self.fail(TimeoutError("the quota store was closed with calls unanswered"))
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        connection, self.connection = self.connection, None
        if connection is not None:
            with contextlib.suppress(Exception):
                await connection.disconnect()  # the reader, if any, ends on it
        running = [t for t in (self.writer, self.reader) if t is not None and t is not asyncio.current_task()]
        if running:
            await asyncio.wait(running, timeout=1.0)


class ScriptBatcher:
    def __init__(self, client: Redis, *, linger: float = DEFAULT_LINGER) -> None:
        self.client = client
        self._linger = linger
        # seconds a call may wait for its reply: the client's socket timeout (METER_QUOTA_TIMEOUT)
        kwargs = client.connection_pool.connection_kwargs
        self.timeout: float | None = kwargs.get("socket_timeout")
        # connecting (with the handshake) may take longer: a burst opens it while the loop is busy
        self.connect_timeout: float | None = kwargs.get("socket_connect_timeout") or self.timeout
        self._queue: list[_Call] = []
        self._soon = False  # a flush is scheduled for the next loop iteration
        self._timer: asyncio.TimerHandle | None = None  # a flush for deferred calls
        self._link: _Link | None = None
        self._retired: set[asyncio.Task[None]] = set()  # broken links being closed

    def call(
        self, script: AsyncScript, keys: list[str], args: list[Any], *, defer: bool = False
    ) -> asyncio.Future[Any]:
        """Queue a call now (Rule 1 orders it by this moment); the future gets its reply or error.
        ``defer``: nobody is waiting on it; it may wait ``linger`` seconds for an urgent call."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queue.append(_Call(script, keys, args, future, defer))
        if not defer:
            if not self._soon:
                self._soon = True
                loop.call_soon(self._flush)
        elif self._timer is None and not self._soon:
            self._timer = loop.call_later(self._linger, self._flush)
        return future

    async def aclose(self, timeout: float = 1.0) -> None:
        """Send what is queued, wait for its replies (at most ``timeout``) and close the connection."""
        self._flush()
        if self._link is not None:
            link, self._link = self._link, None
            await link.aclose(timeout)
        if self._retired:
            await asyncio.wait(self._retired, timeout=timeout)

    def new_connection(self) -> AbstractConnection:
        """A connection made like the client's pool makes them (address, credentials, TLS, database),
        kept out of the pool, and without per-read and per-write timeouts: the link's watchdog keeps
        the time instead (a socket timeout costs a timer per read and a task per write)."""
        pool = self.client.connection_pool
        connection: AbstractConnection = pool.connection_class(
            **{**pool.connection_kwargs, "socket_timeout": None}
        )
        return connection

    def _flush(self) -> None:
        self._soon = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        queue, self._queue = self._queue, []
        if not queue:
            return
        if self._link is None:
            self._link = _Link(self)
        self._link.send(queue)

    def retire(self, link: _Link) -> None:
        if self._link is link:
            self._link = None
        task = asyncio.ensure_future(link.aclose(timeout=0))  # (broken: nothing to wait for)
        self._retired.add(task)
        task.add_done_callback(self._retired.discard)

    def requeue(self, call: _Call) -> None:
        """Send ``call`` again, urgently (a retry after NOSCRIPT: Rule 2)."""
        self._queue.append(call)
        if not self._soon:
            self._soon = True
            asyncio.get_running_loop().call_soon(self._flush)

    def resolve(self, call: _Call, reply: Any) -> None:
        future = call.future
        if future.done():
            return
        if isinstance(reply, Exception):
            future.set_exception(reply)
        else:
            future.set_result(reply)
