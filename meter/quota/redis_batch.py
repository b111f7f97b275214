"""Coalescing of the Redis store's script calls: those made in one turn of the event loop share one
pipelined round trip.

A busy proxy admits and settles many requests in the same turn of the loop. Sent one by one, each
call pays redis-py's whole per-command path (pool checkout, packing, a read per reply): ~90 µs of
meter's CPU on the project's machine, against ~20 µs per call in a pipeline of 16
(``bench/quota_admission.py -c 64`` shows the effect end to end). Nothing waits to fill a batch: a
call is queued, and the queue is sent on the next iteration of the loop (``call_soon``), which runs
after every callback that was already ready — so a call made alone goes out alone, at once.

Rule 1: each call keeps its own outcome. A script error (a NOSCRIPT after a Redis restart, say)
        fails or retries that call only; an error of the connection fails every call of the batch,
        as it would have failed each of them sent alone.
Rule 2: Redis runs each script atomically whatever the batch; a pipeline without MULTI only saves
        round trips, it adds no ordering between callers that they did not already have.
"""

from __future__ import annotations

import asyncio
from typing import Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

_Call = tuple[AsyncScript, list[str], list[Any], "asyncio.Future[Any]"]


class ScriptBatcher:
    def __init__(self, client: Redis, *, max_batch: int = 64) -> None:
        self._client = client
        self._max_batch = max_batch
        self._queue: list[_Call] = []
        self._scheduled = False
        self._sending: set[asyncio.Task[None]] = set()  # strong references until each batch is done

    async def call(self, script: AsyncScript, keys: list[str], args: list[Any]) -> Any:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queue.append((script, keys, args, future))
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush)
        return await future

    def _flush(self) -> None:
        self._scheduled = False
        queue, self._queue = self._queue, []
        for start in range(0, len(queue), self._max_batch):
            task = asyncio.ensure_future(self._send_all(queue[start : start + self._max_batch]))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    async def _send_all(self, batch: list[_Call]) -> None:
        """``_send``, and no caller left waiting whatever it raised."""
        try:
            await self._send(batch)
        except BaseException as exc:
            for *_, future in batch:
                if future.done():
                    continue
                if isinstance(exc, Exception):
                    future.set_exception(exc)
                else:
                    future.cancel()
            raise

    async def _send(self, batch: list[_Call], *, reloaded: bool = False) -> None:
        if len(batch) == 1:
            script, keys, args, future = batch[0]
            await _settle_future(future, script(keys=keys, args=args))  # loads the script if needed
            return
        pipe = self._client.pipeline(transaction=False)
        for script, keys, args, _ in batch:
            pipe.evalsha(script.sha, len(keys), *keys, *args)
        try:
            replies = await pipe.execute(raise_on_error=False)
        except Exception as exc:  # the connection: every call of the batch failed (Rule 1)
            for *_, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        except BaseException:
            for *_, future in batch:
                future.cancel()
            raise
        unknown: list[_Call] = []
        for call, reply in zip(batch, replies, strict=True):
            future = call[3]
            if isinstance(reply, NoScriptError) and not reloaded:
                unknown.append(call)  # Redis forgot the script (restart, failover, SCRIPT FLUSH)
            elif future.done():
                continue
            elif isinstance(reply, Exception):
                future.set_exception(reply)
            else:
                future.set_result(reply)
        if unknown:
            try:
                for script in {id(call[0]): call[0] for call in unknown}.values():
                    await self._client.script_load(script.script)
            except Exception as exc:
                for *_, future in unknown:
                    if not future.done():
                        future.set_exception(exc)
                return
            await self._send(unknown, reloaded=True)


async def _settle_future(future: asyncio.Future[Any], call: Any) -> None:
    try:
        reply = await call
    except Exception as exc:
        if not future.done():
            future.set_exception(exc)
        return
    except BaseException:
        future.cancel()
        raise
    if not future.done():
        future.set_result(reply)
