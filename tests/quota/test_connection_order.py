"""The forward path settles a reservation while the response's last byte goes out. With a store that
applies a settle only after an await (not ``ordered``), it admits the next request on the same client
connection only once that settle is done: a client sending request after request on a keep-alive
connection is judged on its settled spend, even when the quota store is slow to answer. (Ordered
stores, the in-memory and Redis ones, need no wait: tests/quota/test_redis_batch.py.)"""

from __future__ import annotations

import asyncio
import secrets
from datetime import datetime
from typing import Any

import httpx
import orjson
import pytest
import redis

from meter.forward.handler import Proxy
from meter.forward.upstream import create_upstream
from meter.quota.policy import Limits
from meter.quota.redis_store import RedisStore, connect
from meter.quota.spend import Spend
from meter.quota.store import Reservation, Settlement
from meter.records import UsageRecord
from meter.tenancy.identity import KeyFingerprinter
from tests.support.quota import INFO, REDIS_URL, CountingStore, make_admission
from tests.support.serve import serve_in_thread
from tests.support.upstreams import ScriptedUpstream

pytestmark = pytest.mark.integration  # meter and its upstream on loopback ports, and Redis

SETTLE_DELAY = 0.3  # a quota store answering settles slowly
KEY = "fw_serial_key_0009"


class SlowSettles(CountingStore):
    ordered = False  # a settle takes effect only after its await: the forward path must wait for it

    async def settle(self, reservation: Reservation, spend: Spend, now: datetime) -> Settlement:
        await asyncio.sleep(SETTLE_DELAY)
        return await super().settle(reservation, spend, now)


class ProxyApp:
    """meter's forward path alone, with the upstream client opened at startup."""

    def __init__(self, proxy: Proxy, upstream: Any) -> None:
        self.proxy, self.upstream = proxy, upstream

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await self.upstream.start()
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await self.upstream.aclose()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        await self.proxy(scope, receive, send)


def _serve_and_send(admission: Any, fingerprinter: KeyFingerprinter) -> tuple[list[int], httpx.Response, int]:
    """Four requests on one keep-alive connection, then one on another: statuses, that response, and
    how many requests reached the upstream."""
    upstream_app = ScriptedUpstream()
    upstream_app.script.headers = [(b"content-type", b"application/json")]
    upstream_app.script.chunks = [orjson.dumps({"id": "r", "object": "chat.completion", "choices": []})]
    records: list[UsageRecord] = []
    with serve_in_thread(upstream_app) as upstream_server:
        upstream = create_upstream("aiohttp", connect_timeout=5, read_timeout=5, max_connections=10)
        proxy = Proxy(
            upstream=upstream,
            upstream_url=upstream_server.url,
            fingerprinter=fingerprinter,
            emit=records.append,
            max_request_bytes=1 << 20,
            quota=admission,
        )
        with serve_in_thread(ProxyApp(proxy, upstream)) as meter:
            body = orjson.dumps({"model": INFO.model, "messages": [{"role": "user", "content": "hi"}]})
            headers = {"authorization": f"Bearer {KEY}", "content-type": "application/json"}
            with httpx.Client(base_url=meter.url, headers=headers, timeout=10) as client:
                statuses = [client.post("/v1/chat/completions", content=body).status_code for _ in range(4)]
                # The response came back before its settle reached the store: a request on another
                # connection right now still sees the one slot held (conservative, documented).
                with httpx.Client(base_url=meter.url, headers=headers, timeout=10) as other:
                    elsewhere = other.post("/v1/chat/completions", content=body)
    assert len(records) == 5
    return statuses, elsewhere, len(upstream_app.received)


def test_the_next_request_on_a_connection_waits_for_the_previous_settle() -> None:
    fingerprinter = KeyFingerprinter(b"0123456789abcdef0123")
    fingerprint = fingerprinter.identify(KEY).fingerprint
    admission, _ = make_admission(SlowSettles(), key=Limits(max_concurrent=1), fingerprint=fingerprint)
    statuses, elsewhere, forwarded = _serve_and_send(admission, fingerprinter)
    assert statuses == [200, 200, 200, 200]
    assert elsewhere.status_code == 429 and elsewhere.json()["error"]["code"] == "rate_limit_exceeded"
    assert forwarded == 4


def test_with_redis_the_next_request_is_ordered_after_the_previous_settle() -> None:
    """The Redis store is ordered: the forward path does not wait, and a settle still lingering for
    company (1 s here) travels with the next reserve, ahead of it: a key allowed one request at a
    time is never refused while its requests come one after another."""
    fingerprinter = KeyFingerprinter(b"0123456789abcdef0123")
    fingerprint = fingerprinter.identify(KEY).fingerprint
    prefix = f"meter-test:{secrets.token_hex(6)}:"
    store = RedisStore(connect(REDIS_URL, timeout=5.0), prefix=prefix, settle_linger=1.0)
    admission, _ = make_admission(store, key=Limits(max_concurrent=1), fingerprint=fingerprint)
    try:
        statuses, elsewhere, forwarded = _serve_and_send(admission, fingerprinter)
    finally:
        cleanup = redis.Redis.from_url(REDIS_URL)
        keys = list(cleanup.scan_iter(match=prefix + "*"))
        if keys:
            cleanup.delete(*keys)
        cleanup.close()
    # A reserve from another connection also comes after the lingering settle in the store's order.
    assert statuses == [200, 200, 200, 200] and elsewhere.status_code == 200
    assert forwarded == 5
