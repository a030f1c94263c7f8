"""The shared PostgreSQL runtime (flynn_runtime/database*.py, pg_migrations.py) against a real server."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import psycopg
import psycopg_pool
import pytest

from flynn_launcher.local_postgres import LocalPostgres, free_port
from flynn_runtime.database import Database, DatabaseStartupError
from flynn_runtime.database_url import DatabaseSettingError, parse_database_url
from flynn_runtime.errors import Code, FlynnError
from flynn_runtime.pg_migrations import Migration, schema_version

ROOT = Path(__file__).resolve().parents[2]

MIGRATIONS = [
    Migration(1, "items", "CREATE TABLE items (id BIGINT PRIMARY KEY, name TEXT NOT NULL);"),
    Migration(
        2,
        "items.note",
        "ALTER TABLE items ADD COLUMN note TEXT NOT NULL DEFAULT ''; CREATE INDEX items_name ON items(name);",
    ),
]


@pytest.mark.parametrize(
    ("url", "expect"),
    [
        ("mysql://u@h/db", "must start with postgresql://"),
        ("postgresql://u@/db", "has no host"),
        ("postgresql://u@h:99999/db", "malformed"),
        ("postgresql://u@h:5432/", "must name one database"),
        ("postgresql://h:5432/db", "has no user"),
        ("postgresql://u@h/db?frobnicate=1", "unknown parameter 'frobnicate'"),
    ],
)
def test_malformed_urls_name_the_problem(url: str, expect: str) -> None:
    with pytest.raises(DatabaseSettingError, match=expect):
        parse_database_url(url)


def test_password_file_wins_and_is_never_displayed(tmp_path: Path) -> None:
    f = tmp_path / "pw"
    f.write_text("s3cret\n")
    db = parse_database_url("postgresql://flynn:other@db.example:6432/flynn?sslmode=require", f)
    assert db.password == "s3cret"
    assert db.port == 6432 and db.dbname == "flynn" and ("sslmode", "require") in db.params
    assert "s3cret" not in db.display() and "other" not in db.display()
    with pytest.raises(DatabaseSettingError, match="cannot read the database password file"):
        parse_database_url("postgresql://u@h/db", tmp_path / "missing")


async def test_migrations_apply_once_and_reopen_is_a_no_op(postgres_url: str) -> None:
    settings = parse_database_url(postgres_url)
    db = await Database.open(settings, service="t", schema="flynn_t", migrations=MIGRATIONS[:1])
    try:
        assert db.schema_version == 1
        async with db.transaction() as c:
            await c.execute("INSERT INTO items(id, name) VALUES (%s, %s)", (1, "a"))
    finally:
        await db.close()
    db = await Database.open(settings, service="t", schema="flynn_t", migrations=MIGRATIONS)
    try:
        assert db.schema_version == 2
        async with db.connection() as c:
            row = await (await c.execute("SELECT name, note FROM items WHERE id = %s", (1,))).fetchone()
            assert row == ("a", "")
            rows = await (await c.execute("SELECT version FROM schema_version ORDER BY version")).fetchall()
            assert rows == [(1,), (2,)]
    finally:
        await db.close()


async def test_schema_newer_than_code_is_refused(postgres_url: str) -> None:
    settings = parse_database_url(postgres_url)
    db = await Database.open(settings, service="t", schema="flynn_t", migrations=MIGRATIONS)
    await db.close()
    with pytest.raises(
        DatabaseStartupError, match="schema flynn_t is at version 2 but this Flynn knows versions up to 1"
    ):
        await Database.open(settings, service="t", schema="flynn_t", migrations=MIGRATIONS[:1])


_RACER = """
import asyncio, sys
from flynn_runtime.database import Database
from flynn_runtime.database_url import parse_database_url
from flynn_runtime.pg_migrations import Migration
SLOW = Migration(1, "slow", "CREATE TABLE things (id INT PRIMARY KEY); SELECT pg_sleep(0.5);"
                 " INSERT INTO things VALUES (1);")
async def main():
    db = await Database.open(parse_database_url(sys.argv[1]), service="race", schema="flynn_race", migrations=[SLOW])
    await db.close()
asyncio.run(main())
"""


def test_two_processes_starting_at_once_migrate_exactly_once(postgres_url: str) -> None:
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _RACER, postgres_url], cwd=ROOT, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
    with psycopg.connect(postgres_url) as c:
        assert c.execute("SELECT count(*) FROM flynn_race.schema_version").fetchone() == (1,)
        assert c.execute("SELECT count(*) FROM flynn_race.things").fetchone() == (1,)


async def test_two_tasks_starting_at_once_migrate_exactly_once(postgres_url: str) -> None:
    settings = parse_database_url(postgres_url)
    dbs = await asyncio.gather(
        *(Database.open(settings, service="t", schema="flynn_t", migrations=MIGRATIONS) for _ in range(4))
    )
    for db in dbs:
        await db.close()
    with psycopg.connect(postgres_url) as c:
        assert c.execute("SELECT count(*) FROM flynn_t.schema_version").fetchone() == (2,)
        v = await _version(postgres_url)
        assert v == 2


async def _version(url: str) -> int:
    async with await psycopg.AsyncConnection.connect(url) as c:
        return await schema_version(c, "flynn_t")


async def test_wrong_password_and_refused_connection_are_named(
    postgres: LocalPostgres, postgres_url: str
) -> None:
    good = parse_database_url(postgres_url)
    bad = parse_database_url(postgres_url.replace(postgres.password, "wrong"))
    with pytest.raises(DatabaseStartupError, match="wrong password for user 'flynn'"):
        await Database.open(bad, service="t", schema="flynn_t", migrations=MIGRATIONS)
    refused = parse_database_url(postgres_url.replace(f":{postgres.port}/", f":{free_port()}/"))
    with pytest.raises(DatabaseStartupError, match="connection refused"):
        await Database.open(refused, service="t", schema="flynn_t", migrations=MIGRATIONS)
    missing = parse_database_url(postgres_url.rsplit("/", 1)[0] + "/nosuchdb")
    with pytest.raises(DatabaseStartupError, match="'nosuchdb' does not exist"):
        await Database.open(missing, service="t", schema="flynn_t", migrations=MIGRATIONS)
    assert good.password == postgres.password


async def test_database_outage_is_unavailable_then_recovers(
    postgres: LocalPostgres, postgres_url: str
) -> None:
    settings = parse_database_url(postgres_url)
    db = await Database.open(settings, service="t", schema="flynn_t", migrations=MIGRATIONS)
    try:
        async with db.transaction() as c:
            await c.execute("INSERT INTO items(id, name) VALUES (%s, %s)", (1, "kept"))
        await asyncio.to_thread(postgres.kill)
        with pytest.raises(FlynnError) as err:
            async with db.connection() as c:
                await c.execute("SELECT 1")
        assert err.value.code is Code.UNAVAILABLE and err.value.reason == "DATABASE_UNAVAILABLE"
        assert settings.display() in err.value.message
        await asyncio.to_thread(postgres.start)
        for _ in range(100):
            try:
                async with db.connection() as c:
                    row = await (await c.execute("SELECT name FROM items WHERE id = %s", (1,))).fetchone()
                break
            except FlynnError:
                await asyncio.sleep(0.1)
        assert row == ("kept",)
    finally:
        await db.close()


async def test_pooled_connections_ended_by_the_server_are_replaced_not_handed_out(
    postgres: LocalPostgres, postgres_url: str
) -> None:
    """The pool's check costs no round trip on a quiet connection (check_quiet_connection), yet a
    connection the server ended while it sat in the pool (here pg_terminate_backend, as fencing does)
    is never handed to a caller: every call after it succeeds on a fresh connection."""
    settings = parse_database_url(postgres_url)
    db = await Database.open(
        settings, service="t", schema="flynn_t", migrations=MIGRATIONS, min_size=3, max_size=3
    )
    try:
        await db.pool.wait(timeout=10)
        async with db.connection() as c:
            await c.execute(
                "INSERT INTO items(id, name) VALUES (%s, %s) ON CONFLICT DO NOTHING", (7, "seven")
            )
        with postgres.connect(settings.dbname) as admin:
            cur = admin.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE application_name = 'flynn-t' AND pid <> pg_backend_pid()"
            )
            row = cur.fetchone()
            assert row is not None and row[0] >= 3
        await asyncio.sleep(0.2)  # the server's goodbye reaches the sockets
        answers: list[object] = []
        for _ in range(40):
            try:
                async with db.connection() as c:
                    got = await (await c.execute("SELECT name FROM items WHERE id = %s", (7,))).fetchone()
                answers.append(got)
                if len(answers) >= 6:
                    break
            except FlynnError as e:
                # While the pool reconnects a call may wait for a connection in vain; it is never
                # handed one of the dead ones (that would fail with the connection's own error).
                assert isinstance(e.__cause__, psycopg_pool.PoolTimeout), repr(e.__cause__)
        assert answers == [("seven",)] * 6
    finally:
        await db.close()
