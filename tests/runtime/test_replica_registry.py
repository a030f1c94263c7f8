"""The replicas table (flynn_runtime/replica_registry.py) on a real PostgreSQL: each replica's row with
its report, a silent one listed as gone after its bound (by the database's clock), a graceful stop
listed as gone at once, old rows pruned at the next join, and the answer from memory without a
database."""

from __future__ import annotations

import asyncio

from flynn_runtime import replica_registry
from flynn_runtime.database import Database
from flynn_runtime.database_url import parse_database_url
from flynn_runtime.pg_migrations import Migration
from flynn_runtime.replica_registry import ReplicaRegistry, Report

MIGRATIONS = [Migration(1, "replicas", replica_registry.MIGRATION_SQL)]


async def _open(url: str) -> Database:
    return await Database.open(parse_database_url(url), service="t", schema="flynn_rv", migrations=MIGRATIONS)


def _report(sessions: int, *, lease: bool = True) -> Report:
    return Report(ready=lease, lease_held=lease, holdings=(("sessions_owned", float(sessions)),), detail="d")


async def test_two_replicas_are_listed_and_a_silent_one_is_gone_after_its_bound(postgres_url: str) -> None:
    db = await _open(postgres_url)
    try:
        a = ReplicaRegistry(db, "a-1", "10.0.0.1:50052", lambda: _report(3), gone_after=1.0)
        b = ReplicaRegistry(db, "b-1", "10.0.0.2:50052", lambda: _report(0, lease=False), gone_after=1.0)
        await a.join()
        await b.join()
        rows = await a.list()
        assert [(r.replica_id, r.address, r.state) for r in rows] == [
            ("a-1", "10.0.0.1:50052", "ready"),
            ("b-1", "10.0.0.2:50052", "not_ready"),
        ]
        assert rows[0].holdings == (("sessions_owned", 3.0),) and rows[0].detail == "d"
        assert not rows[1].lease_held and rows[0].started_at <= rows[0].heartbeat_at
        # b stops beating (killed); a keeps beating: after b's bound b is gone, a is not.
        for _ in range(6):
            await asyncio.sleep(0.25)
            async with db.connection() as c:
                await a.beat(c)
        rows = {r.replica_id: r for r in await b.list()}
        assert rows["a-1"].state == "ready" and rows["a-1"].heartbeat_age < 1.0
        assert rows["b-1"].state == "gone" and rows["b-1"].heartbeat_age > 1.0
        # Gone rows are listed after the live ones.
        assert [r.replica_id for r in await a.list()] == ["a-1", "b-1"]
        # A graceful stop is gone at once, and stays gone although its loop beats once more.
        await a.leave()
        async with db.connection() as c:
            await a.beat(c)
        gone = {r.replica_id: r for r in await b.list()}["a-1"]
        assert gone.state == "gone" and gone.stopped and gone.detail == "stopped"
        # Rows silent for longer than RETAIN_SECONDS are deleted when a replica joins.
        async with db.connection() as c:
            await c.execute(
                "UPDATE replicas SET heartbeat_at = now() - interval '2 hours' WHERE replica_id = 'b-1'"
            )
        await ReplicaRegistry(db, "c-1", "10.0.0.3:50052", lambda: _report(0)).join()
        async with db.connection() as c:
            cur = await c.execute("SELECT replica_id FROM replicas ORDER BY replica_id")
            assert [r[0] for r in await cur.fetchall()] == ["a-1", "c-1"]
    finally:
        await db.close()


async def test_a_restarted_replica_with_the_same_id_starts_anew(postgres_url: str) -> None:
    db = await _open(postgres_url)
    try:
        first = ReplicaRegistry(db, "pod-0", "10.0.0.1:50052", lambda: _report(1))
        await first.join()
        async with db.connection() as c:
            await first.beat(c)
        started = (await first.list())[0].started_at
        await first.leave()
        await asyncio.sleep(0.05)
        again = ReplicaRegistry(db, "pod-0", "10.0.0.9:50052", lambda: _report(2))
        await again.join()
        [row] = await again.list()
        assert row.state == "ready" and not row.stopped and row.address == "10.0.0.9:50052"
        assert row.started_at > started and row.holdings == (("sessions_owned", 2.0),)
    finally:
        await db.close()


async def test_without_a_database_the_one_process_answers_from_memory() -> None:
    reg = ReplicaRegistry(None, "queue-r1", "127.0.0.1:50052", lambda: _report(4))
    [row] = await reg.list()
    assert (row.replica_id, row.address, row.state, row.heartbeat_age) == (
        "queue-r1",
        "127.0.0.1:50052",
        "ready",
        0.0,
    )
    assert row.holdings == (("sessions_owned", 4.0),)
