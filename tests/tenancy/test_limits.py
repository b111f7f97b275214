"""Quota limits of teams and keys on real SQLite and PostgreSQL: stored through the tenancy store
(validated, audited, version bumped), loaded into every replica's directory, and read per request from
memory by ``Tenancy.limits``; reload listeners."""

from __future__ import annotations

import logging
from decimal import Decimal
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy import func, select, text, update
from sqlalchemy.ext.asyncio import AsyncEngine

from meter.db.tenancy_models import api_keys, teams
from meter.errors import NotFound, RequestError
from meter.quota.policy import Limits, Subject
from meter.tenancy.identity import KeyFingerprinter
from meter.tenancy.runtime import Tenancy, TenancyConfig
from meter.tenancy.store import TenancyStore

FP = KeyFingerprinter(b"0123456789abcdef0123456789abcdef")
ACTOR = "test:admin"
TEAM_LIMITS = Limits(budget_usd=Decimal("25.00"), budget_period="week", rpm=600, soft_ratio=Decimal("0.5"))
KEY_LIMITS = Limits(tokens_budget=1_000_000, tpm=100_000, max_concurrent=4)


async def started(engine: AsyncEngine, **kwargs: Any) -> Tenancy:
    tenancy = Tenancy(FP, TenancyConfig(upstream_api_key="up"), sheet_rows=[], **kwargs)
    await tenancy.start(engine)
    return tenancy


async def version(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(text("SELECT version FROM tenancy_state"))).scalar_one())


async def test_set_show_and_clear_limits_with_audit(db_engine: AsyncEngine) -> None:
    store = TenancyStore(db_engine, FP)
    await store.create_team(ACTOR, "search")
    key = (await store.issue_virtual_key(ACTOR, "search")).info
    assert await store.get_team_limits("search") is None and await store.get_key_limits(key.id) is None
    assert (await store.get_team("search")).to_json()["limits"] is None

    before = await version(db_engine)
    team = await store.set_team_limits("search", TEAM_LIMITS, actor=ACTOR)
    assert team.limits == TEAM_LIMITS and await store.get_team_limits("search") == TEAM_LIMITS
    assert team.to_json()["limits"] == {
        "budget_usd": "25.00",  # money as a string, as given
        "budget_period": "week",
        "tokens_budget": None,
        "prompt_tokens_budget": None,
        "completion_tokens_budget": None,
        "rpm": 600,
        "tpm": None,
        "max_concurrent": None,
        "soft_ratio": "0.5",
    }
    # A mapping (an API body) is validated into Limits on the way in.
    info = await store.set_key_limits(
        key.id, {"tokens_budget": 1_000_000, "tpm": 100_000, "max_concurrent": 4}, actor=ACTOR
    )
    assert info.limits == KEY_LIMITS and info.to_json(store.clock())["limits"]["tpm"] == 100_000
    assert [k.limits for k in await store.list_keys("search")] == [KEY_LIMITS]
    assert await version(db_engine) == before + 2

    # The same limits again: nothing changes, nothing is audited, no replica reloads.
    await store.set_team_limits("search", Limits.from_dict(TEAM_LIMITS.to_dict()), actor=ACTOR)
    assert await version(db_engine) == before + 2

    # Replacing is whole: what is not given is gone.
    replaced = await store.set_team_limits("search", {"max_concurrent": 2}, actor=ACTOR)
    assert replaced.limits == Limits(max_concurrent=2)
    await store.set_team_limits("search", None, actor=ACTOR)
    await store.set_key_limits(key.id, None, actor=ACTOR)
    assert await store.get_team_limits("search") is None and await store.get_key_limits(key.id) is None
    await store.set_key_limits(key.id, None, actor=ACTOR)  # clearing twice audits once
    async with db_engine.connect() as conn:  # cleared is SQL NULL, not JSON null
        nulls = await conn.execute(select(func.count()).select_from(teams).where(teams.c.limits.is_(None)))
        assert nulls.scalar_one() == 1
        assert (await conn.execute(select(api_keys.c.limits))).scalar_one() is None

    entries = [e for e in await store.audit() if e.action.endswith(".limits")]
    assert [(e.action, e.target, e.actor) for e in reversed(entries)] == [
        ("team.limits", "team:search", ACTOR),
        ("key.limits", f"key:{key.id}", ACTOR),
        ("team.limits", "team:search", ACTOR),
        ("team.limits", "team:search", ACTOR),
        ("key.limits", f"key:{key.id}", ACTOR),
    ]
    assert entries[-1].detail == TEAM_LIMITS.to_dict()
    assert entries[-3].detail["max_concurrent"] == 2 and entries[-3].detail["budget_usd"] is None
    assert entries[0].detail == {} and entries[1].detail == {}  # cleared
    assert await version(db_engine) == before + 5


async def test_missing_subjects_and_invalid_limits(db_engine: AsyncEngine) -> None:
    store = TenancyStore(db_engine, FP)
    await store.create_team(ACTOR, "search")
    with pytest.raises(NotFound, match="no team named 'nobody'"):
        await store.set_team_limits("nobody", TEAM_LIMITS, actor=ACTOR)
    with pytest.raises(NotFound, match="no key with id 999"):
        await store.set_key_limits(999, None, actor=ACTOR)
    with pytest.raises(NotFound):
        await store.get_team_limits("nobody")

    cases = [
        ({"rpm": -1}, "rpm", "rpm must be a non-negative integer"),
        ({"tpm": "lots"}, "tpm", "tpm must be a non-negative integer"),
        ({"budget_usd": "ten"}, "budget_usd", "budget_usd must be a decimal number, not 'ten'"),
        ({"budget_usd": "-5"}, "budget_usd", "budget_usd must not be negative"),
        ({"budget_period": "year"}, "budget_period", "budget_period must be one of day, week, month"),
        ({"soft_ratio": "1.5"}, "soft_ratio", "soft_ratio must be a Decimal in (0, 1]"),
        ({"rpm": 5, "colour": "red"}, "colour", "unknown quota limit(s): colour"),
        ({"rpm": 2**53}, "rpm", "rpm must be at most 9007199254740991"),  # Redis counts in doubles
        ({"budget_usd": "1e400"}, "budget_usd", "budget_usd must be at most 9007199254.740991"),
        (["rpm", 5], "limits", "limits must be an object"),
    ]
    for body, param, message in cases:
        with pytest.raises(RequestError) as caught:
            await store.set_team_limits("search", body, actor=ACTOR)  # type: ignore[arg-type]
        assert caught.value.status_code == 400 and caught.value.param == param, body
        assert message in caught.value.message, (body, caught.value.message)
    assert await store.get_team_limits("search") is None
    assert [e for e in await store.audit() if e.action == "team.limits"] == []


async def test_every_replica_reads_limits_from_memory(db_engine: AsyncEngine) -> None:
    a = await started(db_engine)
    b = await started(db_engine)  # another replica
    try:
        await a.store.create_team(ACTOR, "search")
        await a.store.create_team(ACTOR, "ads")
        issued = await a.store.issue_virtual_key(ACTOR, "search")
        fp = issued.info.fingerprint
        revoked = await a.store.issue_virtual_key(ACTOR, "ads")
        await b.refresh()
        assert b.limits("search", fp) == (None, None) and b.limited_subjects() == []

        await a.store.set_team_limits("search", TEAM_LIMITS, actor=ACTOR)
        await a.store.set_key_limits(issued.info.id, KEY_LIMITS, actor=ACTOR)
        await a.store.set_key_limits(revoked.info.id, KEY_LIMITS, actor=ACTOR)
        await a.store.revoke_key(ACTOR, revoked.info.id)
        await a.store.set_team_limits("ads", Limits(), actor=ACTOR)  # stored, but limits nothing
        # The replica that made the change at once; another one after its next refresh.
        assert a.limits("search", fp) == (TEAM_LIMITS, KEY_LIMITS)
        assert b.limits("search", fp) == (None, None)
        assert await b.refresh() is True
        assert b.limits("search", fp) == (TEAM_LIMITS, KEY_LIMITS)
        assert b.limits("search", None) == (TEAM_LIMITS, None)
        assert b.limits("unassigned", "f" * 64) == (None, None)
        assert b.limits("ads", revoked.info.fingerprint) == (None, None)  # empty; revoked
        assert b.limited_subjects() == [
            (Subject("team", "search"), TEAM_LIMITS),
            (Subject("key", fp), KEY_LIMITS),
        ]

        await a.store.set_team_limits("search", None, actor=ACTOR)
        await b.refresh()
        assert b.limits("search", fp) == (None, KEY_LIMITS)
        assert b.limited_subjects() == [(Subject("key", fp), KEY_LIMITS)]
    finally:
        await a.stop()
        await b.stop()


async def test_reload_listeners_run_after_every_reload_and_cannot_break_it(
    db_engine: AsyncEngine, caplog: pytest.LogCaptureFixture
) -> None:
    tenancy = Tenancy(FP, TenancyConfig(upstream_api_key="up"), sheet_rows=[])
    seen: list[list[tuple[Subject, Limits]]] = []

    async def failing() -> None:
        raise RuntimeError("listener bug")

    async def listener() -> None:
        seen.append(tenancy.limited_subjects())

    tenancy.add_reload_listener(failing)
    tenancy.add_reload_listener(listener)
    with caplog.at_level(logging.ERROR, logger="meter.tenancy"):
        await tenancy.start(db_engine)
    try:
        assert seen == [[]]  # the first load
        assert "reload listener failed" in caplog.text and "listener bug" in caplog.text
        assert tenancy.loaded
        await tenancy.store.create_team(ACTOR, "search")  # a local write reloads at once
        await tenancy.store.set_team_limits("search", TEAM_LIMITS, actor=ACTOR)
        assert seen[-1] == [(Subject("team", "search"), TEAM_LIMITS)] and len(seen) == 3
        assert await tenancy.refresh() is False and len(seen) == 3  # nothing changed, no reload
    finally:
        await tenancy.stop()


async def test_unreadable_stored_limits_keep_the_previous_ones(
    db_engine: AsyncEngine, caplog: pytest.LogCaptureFixture
) -> None:
    """E.g. written by a newer meter during a rolling upgrade: the rest of the directory still loads."""
    registry = CollectorRegistry()
    tenancy = await started(db_engine, registry=registry)
    try:
        await tenancy.store.create_team(ACTOR, "search")
        await tenancy.store.create_team(ACTOR, "ads")
        await tenancy.store.set_team_limits("search", TEAM_LIMITS, actor=ACTOR)
        async with db_engine.begin() as conn:
            future = {**TEAM_LIMITS.to_dict(), "gpu_seconds": 5}
            await conn.execute(update(teams).where(teams.c.name == "search").values(limits=future))
            await conn.execute(text("UPDATE tenancy_state SET version = version + 1"))
        issued = await tenancy.store.issue_virtual_key(ACTOR, "ads")  # reloads
        assert "cannot read the quota limits of team" in caplog.text and "gpu_seconds" in caplog.text
        assert tenancy.resolve(issued.key).team == "ads"
        assert tenancy.limits("search", None) == (TEAM_LIMITS, None)  # kept
        assert tenancy.limits("ads", None) == (None, None)  # had none: none
        assert registry.get_sample_value("meter_key_directory_refresh_errors_total") == 1
        # The team stays manageable on this version; its views show no limits it cannot read.
        assert (await tenancy.store.get_team("search")).limits is None
        await tenancy.store.set_team_limits("search", {"rpm": 5}, actor=ACTOR)
        assert tenancy.limits("search", None) == (Limits(rpm=5), None)
    finally:
        await tenancy.stop()
