"""Runtime pieces of several replicas against a real PostgreSQL: LISTEN/NOTIFY wake-ups with a safety
poll (flynn_runtime/pg_listen.py), readiness that follows the replica's own state besides the
database (DatabaseHealth `ready`), and the advertised address (flynn_runtime/replica.py)."""

from __future__ import annotations

import asyncio

import pytest

from flynn_runtime.database import Database
from flynn_runtime.database_health import DatabaseHealth
from flynn_runtime.database_url import parse_database_url
from flynn_runtime.pg_listen import Listener
from flynn_runtime.pg_migrations import Migration
from flynn_runtime.replica import advertise_address

MIGRATIONS = [Migration(1, "nothing", "CREATE TABLE t (x INT);")]


async def _open(url: str) -> Database:
    return await Database.open(parse_database_url(url), service="t", schema="flynn_rr", migrations=MIGRATIONS)


async def test_notify_wakes_the_listener_and_the_poll_wakes_it_without_one(postgres_url: str) -> None:
    db = await _open(postgres_url)
    wakes: list[float] = []
    woken = asyncio.Event()

    def wake() -> None:
        wakes.append(asyncio.get_running_loop().time())
        woken.set()

    fast = Listener(db, ("chan_a",), wake, poll_seconds=30)
    fast.start()
    try:
        async with asyncio.timeout(10):
            await woken.wait()  # the wake-up after connecting (what was missed while not listening)
            woken.clear()
            async with db.connection() as c:
                await c.execute("SELECT pg_notify('chan_a', 'x')")
            await woken.wait()
        assert fast.notifications == 1
    finally:
        await fast.stop()
    polled = asyncio.Event()
    slow = Listener(db, ("chan_b",), polled.set, poll_seconds=0.2)
    slow.start()
    try:
        async with asyncio.timeout(10):
            await polled.wait()
            polled.clear()
            await polled.wait()  # no NOTIFY at all: the poll alone
        assert slow.notifications == 0
    finally:
        await slow.stop()
        await db.close()


async def test_readiness_follows_the_ready_hook_while_the_database_answers(postgres_url: str) -> None:
    db = await _open(postgres_url)
    states: list[bool] = []
    changed = asyncio.Event()
    ready = True

    async def on_change(up: bool) -> None:
        states.append(up)
        changed.set()

    health = DatabaseHealth(db, "t", on_change, interval=0.05, ready=lambda: ready)
    health.start()
    try:
        await asyncio.sleep(0.2)
        assert states == []  # serving from the start
        ready = False  # e.g. the replica's liveness lease was lost
        async with asyncio.timeout(5):
            await changed.wait()
        assert states == [False] and health.up  # the database is fine; the replica is not ready
        changed.clear()
        ready = True
        async with asyncio.timeout(5):
            await changed.wait()
        assert states == [False, True]
    finally:
        await health.stop()
        await db.close()


def test_advertise_address(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLYNN_ADVERTISE_ADDRESS", raising=False)
    monkeypatch.delenv("POD_IP", raising=False)
    assert advertise_address("127.0.0.1:0", 7001) == "127.0.0.1:7001"
    monkeypatch.setenv("POD_IP", "10.1.2.3")
    assert advertise_address("0.0.0.0:50054", 50054) == "10.1.2.3:50054"
    monkeypatch.setenv("FLYNN_ADVERTISE_ADDRESS", "10.9.9.9:50054")
    assert advertise_address("0.0.0.0:50054", 50054) == "10.9.9.9:50054"
    monkeypatch.setenv("FLYNN_ADVERTISE_ADDRESS", "pod-1.flynn-nodes-headless")
    assert advertise_address("0.0.0.0:50054", 50054) == "pod-1.flynn-nodes-headless:50054"
