"""The Redis store beyond the contract suite: one limit enforced through several processes at once,
key expiry, script reloading, Redis's clock, and Redis being unreachable."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
import redis

from meter.errors import StoreUnavailable
from meter.quota.policy import Limits, Policy, Subject
from meter.quota.redis_store import RedisStore, connect
from meter.quota.spend import Spend
from meter.quota.store import Refusal, Reservation
from tests.support.paths import ROOT
from tests.support.processes import free_port
from tests.support.quota import EST, EST_MICROS, REDIS_URL, T0, TEAM, RedisHandle, usd

# One competing replica: its own process, its own Redis client; reserves `n` times concurrently
# once the parent says go, and prints how many it was granted.
WORKER = r"""
import asyncio, json, sys
from datetime import UTC, datetime
from decimal import Decimal
from meter.quota.policy import Limits, Policy, Subject
from meter.quota.spend import Estimate
from meter.quota.redis_store import RedisStore, connect
from meter.quota.store import Reservation

async def main(cfg):
    client = connect(cfg["url"], timeout=10.0, max_connections=cfg["n"])
    store = RedisStore(client, prefix=cfg["prefix"])
    limits = Limits.from_dict(cfg["limits"])
    policies = [Policy(Subject("team", "acme"), limits)]
    est = Estimate(100, 200, Decimal("0.0005"))
    await store.status(policies, datetime.now(UTC))  # connect and load the scripts before the start
    await asyncio.gather(*(client.ping() for _ in range(cfg["n"])))  # open the pool's connections
    print("ready", flush=True)
    await client.blpop([cfg["go"]], timeout=60)  # the parent releases all replicas with one LPUSH
    outcomes = []
    for _ in range(cfg["n"] // cfg["wave"]):  # waves of `wave` concurrent requests
        outcomes += await asyncio.gather(
            *(store.reserve(policies, est, datetime.now(UTC)) for _ in range(cfg["wave"]))
        )
    print(json.dumps({"admitted": sum(isinstance(o, Reservation) for o in outcomes)}), flush=True)
    await store.aclose()

asyncio.run(main(json.loads(sys.argv[1])))
"""


def run_replicas(
    prefix: str, limits: dict[str, Any], replicas: int = 3, n: int = 200, wave: int = 200
) -> list[int]:
    go = prefix + "go"
    config = json.dumps(
        {"url": REDIS_URL, "prefix": prefix, "limits": limits, "n": n, "go": go, "wave": wave}
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, config],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env=env,
        )
        for _ in range(replicas)
    ]
    try:
        for proc in procs:  # wait until every replica is connected, then start them together
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert line.strip() == "ready", (line, proc.stderr.read() if proc.stderr else "")
        with redis.Redis.from_url(REDIS_URL) as client:
            client.lpush(go, *["go"] * replicas)
        counts = []
        for proc in procs:
            out, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, err
            counts.append(json.loads(out.strip().splitlines()[-1])["admitted"])
        return counts
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


LIMITS_OF_50 = [
    {"budget_usd": str(usd(50 * EST_MICROS))},
    {"rpm": 50},
    {"tpm": 50 * EST.total_tokens},
    {"max_concurrent": 50},
]


@pytest.mark.parametrize("limits", LIMITS_OF_50, ids=["budget", "rpm", "tpm", "concurrency"])
def test_three_processes_share_one_limit_exactly(redis_handle: RedisHandle, limits: dict[str, Any]) -> None:
    """3 replicas x 200 concurrent requests against a limit of 50: exactly 50 pass in all."""
    counts = run_replicas(redis_handle.prefix, limits)
    assert sum(counts) == 50, counts


def test_three_processes_hit_the_limit_at_the_same_time(redis_handle: RedisHandle) -> None:
    """Each replica sends waves of 10 concurrent requests (so the three interleave even on two CPUs)
    against a limit reached midway: every replica is granted some and refused some, and the total is
    still exact."""
    limits = {"budget_usd": str(usd(300 * EST_MICROS))}
    counts = run_replicas(redis_handle.prefix, limits, n=200, wave=10)
    assert sum(counts) == 300, counts
    assert all(0 < c < 200 for c in counts), counts


async def test_every_key_expires(redis_handle: RedisHandle) -> None:
    store = RedisStore(redis_handle.client, prefix=redis_handle.prefix, lease_seconds=1)
    p = Policy(TEAM, Limits(budget_usd=Decimal(1), rpm=10, tpm=10_000, max_concurrent=5))
    now = datetime.now(UTC)
    assert isinstance(await store.reserve([p], EST, now), Reservation)
    later = await store.reserve([p], EST, now + timedelta(seconds=2))  # the first lease -> a tombstone
    assert isinstance(later, Reservation)
    keys = [k async for k in redis_handle.client.scan_iter(match=redis_handle.prefix + "*")]
    suffixes = {k.decode().rsplit(":", 1)[-1] for k in keys}
    assert {"l", "x", "w", "ws"} <= suffixes and len(keys) == 5
    for key in keys:
        ttl = await redis_handle.client.pttl(key)
        assert ttl > 0, key
    assert await redis_handle.client.pttl(redis_handle.prefix + "team:acme:w") <= 61_000


async def test_scripts_are_reloaded_after_a_script_flush(redis_handle: RedisHandle) -> None:
    store = RedisStore(redis_handle.client, prefix=redis_handle.prefix)
    p = Policy(TEAM, Limits(rpm=2))
    assert isinstance(await store.reserve([p], EST, T0), Reservation)
    await redis_handle.client.script_flush()
    assert isinstance(await store.reserve([p], EST, T0), Reservation)
    assert isinstance(await store.reserve([p], EST, T0), Refusal)


async def test_a_replayed_reserve_reserves_once(
    redis_handle: RedisHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reserve retried after a lost reply (same id) must not reserve twice."""
    monkeypatch.setattr("meter.quota.redis_store.new_event_id", lambda: "01" * 16)
    store = RedisStore(redis_handle.client, prefix=redis_handle.prefix)
    p = Policy(TEAM, Limits(budget_usd=Decimal(1), rpm=5, max_concurrent=5))
    first = await store.reserve([p], EST, T0)
    second = await store.reserve([p], EST, T0)
    assert isinstance(first, Reservation) and isinstance(second, Reservation)
    assert first.id == second.id
    (state,) = await store.status([p], T0)
    c = state.counters
    assert (c.reserved_micros, c.inflight, c.window_requests) == (EST_MICROS, 1, 1)


async def test_server_time_drives_the_window(redis_handle: RedisHandle) -> None:
    store = RedisStore(redis_handle.client, prefix=redis_handle.prefix, server_time=True)
    p = Policy(TEAM, Limits(rpm=1))
    long_ago = datetime(2001, 1, 1, tzinfo=UTC)  # ignored by the window: Redis's clock is used
    r = await store.reserve([p], EST, long_ago)
    assert isinstance(r, Reservation)
    server_s, _ = await redis_handle.client.time()
    assert abs(r.admitted_ms / 1000 - server_s) < 5
    refusal = await store.reserve([p], EST, datetime(2030, 1, 1, tzinfo=UTC))
    assert isinstance(refusal, Refusal)
    assert refusal.breach.retry_after_ms is not None and 0 < refusal.breach.retry_after_ms <= 60_000


async def test_unreachable_redis_raises_store_unavailable() -> None:
    client = connect(f"redis://127.0.0.1:{free_port()}/0", timeout=0.5)
    store = RedisStore(client, prefix="meter-test:unreachable:")
    p = Policy(Subject("team", "x"), Limits(rpm=1))
    for call in (
        store.reserve([p], EST, T0),
        store.status([p], T0),
        store.seed_spent(TEAM, "month", T0, Spend(), T0),
    ):
        with pytest.raises(StoreUnavailable) as info:
            await asyncio.wait_for(call, 5)
        assert info.value.store == "redis"
    await store.aclose()
