"""Teams and keys on real SQLite and PostgreSQL: the lifecycle through the store, key resolution rules,
the in-memory directory and its refresh across replicas, last-use times, and the audit trail."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from meter.db.tenancy_models import api_keys, audit_log, teams
from meter.errors import (
    Conflict,
    DirectoryUnavailable,
    KeyRejected,
    NotFound,
    RequestError,
    UpstreamCredentialMissing,
)
from meter.tenancy.credentials import UpstreamCredentials, load_credentials_file
from meter.tenancy.identity import KeyFingerprinter
from meter.tenancy.keys import (
    UNASSIGNED,
    KeyEntry,
    KeyKind,
    ResolutionKind,
    UnknownKeyPolicy,
    new_virtual_key,
    resolve,
)
from meter.tenancy.runtime import Tenancy, TenancyConfig
from meter.tenancy.store import TenancyStore

SECRET = b"0123456789abcdef0123456789abcdef"
FP = KeyFingerprinter(SECRET)
ACTOR = "test:admin"


class Clock:
    """A settable wall clock (epoch seconds) for expiry."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_tenancy(**config: Any) -> Tenancy:
    return Tenancy(FP, TenancyConfig(**config), sheet_rows=[])


async def started(engine: AsyncEngine, **config: Any) -> Tenancy:
    tenancy = make_tenancy(**config)
    await tenancy.start(engine)
    return tenancy


# -- the pure resolution rules --------------------------------------------------------------------


def test_virtual_keys_are_long_random_and_prefixed():
    keys = {new_virtual_key() for _ in range(100)}
    assert len(keys) == 100
    assert all(k.startswith("mk-") and len(k) >= 3 + 32 for k in keys)


def test_resolution_rules():
    virtual, passthrough = "mk-" + "v" * 43, "fw_pass_0001"
    entries = {
        FP.identify(virtual).fingerprint: KeyEntry(
            1, "search", KeyKind.VIRTUAL, upstream_authorization="Bearer up"
        ),
        FP.identify(passthrough).fingerprint: KeyEntry(2, "ads", KeyKind.PASSTHROUGH),
        FP.identify("fw_revoked").fingerprint: KeyEntry(3, "ads", KeyKind.PASSTHROUGH, revoked=True),
        FP.identify("mk-expired").fingerprint: KeyEntry(
            4, "ads", KeyKind.VIRTUAL, expires_at=100.0, upstream_authorization="Bearer up"
        ),
        FP.identify("mk-nocred").fingerprint: KeyEntry(5, "ads", KeyKind.VIRTUAL, credential="gone"),
    }

    def run(key: str | None, policy: UnknownKeyPolicy = UnknownKeyPolicy.ALLOW, now: float = 50.0) -> Any:
        return resolve(entries, key, None if key is None else FP.identify(key), policy, now)[0]

    got = run(virtual)
    assert (got.team, got.kind, got.key_id, got.upstream_authorization) == (
        "search",
        ResolutionKind.VIRTUAL,
        1,
        "Bearer up",
    )
    assert got.fingerprint == FP.identify(virtual).fingerprint and got.suffix == "...vvvv"
    got = run(passthrough)
    assert (got.team, got.kind, got.upstream_authorization) == ("ads", ResolutionKind.PASSTHROUGH, None)
    got = run("fw_somebody_else")
    assert (got.team, got.kind) == (UNASSIGNED, ResolutionKind.UNKNOWN)
    assert run(None).kind is ResolutionKind.ANONYMOUS
    assert run("mk-expired", now=99.9).kind is ResolutionKind.VIRTUAL

    for key, policy, message in [
        ("mk-unknown-virtual", UnknownKeyPolicy.ALLOW, "unknown virtual key"),  # never forwarded
        ("fw_somebody_else", UnknownKeyPolicy.REJECT, "not registered"),
        (None, UnknownKeyPolicy.REJECT, "no API key"),
        ("fw_revoked", UnknownKeyPolicy.ALLOW, "revoked"),
        ("mk-expired", UnknownKeyPolicy.ALLOW, "expired"),
    ]:
        with pytest.raises(KeyRejected, match=message) as caught:
            run(key, policy, now=100.0)
        assert caught.value.status_code == 401
        assert key is None or key not in caught.value.message  # the suffix only
        body = caught.value.body().decode()
        assert '"type":"authentication_error"' in body and '"code":"invalid_api_key"' in body
    with pytest.raises(UpstreamCredentialMissing, match="credential 'gone' of team 'ads'"):
        run("mk-nocred")


def test_credentials_file_and_repr(tmp_path):
    path = tmp_path / "credentials.toml"
    path.write_text('search-prod = "fw_team_secret"\n')
    credentials = UpstreamCredentials("fw_default", load_credentials_file(str(path)))
    assert credentials.authorization(None) == "Bearer fw_default"
    assert credentials.authorization("search-prod") == "Bearer fw_team_secret"
    assert credentials.authorization("other") is None
    assert "fw_" not in repr(credentials)
    path.write_text('"bad name" = "x"\n')
    with pytest.raises(ValueError, match="bad name"):
        load_credentials_file(str(path))
    path.write_text("empty = ''\n")
    with pytest.raises(ValueError, match="non-empty"):
        load_credentials_file(str(path))


# -- the store on SQLite and PostgreSQL -----------------------------------------------------------


async def test_team_lifecycle_with_audit(db_engine: AsyncEngine) -> None:
    store = TenancyStore(db_engine, FP, credential_names={"search-prod"})
    created = await store.create_team(
        ACTOR,
        "search",
        description="Search ranking",
        labels={"cost-center": "42"},
        upstream_credential="search-prod",
    )
    assert (created.name, created.description, created.labels, created.upstream_credential) == (
        "search",
        "Search ranking",
        {"cost-center": "42"},
        "search-prod",
    )
    await store.create_team(ACTOR, "ads")
    assert [t.name for t in await store.list_teams()] == ["ads", "search"]
    with pytest.raises(Conflict):
        await store.create_team(ACTOR, "search")
    for bad in ("unassigned", "has space", "", "x" * 65):
        with pytest.raises(RequestError):
            await store.create_team(ACTOR, bad)
    with pytest.raises(RequestError, match="not configured"):
        await store.create_team(ACTOR, "c", upstream_credential="nope")

    updated = await store.update_team(
        ACTOR, "search", new_name="search-v2", labels={}, upstream_credential=None
    )
    assert (updated.name, updated.labels, updated.upstream_credential) == ("search-v2", {}, None)
    assert updated.description == "Search ranking"  # untouched
    with pytest.raises(NotFound):
        await store.get_team("search")
    with pytest.raises(Conflict):
        await store.update_team(ACTOR, "ads", new_name="search-v2")

    await store.issue_virtual_key(ACTOR, "ads")
    with pytest.raises(Conflict, match="active key"):
        await store.delete_team(ACTOR, "ads")
    assert await store.delete_team(ACTOR, "ads", force=True) == 1
    assert await store.delete_team(ACTOR, "search-v2") == 0
    assert await store.list_teams() == []

    entries = await store.audit(limit=100)
    assert [e.action for e in reversed(entries)] == [
        "team.create",
        "team.create",
        "team.update",
        "key.issue",
        "team.delete",
        "team.delete",
    ]
    assert all(e.actor == ACTOR for e in entries)
    assert entries[0].target == "team:search-v2" and entries[1].detail == {"keys_removed": 1, "force": True}
    async with db_engine.connect() as conn:
        version = (await conn.execute(text("SELECT version FROM tenancy_state"))).scalar_one()
    assert version == 6  # every audited write bumped it


async def test_key_lifecycle_stores_only_fingerprints(db_engine: AsyncEngine) -> None:
    store = TenancyStore(db_engine, FP)
    await store.create_team(ACTOR, "search")
    await store.create_team(ACTOR, "ads")
    expires = datetime.now(UTC) + timedelta(days=30)
    issued = await store.issue_virtual_key(ACTOR, "search", name="ci", expires_at=expires)
    assert issued.key.startswith("mk-") and issued.info.suffix == "..." + issued.key[-4:]
    assert issued.info.fingerprint == FP.identify(issued.key).fingerprint
    assert issued.info.kind is KeyKind.VIRTUAL and issued.info.expires_at == expires
    provider_key = "fw_provider_key_for_ads_9876"
    registered = await store.register_passthrough_key(ACTOR, "ads", key=provider_key)
    assert (registered.kind, registered.suffix) == (KeyKind.PASSTHROUGH, "...9876")
    by_fp = await store.register_passthrough_key(ACTOR, "ads", fingerprint="ab" * 32, suffix="...beef")
    assert by_fp.fingerprint == "ab" * 32

    with pytest.raises(Conflict):
        await store.register_passthrough_key(ACTOR, "search", key=provider_key)
    with pytest.raises(RequestError, match="mk-"):
        await store.register_passthrough_key(ACTOR, "ads", key="mk-looks-virtual")
    with pytest.raises(RequestError, match="exactly one"):
        await store.register_passthrough_key(ACTOR, "ads")
    with pytest.raises(RequestError, match="64 hexadecimal"):
        await store.register_passthrough_key(ACTOR, "ads", fingerprint="xyz")
    with pytest.raises(RequestError, match="future"):
        await store.issue_virtual_key(ACTOR, "ads", expires_at=datetime(2020, 1, 1, tzinfo=UTC))
    with pytest.raises(NotFound):
        await store.issue_virtual_key(ACTOR, "nobody")

    now = datetime.now(UTC)
    assert [(k.team, k.kind, k.status(now)) for k in await store.list_keys()] == [
        ("search", KeyKind.VIRTUAL, "active"),
        ("ads", KeyKind.PASSTHROUGH, "active"),
        ("ads", KeyKind.PASSTHROUGH, "active"),
    ]
    assert [k.id for k in await store.list_keys("ads")] == [registered.id, by_fp.id]

    moved = await store.move_key(ACTOR, registered.id, "search")
    assert moved.team == "search"
    revoked = await store.revoke_key(ACTOR, issued.info.id)
    assert revoked.status(now) == "revoked"
    assert (await store.revoke_key(ACTOR, issued.info.id)).revoked_at == revoked.revoked_at  # idempotent
    with pytest.raises(NotFound):
        await store.revoke_key(ACTOR, 9999)

    # Nothing stored anywhere holds a key: not the key table, not the audit log.
    async with db_engine.connect() as conn:
        dump = repr((await conn.execute(select(api_keys))).all()) + repr(
            (await conn.execute(select(audit_log))).all()
        )
        dump += repr((await conn.execute(select(teams))).all())
    assert issued.key not in dump and issued.key[3:] not in dump and provider_key not in dump
    actions = [e.action for e in await store.audit(target=f"key:{issued.info.id}")]
    assert actions == ["key.revoke", "key.issue"]


async def test_directory_resolves_from_memory_and_every_replica_follows_changes(
    db_engine: AsyncEngine,
) -> None:
    a = await started(db_engine, upstream_api_key="fw_global_upstream")
    b = await started(db_engine, upstream_api_key="fw_global_upstream")  # another replica
    try:
        await a.store.create_team(ACTOR, "search")
        issued = await a.store.issue_virtual_key(ACTOR, "search")
        # The replica that made the change sees it at once (local invalidation) ...
        got = a.resolve(issued.key)
        assert (got.team, got.upstream_authorization) == ("search", "Bearer fw_global_upstream")
        # ... another one after its next refresh (every 2 s by default; driven by hand here).
        with pytest.raises(KeyRejected):
            b.resolve(issued.key)
        assert await b.refresh() is True
        assert b.resolve(issued.key).team == "search"
        assert await b.refresh() is False  # nothing changed: the version alone was read

        # Moving the key and revoking it reach the other replica the same way.
        await a.store.create_team(ACTOR, "ads")
        await a.store.move_key(ACTOR, issued.info.id, "ads")
        await b.refresh()
        assert b.resolve(issued.key).team == "ads"
        await a.store.revoke_key(ACTOR, issued.info.id)
        await b.refresh()
        with pytest.raises(KeyRejected, match="revoked"):
            b.resolve(issued.key)
    finally:
        await a.stop()
        await b.stop()


async def test_refresh_loop_applies_changes_within_the_interval(db_engine: AsyncEngine) -> None:
    writer = await started(db_engine, upstream_api_key="up")
    reader = await started(db_engine, refresh_interval=0.05, upstream_api_key="up")
    try:
        await writer.store.create_team(ACTOR, "search")
        issued = await writer.store.issue_virtual_key(ACTOR, "search")

        async def resolved() -> bool:
            try:
                reader.resolve(issued.key)
            except KeyRejected:
                return False
            return True

        import asyncio

        async with asyncio.timeout(10):
            while not await resolved():
                await asyncio.sleep(0.01)
    finally:
        await writer.stop()
        await reader.stop()


async def test_team_credentials_and_missing_credentials(db_engine: AsyncEngine) -> None:
    tenancy = await started(db_engine, credentials={"search-prod": "fw_search_account"})
    try:
        await tenancy.store.create_team(ACTOR, "search", upstream_credential="search-prod")
        await tenancy.store.create_team(ACTOR, "ads")
        search_key = (await tenancy.store.issue_virtual_key(ACTOR, "search")).key
        ads_key = (await tenancy.store.issue_virtual_key(ACTOR, "ads")).key
        assert tenancy.resolve(search_key).upstream_authorization == "Bearer fw_search_account"
        with pytest.raises(UpstreamCredentialMissing, match="METER_UPSTREAM_API_KEY"):
            tenancy.resolve(ads_key)  # no team credential and no global one: refused, never sent bare
    finally:
        await tenancy.stop()


async def test_expiry_and_unknown_key_policy(db_engine: AsyncEngine) -> None:
    clock = Clock(datetime.now(UTC).timestamp())
    tenancy = Tenancy(
        FP,
        TenancyConfig(unknown_keys=UnknownKeyPolicy.REJECT, upstream_api_key="up"),
        sheet_rows=[],
        clock=clock,
    )
    await tenancy.start(db_engine)
    try:
        await tenancy.store.create_team(ACTOR, "search")
        expires = datetime.now(UTC) + timedelta(hours=1)
        key = (await tenancy.store.issue_virtual_key(ACTOR, "search", expires_at=expires)).key
        assert tenancy.resolve(key).team == "search"
        clock.now = expires.timestamp()
        with pytest.raises(KeyRejected, match="expired"):
            tenancy.resolve(key)
        with pytest.raises(KeyRejected, match="not registered"):
            tenancy.resolve("fw_nobody")
        with pytest.raises(KeyRejected, match="no API key"):
            tenancy.resolve(None)
    finally:
        await tenancy.stop()


async def test_last_used_is_flushed_in_the_background_not_per_request(db_engine: AsyncEngine) -> None:
    clock = Clock(datetime(2026, 11, 3, 12, 0, tzinfo=UTC).timestamp())
    tenancy = Tenancy(FP, TenancyConfig(upstream_api_key="up"), sheet_rows=[], clock=clock)
    await tenancy.start(db_engine)
    try:
        await tenancy.store.create_team(ACTOR, "search")
        issued = await tenancy.store.issue_virtual_key(ACTOR, "search")
        tenancy.resolve(issued.key)
        assert (await tenancy.store.get_key(issued.info.id)).last_used_at is None  # not on the request
        await tenancy.refresh()
        assert (await tenancy.store.get_key(issued.info.id)).last_used_at == datetime(
            2026, 11, 3, 12, 0, tzinfo=UTC
        )
        clock.now -= 60  # an older note never moves last_used_at backwards
        tenancy.resolve(issued.key)
        await tenancy.refresh()
        assert (await tenancy.store.get_key(issued.info.id)).last_used_at == datetime(
            2026, 11, 3, 12, 0, tzinfo=UTC
        )
    finally:
        await tenancy.stop()


async def test_fail_closed_before_the_first_load_and_static_after(db_sqlite_url: str) -> None:
    from meter.db import migrate
    from meter.db.engine import create_engine

    tenancy = make_tenancy(upstream_api_key="up")
    with pytest.raises(DirectoryUnavailable) as caught:
        tenancy.resolve("fw_anything")
    assert caught.value.status_code == 503
    await migrate.upgrade(db_sqlite_url)
    engine = create_engine(db_sqlite_url)
    await tenancy.start(engine)
    await tenancy.store.create_team(ACTOR, "search")
    key = (await tenancy.store.issue_virtual_key(ACTOR, "search")).key
    await tenancy.stop()
    await engine.dispose()
    # The database goes away: refreshing fails, the last good directory keeps answering.
    await migrate.downgrade(db_sqlite_url, "base")
    engine = create_engine(db_sqlite_url)
    tenancy._engine = engine
    with pytest.raises(Exception):  # noqa: B017 - whatever the driver says
        await tenancy.refresh()
    assert tenancy.resolve(key).team == "search"
    await engine.dispose()
