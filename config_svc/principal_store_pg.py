"""Issued principals in PostgreSQL (schema flynn_config), shared by every config replica.

Tables (config migration 4): `principals_issued` (one row per issued token: its SHA-256, never the
token), `principals_revoked_file` (revoked hashes of tokens-file principals) and the one-row
`principals_head`, whose `version` every change increments in its own transaction. A trigger on
`principals_head` NOTIFYs `flynn_config_principals` at COMMIT: only a wake-up for the other replicas
(config_svc/principal_cache.py re-reads the tables, never the payload), carried by the same LISTEN
connection as the revision feed's channel (flynn_runtime/pg_listen.py). The head row's lock also
orders concurrent changes through different replicas. Every method returns after its COMMIT.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from config_svc.principal_store import IssuedRecord, PrincipalSet
from config_svc.principal_store_sqlite import row_to_record
from flynn_runtime.auth import Role, generate_token, hash_token
from flynn_runtime.database import Database, PooledStore
from flynn_runtime.db_copy import Counts, Table, copy_tables, export_tables

#: The LISTEN/NOTIFY channel of principal changes (migration 4 of config_svc/revision_store_pg.py).
NOTIFY_CHANNEL = "flynn_config_principals"

MIGRATION_SQL = """
CREATE TABLE principals_issued (
    sha256      TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    role        TEXT NOT NULL,
    channels    JSONB NOT NULL,
    issued_by   TEXT NOT NULL,
    issue_time  DOUBLE PRECISION NOT NULL,
    revoke_time DOUBLE PRECISION,
    revoked_by  TEXT NOT NULL DEFAULT ''
);
CREATE INDEX principals_issued_name ON principals_issued (name);
CREATE TABLE principals_revoked_file (
    sha256      TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    revoke_time DOUBLE PRECISION NOT NULL,
    revoked_by  TEXT NOT NULL
);
CREATE TABLE principals_head (
    id      BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (id),
    version BIGINT NOT NULL
);
INSERT INTO principals_head (id, version) VALUES (TRUE, 0);
CREATE FUNCTION notify_principals() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('flynn_config_principals', NEW.version::text);
    RETURN NULL;
END $$;
CREATE TRIGGER principals_notify AFTER UPDATE ON principals_head
    FOR EACH ROW EXECUTE FUNCTION notify_principals();
"""

_BUMP = "UPDATE principals_head SET version = version + 1 RETURNING version"
# After copying from SQLite, whose in-memory version starts at the start time in milliseconds: the
# version keeps growing across the move.
_BUMP_PAST_SQLITE = "UPDATE principals_head SET version = GREATEST(version + 1, %s)"
# Static statements; the columns are those row_to_record reads.
_SELECT_ISSUED = (
    "SELECT sha256, name, role, channels, issued_by, issue_time, revoke_time"
    " FROM principals_issued ORDER BY issue_time, sha256"
)
_INSERT_ISSUED = (
    "INSERT INTO principals_issued (sha256, name, role, channels, issued_by, issue_time, revoke_time)"
    " VALUES (%s, %s, %s, %s, %s, %s, NULL)"
)
_REVOKE_ISSUED = (
    "UPDATE principals_issued SET revoke_time = %(now)s, revoked_by = %(by)s"
    " WHERE revoke_time IS NULL AND ((%(name)s <> '' AND name = %(name)s)"
    " OR (%(fp)s <> '' AND left(sha256, 16) = %(fp)s))"
    " RETURNING sha256, name, role, channels, issued_by, issue_time, revoke_time"
)

#: The SQLite file's tables and their PostgreSQL twins (flynn db import / export).
TABLES = (
    Table(
        "issued",
        ("sha256", "name", "role", "channels", "issued_by", "issue_time", "revoke_time", "revoked_by"),
        json=("channels",),
        pg_name="principals_issued",
    ),
    Table(
        "revoked_file",
        ("sha256", "name", "revoke_time", "revoked_by"),
        pg_name="principals_revoked_file",
    ),
)


class PgPrincipalStore(PooledStore):
    async def version(self) -> int:
        return await self.db.read_int("SELECT version FROM principals_head")

    async def load(self) -> PrincipalSet:
        # One snapshot of the three tables: the version and the rows it stands for agree.
        async with self.db.transaction() as c:
            await c.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            head = await (await c.execute("SELECT version FROM principals_head")).fetchone()
            issued = await (await c.execute(_SELECT_ISSUED)).fetchall()
            revoked = await (
                await c.execute("SELECT sha256, revoke_time FROM principals_revoked_file")
            ).fetchall()
        return PrincipalSet(
            int(head[0]) if head else 0,
            tuple(row_to_record(r) for r in issued),
            {str(h): float(t) for h, t in revoked},
        )

    async def issue(
        self, name: str, role: Role, channels: list[str], issued_by: str
    ) -> tuple[IssuedRecord, str]:
        token = generate_token()
        rec = IssuedRecord(hash_token(token), name, role, tuple(channels), issued_by, time.time(), None)
        async with self.db.transaction() as c:
            await c.execute(
                _INSERT_ISSUED,
                (rec.sha256, name, role.value, Jsonb(list(channels)), issued_by, rec.issue_time),
            )
            await c.execute(_BUMP)
        return rec, token

    async def revoke_issued(self, name: str, fingerprint: str, by: str) -> list[IssuedRecord]:
        now = time.time()
        async with self.db.transaction() as c:
            rows = await (
                await c.execute(
                    _REVOKE_ISSUED,
                    {"now": now, "by": by, "name": name, "fp": fingerprint},
                )
            ).fetchall()
            if rows:
                await c.execute(_BUMP)
        return sorted((row_to_record(r) for r in rows), key=lambda r: (r.issue_time, r.sha256))

    async def revoke_file_hash(self, sha256: str, name: str, by: str) -> bool:
        async with self.db.transaction() as c:
            cur = await c.execute(
                "INSERT INTO principals_revoked_file (sha256, name, revoke_time, revoked_by)"
                " VALUES (%s, %s, %s, %s) ON CONFLICT (sha256) DO NOTHING",
                (sha256, name, time.time(), by),
            )
            added = cur.rowcount > 0
            if added:
                await c.execute(_BUMP)
        return added


# flynn db import / export (called by the config store's copier, config_svc/revision_store_pg.py) --


async def import_rows(lite: sqlite3.Connection, cur: psycopg.AsyncCursor[Any], schema: str) -> Counts:
    """Copy a principals.db into the principal tables, inside the caller's transaction; the version
    moves on so replicas that load the copy publish it."""
    counts = await copy_tables(lite, cur, schema, TABLES)
    await cur.execute(_BUMP_PAST_SQLITE, (int(time.time() * 1000),))
    return {"principals": counts["issued"], "revoked file principals": counts["revoked_file"]}


async def export_rows(db: Database, lite: sqlite3.Connection) -> Counts:
    counts = await export_tables(db, lite, TABLES)
    return {"principals": counts["issued"], "revoked file principals": counts["revoked_file"]}


# A principals.db left in the data dir by a release that kept principals in SQLite even with a database

_ADOPT_ISSUED = (
    "INSERT INTO principals_issued AS p"
    " (sha256, name, role, channels, issued_by, issue_time, revoke_time, revoked_by)"
    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s)"
    " ON CONFLICT (sha256) DO UPDATE SET"
    " revoke_time = COALESCE(p.revoke_time, EXCLUDED.revoke_time),"
    " revoked_by = CASE WHEN p.revoke_time IS NULL THEN EXCLUDED.revoked_by ELSE p.revoked_by END"
)
_ADOPT_REVOKED_FILE = (
    "INSERT INTO principals_revoked_file (sha256, name, revoke_time, revoked_by)"
    " VALUES (%s, %s, %s, %s) ON CONFLICT (sha256) DO NOTHING"
)


async def adopt_sqlite_file(db: Database, path: Path) -> Counts:
    """Merge a leftover `<data>/config/principals.db` into the tables, then rename it `*.adopted`.

    Earlier releases kept the principals in the config service's data dir even with a database, so a
    replica may still hold some (a `flynn-dev up --postgres` data dir does). Merging is idempotent and
    safe with several replicas each bringing their own file: issued principals are added, and a
    revocation is never undone (a revoked row stays revoked; a row revoked in the file is revoked)."""
    found = await asyncio.to_thread(_read_leftover, path)
    if found is None:
        return {}
    issued, revoked = found
    async with db.transaction() as c, c.cursor() as cur:
        if issued:
            await cur.executemany(
                _ADOPT_ISSUED, [(r[0], r[1], r[2], Jsonb(json.loads(r[3])), *r[4:]) for r in issued]
            )
        if revoked:
            await cur.executemany(_ADOPT_REVOKED_FILE, revoked)
        await cur.execute(_BUMP_PAST_SQLITE, (int(time.time() * 1000),))
    await asyncio.to_thread(_set_aside, path)
    return {"principals": len(issued), "revoked file principals": len(revoked)}


def _read_leftover(path: Path) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]] | None:
    if not path.exists():
        return None
    lite = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        issued = lite.execute(
            "SELECT sha256, name, role, channels, issued_by, issue_time, revoke_time, revoked_by FROM issued"
        ).fetchall()
        revoked = lite.execute("SELECT sha256, name, revoke_time, revoked_by FROM revoked_file").fetchall()
    finally:
        lite.close()
    return issued, revoked


def _set_aside(path: Path) -> None:
    """principals.db (and its WAL) -> principals.db.adopted: merged once, kept for the operator."""
    for suffix in ("", "-wal", "-shm"):
        part = path.with_name(path.name + suffix)
        if part.exists():
            part.rename(path.with_name(path.name + ".adopted" + suffix))
