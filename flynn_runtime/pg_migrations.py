"""Versioned schema migrations of one service's PostgreSQL schema, applied at start-up.

Each service owns one schema (flynn_config, flynn_queue, flynn_reactions, flynn_nodes) holding its
tables and a `schema_version` table (one row per applied migration). `migrate` runs in ONE
transaction that first takes `pg_advisory_xact_lock` on a key derived from the schema name: two
replicas starting at once serialize there, the second finds everything applied and does nothing,
and the lock is released by COMMIT/ROLLBACK (never a session lock that a crashed process could leave
behind). A schema whose version is newer than the code's newest migration is refused with
`SchemaTooNew`, so an older binary never writes into a layout it does not know.

Migrations are static SQL in the code (`Migration(version, description, sql)`), versions 1, 2, 3…
without gaps; never edit an applied one, add the next.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

#: Advisory lock namespace ("flyn"), combined with a hash of the schema name.
LOCK_NAMESPACE = 0x666C796E


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    sql: str


class SchemaTooNew(Exception):
    """The database was migrated by a newer Flynn than this one."""

    def __init__(self, schema: str, found: int, known: int) -> None:
        super().__init__(
            f"the database schema {schema} is at version {found} but this Flynn knows versions up to {known}: "
            "it was migrated by a newer release; run that release (or restore a backup taken before the upgrade)"
        )
        self.schema, self.found, self.known = schema, found, known


def check_migrations(migrations: Sequence[Migration]) -> None:
    for i, m in enumerate(migrations, start=1):
        if m.version != i:
            raise ValueError(f"migration #{i} has version {m.version}; versions must be 1, 2, 3… in order")


async def schema_version(conn: psycopg.AsyncConnection[tuple[Any, ...]], schema: str) -> int:
    """The highest applied version of `schema` (0 when it has never been migrated)."""
    cur = await conn.execute("SELECT to_regclass(%s) IS NOT NULL", (f"{schema}.schema_version",))
    row = await cur.fetchone()
    if not row or not row[0]:
        return 0
    cur = await conn.execute(
        sql.SQL("SELECT COALESCE(MAX(version), 0) FROM {}.schema_version").format(sql.Identifier(schema))
    )
    row = await cur.fetchone()
    return int(row[0]) if row else 0


async def migrate(
    conn: psycopg.AsyncConnection[tuple[Any, ...]], schema: str, migrations: Sequence[Migration]
) -> int:
    """Bring `schema` up to the newest migration under a transaction-scoped advisory lock; returns
    the version now applied. Raises SchemaTooNew when the database is ahead of the code."""
    check_migrations(migrations)
    known = len(migrations)
    ident = sql.Identifier(schema)
    await conn.set_autocommit(False)
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (LOCK_NAMESPACE, schema))
        await conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(ident))
        await conn.execute(
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {}.schema_version ("
                " version INTEGER PRIMARY KEY, description TEXT NOT NULL,"
                " applied_at TIMESTAMPTZ NOT NULL DEFAULT now(), applied_by TEXT NOT NULL)"
            ).format(ident)
        )
        current = await schema_version(conn, schema)
        if current > known:
            raise SchemaTooNew(schema, current, known)
        await conn.execute(sql.SQL("SET LOCAL search_path TO {}").format(ident))
        for m in migrations[current:]:
            await conn.execute(m.sql.encode("utf-8"))
            await conn.execute(
                sql.SQL(
                    "INSERT INTO {}.schema_version(version, description, applied_by) VALUES (%s, %s, %s)"
                ).format(ident),
                (m.version, m.description, f"pid {os.getpid()} at {time.time():.3f}"),
            )
    await conn.set_autocommit(True)
    return known
