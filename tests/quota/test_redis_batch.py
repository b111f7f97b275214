"""Coalesced script calls against the machine's Redis: one write for the calls of one loop turn, a
deferred call travelling with the next urgent one, every call applied in the order it was made and
with its own reply or error."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from pathlib import Path
from typing import Any

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from meter.errors import SettingsError
from meter.quota.policy import Limits
from meter.quota.redis_batch import ScriptBatcher
from meter.quota.redis_store import RedisStore, connect
from meter.quota.runtime import create_store
from meter.records import Usage
from meter.settings import load_settings
from tests.support.processes import free_port
from tests.support.quota import FP, INFO, REDIS_URL, T0, RedisHandle, make_admission

INCR = "return redis.call('INCRBY', KEYS[1], ARGV[1])"
FAIL_ON_ZERO = "if ARGV[1] == '0' then return redis.error_reply('zero') end return ARGV[1]"


class Recording(ScriptBatcher):
    """Records the size of every batch written."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sizes: list[int] = []

    def _flush(self) -> None:
        if self._queue:
            self.sizes.append(len(self._queue))
        super()._flush()


async def test_calls_of_one_loop_turn_share_a_write_and_keep_their_replies_in_order(
    redis_handle: RedisHandle,
) -> None:
    client, key = redis_handle.client, redis_handle.prefix + "n"
    incr = client.register_script(INCR)
    batcher = Recording(client)
    replies = await asyncio.gather(*(batcher.call(incr, [key], [i]) for i in range(1, 101)))
    assert batcher.sizes == [100]
    assert replies == [i * (i + 1) // 2 for i in range(1, 101)]  # each its own running sum, in order
    # A call made alone goes out alone.
    assert await batcher.call(incr, [key], [0]) == 5050
    assert batcher.sizes[-1] == 1
    await batcher.aclose()


async def test_writes_do_not_wait_for_replies_and_redis_runs_calls_in_the_order_made(
    redis_handle: RedisHandle,
) -> None:
    """Rule 1 across writes: a call made while earlier ones are still in flight is written at once
    and applied after them."""
    client, key = redis_handle.client, redis_handle.prefix + "o"
    incr = client.register_script(INCR)
    batcher = Recording(client)
    futures = []
    for i in range(1, 41):
        futures.append(batcher.call(incr, [key], [i]))
        await asyncio.sleep(0)  # one call per loop turn: one write each
    assert len(batcher.sizes) >= 20  # (not waiting for the first write's reply before the next)
    assert await asyncio.gather(*futures) == [i * (i + 1) // 2 for i in range(1, 41)]
    await batcher.aclose()


async def test_a_deferred_call_travels_with_the_next_urgent_call_and_is_applied_first(
    redis_handle: RedisHandle,
) -> None:
    client, key = redis_handle.client, redis_handle.prefix + "d"
    set_value = client.register_script("return redis.call('SET', KEYS[1], ARGV[1])")
    get_value = client.register_script("return redis.call('GET', KEYS[1])")
    batcher = Recording(client, linger=5.0)  # nothing but the urgent call can send it
    deferred = batcher.call(set_value, [key], ["settled"], defer=True)
    await asyncio.sleep(0.05)
    assert not deferred.done() and batcher.sizes == []
    assert await batcher.call(get_value, [key], []) == b"settled"
    assert await deferred == b"OK" and batcher.sizes == [2]
    await batcher.aclose()


async def test_a_deferred_call_alone_goes_out_after_the_linger(redis_handle: RedisHandle) -> None:
    client, key = redis_handle.client, redis_handle.prefix + "l"
    incr = client.register_script(INCR)
    batcher = Recording(client, linger=0.05)
    started = asyncio.get_running_loop().time()
    assert await batcher.call(incr, [key], [3], defer=True) == 3
    assert asyncio.get_running_loop().time() - started >= 0.04 and batcher.sizes == [1]
    await batcher.aclose()


async def test_closing_sends_what_is_deferred(redis_handle: RedisHandle) -> None:
    client, key = redis_handle.client, redis_handle.prefix + "c"
    incr = client.register_script(INCR)
    batcher = ScriptBatcher(client, linger=60.0)
    deferred = batcher.call(incr, [key], [7], defer=True)
    await batcher.aclose()
    assert deferred.done() and deferred.result() == 7
    assert int(await client.get(key)) == 7


async def test_a_script_error_fails_only_its_own_call(redis_handle: RedisHandle) -> None:
    script = redis_handle.client.register_script(FAIL_ON_ZERO)
    batcher = ScriptBatcher(redis_handle.client)
    results = await asyncio.gather(
        *(batcher.call(script, [], [v]) for v in (1, 0, 2)), return_exceptions=True
    )
    assert results[0] == b"1" and results[2] == b"2"
    assert isinstance(results[1], ResponseError) and "zero" in str(results[1])
    await batcher.aclose()


async def test_a_batch_after_script_flush_reloads_the_script(redis_handle: RedisHandle) -> None:
    client, key = redis_handle.client, redis_handle.prefix + "r"
    incr = client.register_script(INCR)
    batcher = Recording(client)
    assert await batcher.call(incr, [key], [1]) == 1
    await client.script_flush()  # as after a Redis restart or failover
    replies = await asyncio.gather(*(batcher.call(incr, [key], [1]) for _ in range(5)))
    assert sorted(replies) == [2, 3, 4, 5, 6]
    assert batcher.sizes[-2:] == [5, 5]  # refused as unknown, the script loaded once, sent again
    await batcher.aclose()


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
    assert batcher._link is not None and batcher._link.connection is not None
    kept = batcher._link.connection
    await kept.send_command("CLIENT", "ID")
    await client.execute_command("CLIENT", "KILL", "ID", await kept.read_response())
    try:
        counted = await batcher.call(incr, [key], [1])
    except (RedisConnectionError, OSError):
        counted = 1  # the call in flight failed: it must not have run either
    assert int(await client.get(key)) == counted  # a reply, or an error, never a lost increment
    assert await batcher.call(incr, [key], [1]) == counted + 1
    await batcher.aclose()


async def test_a_settle_not_yet_sent_is_applied_before_the_next_admit(redis_handle: RedisHandle) -> None:
    """The forward path's keep-alive rule with the Redis store (METER_QUOTA_SETTLE_LINGER long enough
    that only the next reserve can carry the settle): a key allowed one request at a time, whose
    settle was started and not awaited, is admitted again at once, and nothing else is held."""
    environ = {"METER_REDIS_URL": REDIS_URL, "METER_QUOTA_PREFIX": redis_handle.prefix}
    settings = load_settings({**environ, "METER_QUOTA_SETTLE_LINGER": "30"})
    store = create_store(settings)
    assert isinstance(store, RedisStore) and store.ordered
    admission, _ = make_admission(store, key=Limits(max_concurrent=1))
    try:
        first = await admission.admit("acme", FP, INFO, T0)
        assert first.allowed and first.reservation is not None
        usage = Usage(prompt_tokens=5, completion_tokens=5)
        settling = admission.start_settle(first.reservation, usage, None, T0)
        await asyncio.sleep(0.05)
        assert not settling.done()  # lingering: waiting for a reserve to travel with
        second = await admission.admit("acme", FP, INFO, T0)
        assert second.allowed and second.reservation is not None
        assert (await settling) is not None
        (state,) = await admission.status(None, FP, T0)
        assert state.counters.inflight == 1  # the second request only
    finally:
        await store.aclose()


def test_the_settle_linger_setting_is_checked() -> None:
    assert load_settings({}).quota_settle_linger == 0.005
    assert load_settings({"METER_QUOTA_SETTLE_LINGER": "0"}).quota_settle_linger == 0
    for bad in ("-1", "inf", "nan", "soon"):
        with pytest.raises(SettingsError, match="METER_QUOTA_SETTLE_LINGER"):
            load_settings({"METER_QUOTA_SETTLE_LINGER": bad})


async def test_a_script_unknown_to_redis_is_loaded_in_the_write_that_first_calls_it(
    redis_handle: RedisHandle,
) -> None:
    """Rule 2: no NOSCRIPT round trip on a new connection, so a first call keeps its place (Rule 1)."""
    client, key = redis_handle.client, redis_handle.prefix + "u"
    body = (
        f"-- {redis_handle.prefix}\nreturn redis.call('INCRBY', KEYS[1], ARGV[1])"  # a script Redis never saw
    )
    script = client.register_script(body)
    batcher = Recording(client)
    assert await batcher.call(script, [key], [2]) == 2
    assert batcher.sizes == [1]  # written once: loaded and called in one write
    await batcher.aclose()


@pytest.mark.integration
async def test_a_silent_redis_fails_the_calls_after_the_timeout_and_is_replaced() -> None:
    """A server that completes the connection's handshake and then never answers a script (a Redis
    stuck in a long script, a half-open connection): the calls fail once METER_QUOTA_TIMEOUT has
    passed since their write, as a timeout (the failure policy then applies), and the next call
    opens a new connection."""
    accepted: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)
        while data := await reader.read(1 << 20):
            if b"EVALSHA" in data or b"SCRIPT" in data:
                continue
            # The handshake: CLIENT SETINFO (+OK) and, where redis-py defaults to RESP3 (8.x), HELLO 3,
            # whose answer is a map that must carry the protocol it asked for.
            for command in data.split(b"\r\n*"):
                writer.write(b"%1\r\n+proto\r\n:3\r\n" if b"HELLO" in command else b"+OK\r\n")

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = connect(f"redis://127.0.0.1:{port}/0", timeout=0.3, connect_timeout=5.0)
    script = client.register_script(INCR)
    batcher = ScriptBatcher(client)
    loop = asyncio.get_running_loop()
    try:
        started = loop.time()
        calls = [batcher.call(script, ["k"], [1]) for _ in range(3)]
        results = await asyncio.gather(*calls, return_exceptions=True)
        assert all(isinstance(r, RedisTimeoutError) for r in results), results
        assert "no reply from Redis within 0.3s" in str(results[0])
        assert 0.25 <= loop.time() - started < 2.0
        with pytest.raises(RedisTimeoutError):
            await batcher.call(script, ["k"], [1])
        assert len(accepted) == 2  # the second call came on a new connection
    finally:
        await batcher.aclose()
        await client.aclose()
        server.close()
        for writer in accepted:
            writer.close()


async def _start_redis(port: int, workdir: Path) -> asyncio.subprocess.Process:
    server = shutil.which("redis-server")
    assert server, "redis-server is not on PATH (Debian package redis-server; .ci/run also starts it)"
    process = await asyncio.create_subprocess_exec(
        server,
        *(
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
        ),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    client = connect(f"redis://127.0.0.1:{port}/0", timeout=1.0)
    try:
        for _ in range(100):
            with contextlib.suppress(RedisConnectionError, OSError):
                if await client.ping():
                    return process
            await asyncio.sleep(0.05)
    finally:
        await client.aclose()
    raise AssertionError("redis-server did not start")


@pytest.mark.integration
async def test_a_restarted_redis_is_used_again_and_loads_the_scripts_in_the_first_write(
    tmp_path: Path,
) -> None:
    """Redis restarts (no persistence: it knows no scripts): the call in flight or the next one fails,
    then a new connection is opened and the script is loaded in the same write as its call."""
    port = free_port()
    redis_process = await _start_redis(port, tmp_path)
    client = connect(f"redis://127.0.0.1:{port}/0", timeout=0.5)
    incr = client.register_script(INCR)
    batcher = Recording(client)
    try:
        assert await batcher.call(incr, ["k"], [1]) == 1
        redis_process.kill()
        await redis_process.wait()
        with pytest.raises((RedisConnectionError, RedisTimeoutError, OSError)):
            await batcher.call(incr, ["k"], [1])
        redis_process = await _start_redis(port, tmp_path)
        written = len(batcher.sizes)
        assert await batcher.call(incr, ["k"], [5]) == 5  # a new server: the counter starts again
        assert len(batcher.sizes) == written + 1  # one write: SCRIPT LOAD and EVALSHA together
    finally:
        await batcher.aclose()
        await client.aclose()
        redis_process.kill()
        await redis_process.wait()


@pytest.mark.integration
@pytest.mark.parametrize(("query", "resp"), [("", "2"), ("&protocol=3", "3")])
async def test_the_link_speaks_resp2_unless_the_url_asks_for_resp3(query: str, resp: str) -> None:
    """redis-py 8 defaults to RESP3 (HELLO 3, which servers before Redis 6 and some proxies refuse,
    with push notifications that would interleave with pipelined replies); meter's connections use
    RESP2 unless METER_REDIS_URL says ?protocol=3. Read off the real server's CLIENT LIST."""
    name = f"meter-test-{free_port()}"
    client = connect(f"{REDIS_URL}?client_name={name}{query}", timeout=2.0)
    batcher = ScriptBatcher(client)
    observer = connect(REDIS_URL, timeout=2.0)
    try:
        assert await batcher.call(client.register_script("return 7"), [], []) == 7
        listed = await observer.client_list()
        link = [c for c in listed if c.get("name") == name]
        assert len(link) == 1, listed
        assert link[0]["resp"] == resp
    finally:
        await batcher.aclose()
        await client.aclose()
        await observer.aclose()
