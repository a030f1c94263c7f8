"""The principal store on both backends (embedded SQLite, a real PostgreSQL): issue, revoke by name
and by fingerprint, tokens-file revocations, versions, only hashes stored, and state that survives a
reopen. On PostgreSQL also: two stores (two replicas' pools) on one database see each other's
changes, concurrent revocations revoke once, a change through one wakes the other's cache by
NOTIFY alone (or, when the notification is lost, by the safety poll), and leftover SQLite files of
an earlier release merge without undoing a revocation."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from config_svc.principal_cache import PrincipalCache
from config_svc.principal_store import PrincipalSet, PrincipalStore
from config_svc.principal_store_pg import NOTIFY_CHANNEL, PgPrincipalStore, adopt_sqlite_file
from config_svc.principal_store_sqlite import SqlitePrincipalStore
from config_svc.revision_store import SCHEMA
from config_svc.revision_store_pg import MIGRATIONS
from flynn_runtime.auth import Role, hash_token
from flynn_runtime.pg_listen import Listener
from tests.support.postgres import Databases

Opener = Callable[[], Awaitable[PrincipalStore]]


@pytest.fixture
async def open_store(tmp_path: Path, database_url: str, databases: Databases) -> AsyncIterator[Opener]:
    """Opens another store on the same state (a restart, or another replica on PostgreSQL)."""
    stores: list[PrincipalStore] = []

    async def opener() -> PrincipalStore:
        store: PrincipalStore
        if not database_url:
            store = SqlitePrincipalStore(tmp_path / "config" / "principals.db")
        else:
            store = PgPrincipalStore(
                await databases.open(database_url, service="t", schema=SCHEMA, migrations=MIGRATIONS)
            )
        stores.append(store)
        return store

    yield opener
    for s in stores:
        await s.close()


async def test_issue_and_revoke_by_name_and_fingerprint(open_store: Opener) -> None:
    store = await open_store()
    v0 = await store.version()
    alice, alice_token = await store.issue("alice", Role.OPERATOR, [], "operator:admin")
    bot, _ = await store.issue("bot", Role.CHANNEL, ["telegram", "sms"], "operator:alice")
    bot2, _ = await store.issue("bot", Role.CHANNEL, ["telegram"], "operator:alice")
    assert alice.sha256 == hash_token(alice_token) and alice.fingerprint == alice.sha256[:16]
    loaded = await store.load()
    assert loaded.version == await store.version() > v0
    assert [r.name for r in loaded.active()] == ["alice", "bot", "bot"]
    assert loaded.issued[1].channels == ("telegram", "sms") and loaded.issued[1].role is Role.CHANNEL
    assert loaded.issued[0].issued_by == "operator:admin" and loaded.revoked_hashes() == frozenset()

    by_name = await store.revoke_issued("bot", "", "operator:alice")
    assert {r.sha256 for r in by_name} == {bot.sha256, bot2.sha256}
    assert all(r.revoke_time is not None for r in by_name)
    assert await store.revoke_issued("bot", "", "operator:alice") == []  # nothing left to revoke
    v1 = await store.version()
    by_fp = await store.revoke_issued("", alice.fingerprint, "operator:admin")
    assert [r.name for r in by_fp] == ["alice"]
    assert await store.version() > v1
    after = await store.load()
    assert after.active() == [] and len(after.issued) == 3
    assert after.revoked_hashes() == {alice.sha256, bot.sha256, bot2.sha256}
    assert await store.revoke_issued("nobody", "", "x") == []


async def test_file_revocations_and_only_hashes_stored(open_store: Opener) -> None:
    store = await open_store()
    v0 = await store.version()
    assert await store.revoke_file_hash("ab" * 32, "queue", "operator:admin") is True
    v1 = await store.version()
    assert v1 > v0
    assert await store.revoke_file_hash("ab" * 32, "queue", "operator:admin") is False
    assert await store.version() == v1  # no change, no new version
    _, token = await store.issue("carol", Role.AGENT, [], "operator:admin")
    loaded = await store.load()
    assert set(loaded.revoked_file) == {"ab" * 32} and loaded.revoked_hashes() == {"ab" * 32}
    # What is stored, read straight from the backend's table: hashes, never the token.
    if isinstance(store, PgPrincipalStore):
        async with store.db.connection() as c:
            rows = await (await c.execute("SELECT * FROM principals_issued")).fetchall()
    else:
        assert isinstance(store, SqlitePrincipalStore)
        rows = store.sqlite.execute("SELECT * FROM issued").fetchall()
    stored = repr(rows)
    assert hash_token(token) in stored
    assert token not in stored and token.split("_", 1)[-1] not in stored and token not in repr(loaded)


async def test_state_survives_a_reopen(open_store: Opener) -> None:
    store = await open_store()
    kept, _ = await store.issue("kept", Role.OPERATOR, [], "operator:admin")
    gone, _ = await store.issue("gone", Role.CHANNEL, ["c"], "operator:admin")
    await store.revoke_issued("gone", "", "operator:admin")
    await store.revoke_file_hash("cd" * 32, "reactions", "operator:admin")
    before = await store.load()
    await store.close()
    again = await (await open_store()).load()
    assert again.issued == before.issued
    assert [r.sha256 for r in again.active()] == [kept.sha256]
    assert again.revoked_hashes() == {gone.sha256, "cd" * 32}


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_two_replicas_share_the_principals(open_store: Opener) -> None:
    a, b = await open_store(), await open_store()
    rec, _ = await a.issue("dave", Role.OPERATOR, [], "operator:admin")
    assert [r.sha256 for r in (await b.load()).active()] == [rec.sha256]
    assert await a.version() == await b.version()
    # Both replicas revoke the same principal at once: exactly one of them revokes it.
    results = await asyncio.gather(*(s.revoke_issued("dave", "", "operator:x") for s in (a, b, a, b)))
    assert sorted(len(r) for r in results) == [0, 0, 0, 1]
    assert (await a.load()).revoked_hashes() == {rec.sha256}


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_a_change_through_one_replica_wakes_the_others_cache_by_notify(open_store: Opener) -> None:
    a, b = await open_store(), await open_store()
    assert isinstance(b, PgPrincipalStore)
    seen: list[tuple[float, PrincipalSet]] = []
    cache = PrincipalCache(b, lambda s: seen.append((time.monotonic(), s)))
    await cache.refresh()
    cache.start()
    # A 30 s safety poll: only the notification can wake the cache within the test.
    listener = Listener(b.db, (NOTIFY_CHANNEL,), cache.wake, poll_seconds=30)
    listener.start()
    try:
        await asyncio.sleep(0.3)  # LISTENing
        rec, _ = await a.issue("erin", Role.CHANNEL, ["web"], "operator:admin")
        async with asyncio.timeout(5):
            while not seen or rec.sha256 not in {r.sha256 for r in seen[-1][1].active()}:  # noqa: ASYNC110
                await asyncio.sleep(0.005)
        at = time.monotonic()
        await a.revoke_issued("erin", "", "operator:admin")
        async with asyncio.timeout(5):
            while rec.sha256 not in seen[-1][1].revoked_hashes():  # noqa: ASYNC110
                await asyncio.sleep(0.005)
        assert seen[-1][0] - at < 1.0, "the revocation reached the other replica's cache late"
        assert listener.notifications >= 2
        versions = [s.version for _, s in seen]
        assert versions == sorted(set(versions))  # only ever newer sets are published
    finally:
        await listener.stop()
        await cache.stop()


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_leftover_sqlite_files_of_several_replicas_merge_without_undoing_a_revocation(
    tmp_path: Path, open_store: Opener
) -> None:
    # Replica a's file: x and y issued, y revoked, a tokens-file hash revoked. Replica b's file
    # started as a copy, then revoked x and issued z.
    a_file = tmp_path / "a" / "principals.db"
    a = SqlitePrincipalStore(a_file)
    x, _ = await a.issue("x", Role.OPERATOR, [], "operator:admin")
    y, _ = await a.issue("y", Role.CHANNEL, ["web", "sms"], "operator:admin")
    await a.revoke_issued("y", "", "operator:admin")
    await a.revoke_file_hash("ef" * 32, "channel", "operator:admin")
    await a.close()
    b_file = tmp_path / "b" / "principals.db"
    b_file.parent.mkdir()
    b_file.write_bytes(a_file.read_bytes())
    b = SqlitePrincipalStore(b_file)
    await b.revoke_issued("x", "", "operator:b")
    z, _ = await b.issue("z", Role.AGENT, [], "operator:b")
    await b.close()

    store = await open_store()
    assert isinstance(store, PgPrincipalStore)
    assert await adopt_sqlite_file(store.db, b_file) == {"principals": 3, "revoked file principals": 1}
    assert await adopt_sqlite_file(store.db, a_file) == {"principals": 2, "revoked file principals": 1}
    got = await store.load()
    assert [r.sha256 for r in got.active()] == [
        z.sha256
    ]  # a's file, where x is active, did not undo b's revocation
    assert got.revoked_hashes() == {x.sha256, y.sha256, "ef" * 32}
    assert next(r for r in got.issued if r.name == "y").channels == ("web", "sms")
    assert not a_file.exists() and (a_file.parent / "principals.db.adopted").exists()
    assert await adopt_sqlite_file(store.db, a_file) == {}  # once


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_a_lost_notification_is_made_up_by_the_safety_poll(open_store: Opener) -> None:
    a, b = await open_store(), await open_store()
    assert isinstance(b, PgPrincipalStore)
    seen: list[PrincipalSet] = []
    cache = PrincipalCache(b, seen.append)
    await cache.refresh()
    cache.start()
    # Listening on a channel nobody notifies: only the 0.2 s poll can wake the cache.
    listener = Listener(b.db, ("flynn_test_silence",), cache.wake, poll_seconds=0.2)
    listener.start()
    try:
        rec, _ = await a.issue("fay", Role.OPERATOR, [], "operator:admin")
        async with asyncio.timeout(5):
            while rec.sha256 not in {r.sha256 for r in seen[-1].active()}:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        assert listener.notifications == 0
        loads = cache.loads
        await asyncio.sleep(0.7)  # quiet polls read the version only
        assert cache.loads == loads
    finally:
        await listener.stop()
        await cache.stop()
