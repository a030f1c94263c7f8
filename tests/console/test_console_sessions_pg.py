"""Console sign-in sessions in a real PostgreSQL: a session created by one console replica is found by
another and survives a restart (a new pool, as a new process opens); the database holds neither the
session id nor the operator's token in the clear; sign-out and expiry reach every replica."""

from __future__ import annotations

import psycopg

from console.session_store_pg import MIGRATIONS, SCHEMA, PgSessions
from flynn_runtime.database import Database
from flynn_runtime.database_url import parse_database_url


async def _replica(url: str, clock: list[float]) -> tuple[Database, PgSessions]:
    db = await Database.open(parse_database_url(url), service="console", schema=SCHEMA, migrations=MIGRATIONS)
    return db, PgSessions(db, idle_seconds=100, max_age_seconds=1000, max_sessions=3, clock=lambda: clock[0])


async def test_sessions_are_shared_by_replicas_and_survive_a_restart(postgres_url: str) -> None:
    clock = [1_000.0]
    db_a, a = await _replica(postgres_url, clock)
    db_b, b = await _replica(postgres_url, clock)
    try:
        token = "flt_operator-token-value"
        s = await a.create(token, "alice")
        seen = await b.get(s.session_id)
        assert seen is not None and seen.token == token and seen.operator == "alice" and seen.csrf == s.csrf
        assert await b.get("not-a-session") is None
        # Nothing in the table lets a database reader act as the operator.
        with psycopg.connect(postgres_url) as c:
            rows = c.execute("SELECT id_hash, token_enc FROM flynn_console.sessions").fetchall()
        assert len(rows) == 1
        assert rows[0][0] != s.session_id and token.encode() not in bytes(rows[0][1])
        # A restart of replica a: a new pool finds the same session.
        await db_a.close()
        db_a, a = await _replica(postgres_url, clock)
        assert (again := await a.get(s.session_id)) is not None and again.token == token
        # Sign-out through b ends it for a too.
        await b.drop(s.session_id)
        assert await a.get(s.session_id) is None
        # Idle expiry holds across replicas (wall clock shared); the table stays bounded.
        s2 = await a.create(token, "bob")
        clock[0] += 101
        assert await b.get(s2.session_id) is None
        made = []
        for i in range(5):
            clock[0] += 1
            made.append(await a.create(token, f"op{i}"))
        with psycopg.connect(postgres_url) as c:
            assert c.execute("SELECT count(*) FROM flynn_console.sessions").fetchone() == (3,)
        assert await b.get(made[-1].session_id) is not None
    finally:
        await db_a.close()
        await db_b.close()
