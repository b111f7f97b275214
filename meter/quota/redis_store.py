"""The Redis quota store: one set of counters shared by every meter process.

Every change is one Lua script (:mod:`meter.quota.scripts`) run with EVALSHA, falling back to SCRIPT
LOAD when Redis does not know it (a restart, a failover, a SCRIPT FLUSH). Redis runs a script alone,
so ``reserve`` checks and updates all of a request's counters (team and key; budget, token budgets,
rpm, tpm, concurrency) atomically across processes: store Rule 1 holds for any number of replicas.
Calls go out pipelined on one connection, in the order they were made (:mod:`meter.quota.redis_batch`);
a settle waits up to ``settle_linger`` seconds to travel with the next reserve (it holds its
reservation that much longer: conservative).

Failure: any error reaching Redis (refused, reset, timeout, READONLY, OOM) raises
:class:`~meter.errors.StoreUnavailable`; the failure policy is admission's. The client should not
retry by itself (:func:`connect` turns redis-py's retries off): a retry would wait on the request
path. Both scripts are safe to repeat anyway: a ``reserve`` replayed with the same id reserves once
(``settle`` is idempotent by store Rule 2). A reserve whose reply is lost to a timeout holds its
amounts until its lease expires: conservative.

Clock: by default the caller's ``now`` drives the windows and leases (tests use a fake clock). With
``server_time=True`` the scripts use Redis's ``TIME`` instead, so replicas on skewed clocks still
share exactly one window; budget periods are always computed from the caller's clock.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime, tzinfo
from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from meter.errors import StoreUnavailable
from meter.quota import scripts
from meter.quota.decision import BUDGET_KINDS, KIND_BY_RANK, Breach, Counters, LimitKind
from meter.quota.periods import Period, from_ms, period_window, to_ms
from meter.quota.policy import Policy, Subject
from meter.quota.redis_batch import DEFAULT_LINGER, ScriptBatcher
from meter.quota.spend import Estimate, Spend
from meter.quota.store import (
    BUDGET_GRACE_MS,
    CONCURRENCY_RETRY_MS,
    DEFAULT_LEASE_SECONDS,
    Hold,
    Periods,
    Refusal,
    Reservation,
    Settlement,
    SubjectState,
)
from meter.records import new_event_id

DEFAULT_PREFIX = "meter:quota:"
_STATE = 11  # numbers per subject state in script replies


def connect(
    url: str,
    *,
    timeout: float = 0.5,
    max_connections: int = 32,
    pool_timeout: float = 1.0,
    connect_timeout: float | None = None,
) -> Redis:
    """A client for the store: short socket timeouts, no automatic retries (see the module docstring),
    and a pool that makes a burst wait up to ``pool_timeout`` for a free connection (redis-py's default
    pool instead fails the 101st concurrent call, which admission would take for Redis being down).
    Connecting may take longer than a call (``connect_timeout``, default ``max(timeout, 1 s)``): a burst
    opens many connections at once while the event loop is busy with the requests that caused it.

    The protocol is RESP2 unless the URL says otherwise (``?protocol=3``): every Redis and Redis-like
    server speaks it, and it has no push messages to interleave with the batcher's pipelined replies
    (redis-py 8 defaults to RESP3: ``HELLO 3``, which servers before Redis 6 and some proxies refuse,
    and it switches on maintenance push notifications)."""
    pool = BlockingConnectionPool.from_url(
        url,
        protocol=2,
        max_connections=max_connections,
        timeout=pool_timeout,
        socket_timeout=timeout,
        socket_connect_timeout=connect_timeout if connect_timeout is not None else max(timeout, 1.0),
        retry=Retry(NoBackoff(), 0),
    )
    return Redis.from_pool(pool)


class RedisStore:
    name = "redis"
    ordered = True  # calls take effect in the order they were made (redis_batch Rule 1)

    def __init__(
        self,
        client: Redis,
        *,
        prefix: str = DEFAULT_PREFIX,
        tz: tzinfo = UTC,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        server_time: bool = False,
        settle_linger: float = DEFAULT_LINGER,
    ) -> None:
        self.client = client
        self.prefix = prefix
        self.tz = tz
        self._periods = Periods(tz)
        self._lease_ms = int(lease_seconds * 1000)
        self._server_time = server_time
        self._reserve = client.register_script(scripts.RESERVE)
        self._settle = client.register_script(scripts.SETTLE)
        self._status = client.register_script(scripts.STATUS)
        self._seed = client.register_script(scripts.SEED)
        self._batcher = ScriptBatcher(client, linger=settle_linger)

    # -- the port -------------------------------------------------------------------------------------

    async def reserve(
        self, policies: Sequence[Policy], estimate: Estimate, now: datetime
    ) -> Reservation | Refusal:
        now_ms = to_ms(now)
        holds = [self._periods.hold(policy, now, now_ms) for policy in policies]
        rid = new_event_id()
        args: list[Any] = [
            self._now_arg(now_ms),
            rid,
            estimate.cost_micros,
            estimate.prompt_tokens,
            estimate.completion_tokens,
            self._lease_ms,
            len(holds),
        ]
        for hold in holds:
            limits = hold.limits
            numbers = (hold.start_ms, _budget_ttl(hold, now_ms), *limits.by_rank, *limits.soft_by_rank)
            args += [self._base(hold.subject), _csv(numbers)]
        raw = await self._call(self._reserve, args)
        ok, at = raw[0], raw[1]
        states = tuple(_states(holds, raw[8:], _STATE + 1))
        if not ok:
            i, rank, limit, used, requested, retry = raw[2:8]
            hold, state = holds[i - 1], states[i - 1]
            kind = KIND_BY_RANK[rank - 1]
            breach = Breach(hold.subject, kind, limit, used, requested)
            if kind.is_budget:
                breach = replace(breach, resets_at=hold.period_end)
            elif kind is LimitKind.CONCURRENCY:
                breach = replace(breach, retry_after_ms=CONCURRENCY_RETRY_MS)
            else:
                breach = replace(
                    breach,
                    retry_after_ms=None if retry < 0 else retry,
                    resets_at=from_ms(at + state.window_reset_ms),
                )
            return Refusal(breach, states)
        crossings = _crossings(holds, raw[8:], _STATE + 1, _STATE)
        return Reservation(rid, estimate, tuple(holds), at, states, crossings)

    async def settle(self, reservation: Reservation, spend: Spend, now: datetime) -> Settlement:
        now_ms = to_ms(now)
        est = reservation.estimate
        args: list[Any] = [
            self._now_arg(now_ms),
            reservation.id,
            spend.cost_micros,
            spend.prompt_tokens,
            spend.completion_tokens,
            spend.total_tokens,
            len(reservation.holds),
        ]
        for hold in reservation.holds:
            member = (
                f"{reservation.id}|{hold.start_ms}|{est.cost_micros}"
                f"|{est.prompt_tokens}|{est.completion_tokens}"
            )
            limits = hold.limits
            numbers = (
                0 if limits.tpm is None else 1,
                est.total_tokens,
                _budget_ttl(hold, now_ms),
                *limits.soft_by_rank,
                0 if limits.max_concurrent is None else 1,
            )
            args += [self._base(hold.subject), member, _csv(numbers)]
        raw = await self._call(self._settle, args, defer=True)
        per = _STATE + 3
        body = raw[1:]
        applied = tuple(bool(body[i * per]) for i in range(len(reservation.holds)))
        late = tuple(bool(body[i * per + 1]) for i in range(len(reservation.holds)))
        states = tuple(
            _states(reservation.holds, [v for i, v in enumerate(body) if i % per >= 2], _STATE + 1)
        )
        crossings = _crossings(reservation.holds, body, per, per - 1)
        return Settlement(applied, late, states, crossings)

    async def status(self, policies: Sequence[Policy], now: datetime) -> tuple[SubjectState, ...]:
        now_ms = to_ms(now)
        holds = [self._periods.hold(policy, now, now_ms) for policy in policies]
        args: list[Any] = [self._now_arg(now_ms), len(holds)]
        for hold in holds:
            args += [self._base(hold.subject), hold.start_ms, 1 if hold.windowed else 0]
        raw = await self._call(self._status, args)
        return tuple(_states(holds, raw[1:], _STATE))

    async def seed_spent(
        self, subject: Subject, period: Period, period_start: datetime, spend: Spend, now: datetime
    ) -> bool:
        start, end = period_window(period, period_start, self.tz)
        key = f"{self._base(subject)}:b:{to_ms(start)}"
        ttl = max(to_ms(end) - to_ms(now) + BUDGET_GRACE_MS, 1000)
        args = [spend.cost_micros, spend.total_tokens, spend.prompt_tokens, spend.completion_tokens, ttl]
        return (await self._call(self._seed, args, [key])) == [1]

    async def aclose(self) -> None:
        await self._batcher.aclose()
        await self.client.aclose()

    # -- internals ------------------------------------------------------------------------------------

    def _base(self, subject: Subject) -> str:
        return self.prefix + subject.id

    def _now_arg(self, now_ms: int) -> int:
        return -1 if self._server_time else now_ms

    async def _call(
        self, script: AsyncScript, args: list[Any], keys: list[str] | None = None, *, defer: bool = False
    ) -> list[int]:
        try:
            raw = await self._batcher.call(script, keys or [], args, defer=defer)
        except (RedisError, OSError, TimeoutError) as exc:
            timed_out = isinstance(exc, (RedisTimeoutError, TimeoutError))
            raise StoreUnavailable(self.name, exc, timed_out=timed_out) from exc
        if isinstance(raw, int):
            return [raw]
        return [int(v) for v in raw.split(b",")]


def _csv(values: tuple[int | None, ...]) -> str:
    return ",".join("-1" if v is None else str(v) for v in values)


def _budget_ttl(hold: Hold, now_ms: int) -> int:
    return max(hold.end_ms - now_ms + BUDGET_GRACE_MS, 1000)


def _states(holds: Sequence[Hold], raw: Sequence[Any], stride: int) -> list[SubjectState]:
    out = []
    for i, hold in enumerate(holds):
        v = raw[i * stride : i * stride + _STATE]
        counters = Counters(*v[:10])
        out.append(
            SubjectState(hold.subject, hold.limits, hold.period_start, hold.period_end, counters, v[10])
        )
    return out


def _crossings(
    holds: Sequence[Hold], raw: Sequence[Any], stride: int, offset: int
) -> tuple[tuple[Subject, LimitKind], ...]:
    out = []
    for i, hold in enumerate(holds):
        bits = raw[i * stride + offset]
        out += [(hold.subject, kind) for k, kind in enumerate(BUDGET_KINDS) if bits >> k & 1]
    return tuple(out)
