"""Quotas end to end: the real openai SDK through running meters to the simulator, limits set through
the admin API, counters in the process or in the machine's Redis.

* the bound: 200 concurrent requests against a budget of 50 reservations admit exactly 50, the rest get
  ``429 insufficient_quota`` with ``x-should-retry: false`` (the SDK does not retry them), and the
  recorded spend stays within the budget;
* three meters sharing one Redis enforce one budget and one rpm between them;
* rate limits: OpenAI's ``x-ratelimit-*`` headers on every response of a limited key, ``retry-after``
  on rejections, which the SDK honours (a concurrency rejection is retried and then succeeds);
* overshoot: a response that costs more than its reservation is counted in
  ``meter_quota_overshoot_usd_total`` and the next request is refused;
* budget state survives a restart (seeded from the rollups);
* Redis unreachable: budgets fail closed (503, retried by the SDK), rate limits fail open;
* rejected requests are recorded (outcome ``rejected``) and never reach the upstream.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
import redis

from meter.billing.prices import Price
from meter.quota.spend import estimate
from meter.tap.request import inspect_request
from tests.conftest import MeterHandle, SimHandle, wait_for
from tests.support.processes import free_port

ADMIN = "quota-admin-token-0123456789abcdef"
SECRET = "0123456789abcdef0123456789abcdef"
MODEL = "llama-v3p1-8b-instruct"  # $0.20 per 1M tokens on the shipped sheet
PRICE = Price(Decimal("0.20"), Decimal("0.20"))
MESSAGES = [{"role": "user", "content": "count the sheep"}]
REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    """A key prefix of this test's own in the machine's Redis, deleted afterwards. No Redis: fail."""
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.fail(f"the quota tests need Redis at {REDIS_URL}: {exc!r}")
    prefix = f"meter-test:{uuid.uuid4().hex}:"
    try:
        yield prefix
    finally:
        keys = list(client.scan_iter(match=prefix + "*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()


def admin(meter: MeterHandle) -> httpx.Client:
    return httpx.Client(base_url=f"{meter.url}/admin/v1", headers={"Authorization": f"Bearer {ADMIN}"})


def team_with_key(meter: MeterHandle, team: str, key: str, **limits: Any) -> int:
    """A team, a passthrough key in it, and the team's limits; returns the key id."""
    with admin(meter) as api:
        assert api.post("/teams", json={"name": team}).status_code == 201
        created = api.post(f"/teams/{team}/keys", json={"kind": "passthrough", "key": key})
        assert created.status_code == 201, created.text
        if limits:
            put = api.put(f"/teams/{team}/limits", json=limits)
            assert put.status_code == 200, put.text
        return int(created.json()["id"])


def set_key_limits(meter: MeterHandle, key_id: int, **limits: Any) -> None:
    with admin(meter) as api:
        put = api.put(f"/keys/{key_id}/limits", json=limits)
        assert put.status_code == 200, put.text


def reservation_usd(max_tokens: int, messages: list[dict[str, str]] = MESSAGES) -> Decimal:
    """What meter reserves for one chat completion with this body (the documented estimate)."""
    body = {"model": MODEL, "messages": messages, "max_tokens": max_tokens}
    return estimate(inspect_request(orjson.dumps(body)), PRICE, 4096).cost_usd


def whole_micros_max_tokens() -> int:
    """A max_tokens whose reservation is a whole number of micro-USD, so 50 of them are exactly a
    budget that the store (which counts micro-USD) cannot round."""
    return next(m for m in range(20, 40) if (reservation_usd(m) * 1_000_000) % 1 == 0)


def sdk(meter: MeterHandle, key: str, **kwargs: Any) -> openai.OpenAI:
    kwargs.setdefault("max_retries", 0)
    return openai.OpenAI(base_url=meter.base_url, api_key=key, **kwargs)


def metric(meter: MeterHandle, name: str, **labels: str) -> float:
    """The value of one sample on /metrics (0 when absent)."""
    text = httpx.get(f"{meter.url}/metrics").text
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            series, _, value = line.rpartition(" ")
            got = series[len(name) :].strip("{}")
            if ",".join(sorted(got.split(","))) == want or (not labels and series == name):
                return float(value)
    return 0.0


async def concurrent_chats(meter: MeterHandle, key: str, n: int, max_tokens: int, hold_ms: int) -> list[Any]:
    """``n`` chat completions at once; each admitted one is held ``hold_ms`` by the simulator, so
    every admission happens while all the admitted ones are still in flight."""
    client = openai.AsyncOpenAI(base_url=meter.base_url, api_key=key, max_retries=0, timeout=60)
    try:
        return await asyncio.gather(
            *(
                client.chat.completions.create(
                    model=MODEL,
                    messages=MESSAGES,  # type: ignore[arg-type]
                    max_tokens=max_tokens,
                    extra_headers={"x-sim-ttft-ms": str(hold_ms)},
                )
                for _ in range(n)
            ),
            return_exceptions=True,
        )
    finally:
        await client.close()


@pytest.fixture
def start(start_meter: Callable[..., MeterHandle], tmp_path: Path) -> Callable[..., MeterHandle]:
    def go(upstream: str, **overrides: Any) -> MeterHandle:
        overrides.setdefault("journal_dir", str(tmp_path / f"journal-{uuid.uuid4().hex[:6]}"))
        return start_meter(
            upstream, admin_token=ADMIN, key_secret=SECRET, key_directory_refresh=0.05, **overrides
        )

    return go


@pytest.mark.parametrize("store", ["memory", "redis"])
def test_200_concurrent_requests_against_50_reservations_admit_exactly_50(
    start, simulator: SimHandle, store: str, request: pytest.FixtureRequest
) -> None:
    overrides: dict[str, Any] = {}
    if store == "redis":
        overrides = {"redis_url": REDIS_URL, "quota_prefix": request.getfixturevalue("redis_prefix")}
    meter = start(simulator.url, **overrides)
    max_tokens = whole_micros_max_tokens()
    budget = reservation_usd(max_tokens) * 50
    team_with_key(meter, "search", "fw_search_key_0001", budget_usd=str(budget), budget_period="day")

    results = asyncio.run(concurrent_chats(meter, "fw_search_key_0001", 200, max_tokens, hold_ms=3000))

    admitted = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, BaseException)]
    assert len(admitted) == 50, {repr(e)[:200] for e in refused}
    assert all(isinstance(e, openai.RateLimitError) for e in refused), refused[:3]
    for error in refused:
        assert isinstance(error, openai.RateLimitError)
        assert error.status_code == 429
        assert error.body["code"] == "insufficient_quota" and error.body["type"] == "insufficient_quota"
        assert error.response.headers["x-should-retry"] == "false"
        assert "daily budget" in error.body["message"] and "team 'search'" in error.body["message"]
    assert len(simulator.sim.received) == 50  # refused requests never reached the upstream

    rows = meter.rows(200)
    assert sorted({(r["outcome"], r["status_code"]) for r in rows}) == [("ok", 200), ("rejected", 429)]
    spent = sum(r["cost_nanos"] for r in rows if r["outcome"] == "ok")
    assert 0 < spent <= budget * 1_000_000_000
    assert metric(meter, "meter_quota_rejections_total", team="search", reason="budget_usd") == 150

    # Settled: the reservations are released and the actual spend (less than reserved: the estimate is
    # conservative) counted: the store's counters equal what the records say was spent.
    def budget_row() -> dict[str, Any]:
        with admin(meter) as api:
            status = api.get("/quota/status", params={"team": "search"}).json()
        return next(row for s in status["data"] for row in s["limits"] if row["kind"] == "budget_usd")

    remaining = budget - Decimal(spent) / 1_000_000_000

    def settled() -> dict[str, Any] | None:
        row = budget_row()
        return row if Decimal(row["remaining"]) == remaining else None

    row = wait_for(settled, message=f"remaining == {remaining}")
    assert Decimal(row["used"]) == Decimal(spent) / 1_000_000_000 and Decimal(row["reserved"]) == 0


@pytest.mark.postgres
def test_three_meters_sharing_redis_enforce_one_budget_and_one_rpm(
    db_postgres_url: str, start, simulator: SimHandle, redis_prefix: str
) -> None:
    """Three replicas on one PostgreSQL database and one Redis; requests through all three at once.
    (The database fixture comes first so that it is dropped after the meters have stopped.)"""
    from meter.db import migrate

    asyncio.run(migrate.upgrade(db_postgres_url))
    shared = {"redis_url": REDIS_URL, "quota_prefix": redis_prefix, "database_url": db_postgres_url}
    meters = [start(simulator.url, **shared) for _ in range(3)]
    max_tokens = whole_micros_max_tokens()
    budget = reservation_usd(max_tokens) * 30
    team_with_key(meters[0], "ads", "fw_ads_key_0002", budget_usd=str(budget), budget_period="month")
    key_id = team_with_key(meters[0], "rates", "fw_rates_key_0003")
    set_key_limits(meters[0], key_id, rpm=25)
    for m in meters:  # every replica has loaded the limits (directory refresh)
        wait_for(lambda m=m: _has_limits(m, "ads", "rates", "fw_rates_key_0003"), message="limits loaded")

    async def through_all(key: str, per_meter: int, hold_ms: int) -> list[Any]:
        batches = await asyncio.gather(
            *(concurrent_chats(m, key, per_meter, max_tokens, hold_ms) for m in meters)
        )
        return [r for batch in batches for r in batch]

    budget_results = asyncio.run(through_all("fw_ads_key_0002", 40, 3000))
    assert sum(not isinstance(r, BaseException) for r in budget_results) == 30
    rate_results = asyncio.run(through_all("fw_rates_key_0003", 15, 0))
    ok = [r for r in rate_results if not isinstance(r, BaseException)]
    limited = [r for r in rate_results if isinstance(r, BaseException)]
    assert len(ok) == 25
    assert all(
        isinstance(e, openai.RateLimitError) and e.body["code"] == "rate_limit_exceeded" for e in limited
    )
    assert all(e.body["type"] == "requests" and int(e.response.headers["retry-after"]) >= 1 for e in limited)


def _has_limits(meter: MeterHandle, team: str, key_team: str, key: str) -> bool:
    tenancy = meter.app.runtime.tenancy
    assert tenancy is not None
    fingerprint = meter.app.runtime.fingerprinter.identify(key).fingerprint
    return tenancy.limits(team, None)[0] is not None and tenancy.limits(key_team, fingerprint)[1] is not None


def test_rate_limit_headers_on_every_response_and_retry_after_on_rejection(start, simulator) -> None:
    meter = start(simulator.url)
    key_id = team_with_key(meter, "chat", "fw_chat_key_0004")
    set_key_limits(meter, key_id, rpm=3, tpm=100_000)
    client = sdk(meter, "fw_chat_key_0004")
    remaining = []
    for _ in range(3):
        raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES, max_tokens=5)
        # meter's headers replace the upstream's of the same name (the simulator, like Fireworks, sends
        # x-ratelimit-limit-requests: 6000); the upstream's other x-ratelimit-* headers pass.
        assert raw.headers.get_list("x-ratelimit-limit-requests") == ["3"]
        assert raw.headers["x-ratelimit-limit-tokens-prompt"] == "3600000"
        assert raw.headers["x-ratelimit-limit-tokens"] == "100000"
        assert raw.headers["x-ratelimit-reset-requests"].endswith("s")
        remaining.append(int(raw.headers["x-ratelimit-remaining-requests"]))
        assert raw.parse().usage is not None
    assert remaining == [2, 1, 0]
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5)
    error = caught.value
    assert error.body["code"] == "rate_limit_exceeded" and error.body["type"] == "requests"
    assert "3" in error.body["message"] and "try again in" in error.body["message"]
    assert 1 <= int(error.response.headers["retry-after"]) <= 60
    assert error.response.headers["x-ratelimit-remaining-requests"] == "0"
    # A key without limits: the upstream's headers pass unchanged, nothing is added.
    team_with_key(meter, "free", "fw_free_key_0005")
    raw = sdk(meter, "fw_free_key_0005").chat.completions.with_raw_response.create(
        model=MODEL, messages=MESSAGES, max_tokens=5
    )
    assert raw.headers.get_list("x-ratelimit-limit-requests") == ["6000"]
    assert "x-ratelimit-reset-requests" not in raw.headers
    rows = meter.rows(5)
    assert [r["outcome"] for r in rows].count("rejected") == 1
    assert len(simulator.sim.received) == 4


def test_the_sdk_honours_retry_after_on_a_concurrency_rejection(start, simulator) -> None:
    """max_concurrent=1: a second request while the first is in flight is refused with retry-after;
    the SDK waits and retries, and the retry succeeds once the first has finished."""
    meter = start(simulator.url)
    key_id = team_with_key(meter, "batch", "fw_batch_key_0006")
    set_key_limits(meter, key_id, max_concurrent=1)

    async def both() -> list[Any]:
        client = openai.AsyncOpenAI(base_url=meter.base_url, api_key="fw_batch_key_0006", max_retries=2)
        slow = asyncio.ensure_future(
            client.chat.completions.create(
                model=MODEL, messages=MESSAGES, max_tokens=5, extra_headers={"x-sim-ttft-ms": "400"}
            )
        )
        await asyncio.sleep(0.15)
        second = await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5)
        return [await slow, second]

    first, second = asyncio.run(both())
    assert first.usage is not None and second.usage is not None
    rows = meter.rows(3)
    assert [r["status_code"] for r in rows].count(429) == 1  # refused once, then retried after retry-after
    assert len(simulator.sim.received) == 2


@pytest.mark.parametrize("store", ["memory", "redis"])
def test_back_to_back_requests_under_a_concurrency_limit_of_one_are_never_refused(
    start, simulator: SimHandle, store: str, request: pytest.FixtureRequest
) -> None:
    """The settle overlaps the response's last byte; the client's next request, sent the moment the
    previous one completed, must still find the one slot free (this replica orders it after the
    settle), streaming or not."""
    overrides: dict[str, Any] = {}
    if store == "redis":
        overrides = {"redis_url": REDIS_URL, "quota_prefix": request.getfixturevalue("redis_prefix")}
    meter = start(simulator.url, **overrides)
    key_id = team_with_key(meter, "serial", "fw_serial_key_0008")
    set_key_limits(meter, key_id, max_concurrent=1)
    client = sdk(meter, "fw_serial_key_0008", max_retries=0)
    for i in range(40):
        if i % 2:
            stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3, stream=True)
            assert [c for c in stream]
        else:
            assert client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3).usage
    rows = meter.rows(40)
    assert [r["status_code"] for r in rows] == [200] * 40


def test_overshoot_is_counted_and_the_next_request_is_refused(start, simulator) -> None:
    """No max_tokens and a default reservation of 1 output token: every response costs more than it
    reserved. The excess is counted, and once spend + the next reservation exceeds the budget the
    request is refused; spend exceeds the budget by at most the excess of the request in flight."""
    meter = start(simulator.url, quota_default_max_tokens=1)
    team_with_key(meter, "loose", "fw_loose_key_0007", budget_usd="0.00002", budget_period="day")
    client = sdk(meter, "fw_loose_key_0007")
    served = 0
    with pytest.raises(openai.RateLimitError) as caught:
        for _ in range(50):
            client.chat.completions.create(model=MODEL, messages=MESSAGES)
            served += 1
    assert served >= 1 and caught.value.body["code"] == "insufficient_quota"
    reserved = (
        estimate(inspect_request(orjson.dumps({"model": MODEL, "messages": MESSAGES})), PRICE, 1).cost_usd
        * 1_000_000_000
    )
    costs = [r["cost_nanos"] for r in meter.rows(served + 1) if r["outcome"] == "ok"]
    assert len(costs) == served and all(c > reserved for c in costs)
    budget = 20_000
    assert sum(costs) <= budget + (costs[-1] - reserved)  # at most one request in flight here
    excess_usd = sum(Decimal(c) - reserved for c in costs) / 1_000_000_000
    assert metric(meter, "meter_quota_overshoot_usd_total", team="loose") == pytest.approx(float(excess_usd))


def test_budget_spend_survives_a_restart(start, simulator, tmp_path) -> None:
    db = tmp_path / "restart.db"
    overrides = {"database_url": f"sqlite:///{db}", "journal_dir": str(tmp_path / "journal")}
    first = start(simulator.url, **overrides)
    team_with_key(first, "ops", "fw_ops_key_0008", budget_usd="0.0001", budget_period="month")
    client = sdk(first, "fw_ops_key_0008")
    served = 0
    with pytest.raises(openai.RateLimitError):
        for _ in range(100):
            client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=20)
            served += 1
    first.server.server.should_exit = True  # shutdown drains the pipeline into the rollups
    first.server.thread.join(30)
    assert not first.server.thread.is_alive()

    second = start(simulator.url, **overrides)
    with pytest.raises(openai.RateLimitError) as caught:
        sdk(second, "fw_ops_key_0008").chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=20)
    assert caught.value.body["code"] == "insufficient_quota"
    with admin(second) as api:
        status = api.get("/quota/status", params={"team": "ops"}).json()
    assert "ops" in str(status)


def test_redis_down_fails_closed_for_budgets_and_open_for_rates(start, simulator) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    meter = start(simulator.url, redis_url=dead, quota_timeout=0.2)
    team_with_key(meter, "money", "fw_money_key_0009", budget_usd="10")
    rate_key = team_with_key(meter, "speed", "fw_speed_key_0010")
    set_key_limits(meter, rate_key, rpm=1)

    with pytest.raises(openai.InternalServerError) as caught:
        sdk(meter, "fw_money_key_0009").chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5)
    assert caught.value.status_code == 503 and caught.value.body["code"] == "quota_unavailable"
    for _ in range(3):  # rpm=1, but the limit fails open
        sdk(meter, "fw_speed_key_0010").chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5)
    assert metric(meter, "meter_quota_fallbacks_total", store="redis", policy="closed") >= 1
    assert metric(meter, "meter_quota_fallbacks_total", store="redis", policy="open") >= 3
    assert len(simulator.sim.received) == 3
