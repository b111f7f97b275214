"""Coalesced script calls against the machine's Redis: one round trip for the calls of one loop turn,
each call with its own reply or error."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from meter.quota.redis_batch import ScriptBatcher
from meter.quota.redis_store import connect
from tests.test_quota_store import RedisHandle, redis_handle

__all__ = ["redis_handle"]

INCR = "return redis.call('INCRBY', KEYS[1], ARGV[1])"
FAIL_ON_ZERO = "if ARGV[1] == '0' then return redis.error_reply('zero') end return ARGV[1]"


class Recording(ScriptBatcher):
    """Records the size of every batch sent."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sizes: list[int] = []

    async def _send(self, batch: list[Any], *, reloaded: bool = False) -> None:
        self.sizes.append(len(batch))
        await super()._send(batch, reloaded=reloaded)


async def test_calls_of_one_loop_turn_share_a_round_trip_and_keep_their_replies(
    redis_handle: RedisHandle,
) -> None:
    client, key = redis_handle.client, redis_handle.prefix + "n"
    incr = client.register_script(INCR)
    batcher = Recording(client, max_batch=64)
    await client.script_load(INCR)  # (an unknown script would make each batch go twice)
    replies = await asyncio.gather(*(batcher.call(incr, [key], [i]) for i in range(1, 101)))
    assert batcher.sizes == [64, 36]
    # Each call got its own reply: a distinct running sum, in its batch's order (the two batches
    # travel on two connections, so Redis may interleave them).
    assert len(set(replies)) == 100 and max(replies) == 5050
    assert replies[:64] == sorted(replies[:64]) and replies[64:] == sorted(replies[64:])
    # A call made alone goes out alone.
    assert await batcher.call(incr, [key], [0]) == 5050
    assert batcher.sizes[-1] == 1


async def test_a_script_error_fails_only_its_own_call(redis_handle: RedisHandle) -> None:
    script = redis_handle.client.register_script(FAIL_ON_ZERO)
    batcher = ScriptBatcher(redis_handle.client)
    results = await asyncio.gather(
        *(batcher.call(script, [], [v]) for v in (1, 0, 2)), return_exceptions=True
    )
    assert results[0] == b"1" and results[2] == b"2"
    assert isinstance(results[1], ResponseError) and "zero" in str(results[1])


async def test_a_batch_after_script_flush_reloads_the_script(redis_handle: RedisHandle) -> None:
    client, key = redis_handle.client, redis_handle.prefix + "r"
    incr = client.register_script(INCR)
    batcher = Recording(client)
    assert await batcher.call(incr, [key], [1]) == 1
    await client.script_flush()  # as after a Redis restart or failover
    replies = await asyncio.gather(*(batcher.call(incr, [key], [1]) for _ in range(5)))
    assert sorted(replies) == [2, 3, 4, 5, 6]
    assert batcher.sizes[-2:] == [5, 5]  # refused as unknown, the script loaded once, sent again


async def test_an_unreachable_redis_fails_every_call_of_the_batch() -> None:
    client = connect("redis://127.0.0.1:1/0", timeout=0.5)  # nothing listens on port 1
    script = client.register_script(INCR)
    batcher = ScriptBatcher(client)
    results = await asyncio.gather(
        *(batcher.call(script, ["k"], [1]) for _ in range(3)), return_exceptions=True
    )
    assert all(isinstance(r, (RedisConnectionError, OSError)) for r in results), results
    with pytest.raises((RedisConnectionError, OSError)):
        await batcher.call(script, ["k"], [1])
    await client.aclose()


async def test_a_kept_connection_killed_by_redis_is_replaced(redis_handle: RedisHandle) -> None:
    """As after a Redis restart: the connection the batcher keeps dies; at most the call in flight
    fails, and the next ones reconnect."""
    client, key = redis_handle.client, redis_handle.prefix + "k"
    incr = client.register_script(INCR)
    batcher = ScriptBatcher(client)
    assert await batcher.call(incr, [key], [1]) == 1
    (kept,) = batcher._idle
    await kept.send_command("CLIENT", "ID")
    await client.execute_command("CLIENT", "KILL", "ID", await kept.read_response())
    try:
        counted = await batcher.call(incr, [key], [1])
    except (RedisConnectionError, OSError):
        counted = 1  # the call in flight failed: it must not have run either
    assert int(await client.get(key)) == counted  # a reply, or an error, never a lost increment
    assert await batcher.call(incr, [key], [1]) == counted + 1
    await batcher.aclose()
