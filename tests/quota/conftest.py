"""Fixtures of the quota tests: the machine's Redis under a key prefix of the test's own, and the store
contract's two backends (the Redis case is ``integration``: it needs the machine's Redis)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from meter.quota.memory import MemoryStore
from meter.quota.redis_store import RedisStore
from tests.support.quota import RedisHandle, StoreFactory, redis_for_test


@pytest.fixture
async def redis_handle() -> AsyncIterator[RedisHandle]:
    async with redis_for_test() as handle:
        yield handle


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.integration)])
async def make_store(request: pytest.FixtureRequest) -> AsyncIterator[StoreFactory]:
    if request.param == "memory":
        yield lambda **kw: MemoryStore(**kw)
        return
    async with redis_for_test() as handle:
        yield lambda **kw: RedisStore(handle.client, prefix=handle.prefix, **kw)
