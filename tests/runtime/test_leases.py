"""flynn_runtime/leases.py against a real PostgreSQL: one holder at a time, epochs, fencing."""

from __future__ import annotations

import asyncio

import psycopg
import pytest

from flynn_runtime import leases
from flynn_runtime.database import Database
from flynn_runtime.database_url import parse_database_url
from flynn_runtime.pg_migrations import Migration

MIGRATIONS = [
    Migration(1, "leases", leases.MIGRATION_SQL),
    Migration(2, "items", "CREATE TABLE items (name TEXT PRIMARY KEY, value TEXT NOT NULL);"),
]


async def _open(url: str) -> Database:
    return await Database.open(parse_database_url(url), service="t", schema="flynn_lt", migrations=MIGRATIONS)


async def _fenced_write(db: Database, holder: str, epochs: dict[str, int], value: str) -> None:
    async with db.transaction() as c:
        sql, params = leases.fence("s", holder, epochs)
        await c.execute(sql, params)
        for name in epochs:
            await c.execute(
                "INSERT INTO items VALUES (%s, %s) ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value",
                (name, value),
            )


async def test_one_holder_then_takeover_after_expiry_fences_the_old_one(postgres_url: str) -> None:
    db = await _open(postgres_url)
    try:
        async with db.connection() as c:
            a = await leases.acquire(c, "s", "k1", "A", "10.0.0.1:1", ttl=0.5)
            assert a.held_by("A") and a.epoch == 1 and a.expires_in > 0
            b = await leases.acquire(c, "s", "k1", "B", "10.0.0.2:1", ttl=0.5)
            assert b.holder == "A" and b.address == "10.0.0.1:1" and b.epoch == 1  # refused: A's is live
        await _fenced_write(db, "A", {"k1": 1}, "from A")
        await asyncio.sleep(0.6)
        async with db.connection() as c:
            assert [x.name for x in await leases.expired(c, "s")] == ["k1"]
            b = await leases.acquire(c, "s", "k1", "B", "10.0.0.2:1", ttl=5)
            assert b.held_by("B") and b.epoch == 2
            assert await leases.renew(c, "s", "A", ttl=5) == {}  # A learns it lost k1
            assert await leases.renew(c, "s", "B", ttl=5) == {"k1": 2}
        with pytest.raises(psycopg.Error) as err:
            await _fenced_write(db, "A", {"k1": 1}, "stale A")
        stale = leases.stale_from(err.value, "s")
        assert stale is not None and stale.names == ("k1",)
        await _fenced_write(db, "B", {"k1": 2}, "from B")
        async with db.connection() as c:
            row = await (await c.execute("SELECT value FROM items WHERE name = 'k1'")).fetchone()
            assert row == ("from B",)
            assert await leases.held(c, "s") == {"B": 1}
    finally:
        await db.close()


async def test_release_bumps_the_epoch_and_a_batch_is_refused_as_a_whole(postgres_url: str) -> None:
    db = await _open(postgres_url)
    try:
        async with db.connection() as c:
            e1 = (await leases.acquire(c, "s", "k1", "A", "", ttl=5)).epoch
            e2 = (await leases.acquire(c, "s", "k2", "A", "", ttl=5)).epoch
            assert await leases.release(c, "s", "A", {"k2": e2}) == 1
            again = await leases.acquire(c, "s", "k2", "A", "", ttl=5)
            assert again.held_by("A") and again.epoch == e2 + 2  # release +1, acquire +1
        with pytest.raises(psycopg.Error) as err:  # k2's old epoch spoils the whole batch
            await _fenced_write(db, "A", {"k1": e1, "k2": e2}, "x")
        stale = leases.stale_from(err.value, "s")
        assert stale is not None and stale.names == ("k2",)
        async with db.connection() as c:
            assert await (await c.execute("SELECT count(*) FROM items")).fetchone() == (0,)
    finally:
        await db.close()


async def test_takeover_waits_for_the_old_owners_open_transaction(postgres_url: str) -> None:
    """The fence's FOR SHARE lock makes a takeover wait until the old owner's write committed, so the
    new owner reads state that includes it."""
    db = await _open(postgres_url)
    try:
        async with db.connection() as c:
            await leases.acquire(c, "s", "k1", "A", "", ttl=0.2)
        await asyncio.sleep(0.3)  # expired, not yet taken over
        order: list[str] = []
        async with db.transaction() as tx:
            sql, params = leases.fence("s", "A", {"k1": 1})
            await tx.execute(sql, params)

            async def take() -> None:
                async with db.connection() as c:
                    lease = await leases.acquire(c, "s", "k1", "B", "", ttl=5)
                    order.append(f"B@{lease.epoch}")

            task = asyncio.ensure_future(take())
            await asyncio.sleep(0.3)
            order.append("A commits")
            await tx.execute("INSERT INTO items VALUES ('k1', 'A')")
        await asyncio.wait_for(task, 5)
        assert order == ["A commits", "B@2"]
    finally:
        await db.close()
