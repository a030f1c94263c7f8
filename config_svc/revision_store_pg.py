"""Revision history in PostgreSQL (schema flynn_config).

`append` is a compare-and-set under concurrent writers, including other replicas: one statement
increments the one-row `head` table (its row lock serializes writers; a waiting writer re-checks the
expected head once the lock is released) and inserts the revision with that number (never a
sequence, so no gaps); the PRIMARY KEY on revision is the last line of defence. The statement is its
own transaction and the call returns after it committed, so an acknowledged revision is durable.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from psycopg.types.json import Jsonb

from config_svc import principal_store_pg
from config_svc.principal_store import SQLITE_FILE as PRINCIPALS_FILE
from config_svc.principal_store_pg import MIGRATION_SQL as PRINCIPALS_SQL
from config_svc.principal_store_sqlite import SqlitePrincipalStore
from config_svc.revision_store import SCHEMA, RevisionKind, StaleHead, StoredRevision
from config_svc.revision_store_sqlite import SELECT as SQLITE_SELECT
from config_svc.revision_store_sqlite import SqliteRevisionStore, row_to_revision
from config_svc.watcher_table import MIGRATION_SQL as WATCHERS_SQL
from flynn_runtime import replica_registry
from flynn_runtime.database import Database, PooledStore
from flynn_runtime.db_copy import Counts, SqliteSource, StoreCopier
from flynn_runtime.pg_migrations import Migration
from flynn_runtime.sqlite_db import transaction

MIGRATIONS = [
    Migration(
        1,
        "revisions and head",
        """
        CREATE TABLE revisions (
            revision          BIGINT PRIMARY KEY,
            kind              INTEGER NOT NULL,
            actor             TEXT    NOT NULL,
            reason            TEXT    NOT NULL,
            create_time_ns    BIGINT  NOT NULL,
            diff              JSONB   NOT NULL,
            restored_revision BIGINT  NOT NULL DEFAULT 0,
            config            BYTEA   NOT NULL
        );
        CREATE TABLE head (
            id       BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (id),
            revision BIGINT NOT NULL
        );
        INSERT INTO head (id, revision) VALUES (TRUE, 0);
        """,
    ),
    Migration(
        2,
        "notify replicas of each committed revision",
        # Sent at COMMIT, to every replica LISTENing on the channel (revision_feed.py). Only a
        # wake-up: readers re-read the revisions table from their last revision, never the payload.
        """
        CREATE FUNCTION notify_revision() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify('flynn_config_revision', NEW.revision::text);
            RETURN NULL;
        END $$;
        CREATE TRIGGER revisions_notify AFTER INSERT ON revisions
            FOR EACH ROW EXECUTE FUNCTION notify_revision();
        """,
    ),
    Migration(3, "every replica's watchers; replica liveness leases", WATCHERS_SQL),
    Migration(4, "issued principals and revocations, shared by every replica", PRINCIPALS_SQL),
    Migration(5, "every replica as it knows itself, with a heartbeat", replica_registry.MIGRATION_SQL),
]

#: The LISTEN/NOTIFY channel of committed revisions (migration 2).
NOTIFY_CHANNEL = "flynn_config_revision"

SELECT = (
    "SELECT revision, kind, actor, reason, create_time_ns, diff, restored_revision, config FROM revisions"
)


class PgRevisionStore(PooledStore):
    async def head(self) -> int:
        return await self.db.read_int("SELECT revision FROM head")

    async def append(
        self,
        kind: RevisionKind,
        actor: str,
        reason: str,
        diff: list[tuple[str, str, str]],
        config: bytes,
        restored_revision: int = 0,
        expected_head: int | None = None,
    ) -> StoredRevision:
        now = time.time_ns()
        # One statement, so one round trip and its own transaction: the UPDATE takes the head row's lock
        # (concurrent writers wait there and re-check the expected head once it is released).
        async with self.db.connection() as c:
            cur = await c.execute(
                "WITH h AS (UPDATE head SET revision = revision + 1"
                " WHERE %(expected)s::bigint IS NULL OR revision = %(expected)s::bigint RETURNING revision)"
                " INSERT INTO revisions (revision, kind, actor, reason, create_time_ns, diff, restored_revision, config)"
                " SELECT h.revision, %(kind)s, %(actor)s, %(reason)s, %(now)s, %(diff)s, %(restored)s, %(config)s"
                " FROM h RETURNING revision",
                {
                    "expected": expected_head,
                    "kind": kind,
                    "actor": actor,
                    "reason": reason,
                    "now": now,
                    "diff": Jsonb(diff),
                    "restored": restored_revision,
                    "config": config,
                },
            )
            row = await cur.fetchone()
            if row is None:
                head = await (await c.execute("SELECT revision FROM head")).fetchone()
                raise StaleHead(int(head[0]) if head else 0)
        rev = int(row[0])
        return StoredRevision(rev, kind, actor, reason, now, list(diff), restored_revision, config)

    async def insert_exact(self, s: StoredRevision) -> None:
        """Copy one revision as it is (flynn db import); the head follows the highest revision."""
        async with self.db.transaction() as c:
            await c.execute(
                "INSERT INTO revisions (revision, kind, actor, reason, create_time_ns, diff, restored_revision, config)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
                (
                    s.revision,
                    s.kind,
                    s.actor,
                    s.reason,
                    s.create_time_ns,
                    Jsonb(s.diff),
                    s.restored_revision,
                    s.config,
                ),
            )
            await c.execute("UPDATE head SET revision = GREATEST(revision, %s)", (s.revision,))

    async def get(self, revision: int) -> StoredRevision | None:
        rows = await self._query(SELECT + " WHERE revision = %s", (revision,))
        return rows[0] if rows else None

    async def range(self, after: int, upto: int, limit: int = 1000) -> list[StoredRevision]:
        return await self._query(
            SELECT + " WHERE revision > %s AND revision <= %s ORDER BY revision ASC LIMIT %s",
            (after, upto, limit),
        )

    async def newest_first(self, before: int, limit: int) -> list[StoredRevision]:
        if before > 0:
            return await self._query(
                SELECT + " WHERE revision < %s ORDER BY revision DESC LIMIT %s", (before, limit)
            )
        return await self._query(SELECT + " ORDER BY revision DESC LIMIT %s", (limit,))

    async def _query(self, q: str, args: tuple[object, ...]) -> list[StoredRevision]:
        async with self.db.connection() as c:
            rows = await (await c.execute(q, args)).fetchall()
        return [row_to_revision(r) for r in rows]


# flynn db import / export ----------------------------------------------------------------------

_SQLITE_FILE = "config/config.db"


async def import_sqlite(src: SqliteSource, db: Database) -> Counts:
    """The revisions and (when the data dir has them) the issued principals, in one transaction."""
    with src.open(_SQLITE_FILE) as lite:
        rows = [row_to_revision(r) for r in lite.execute(SQLITE_SELECT + " ORDER BY revision")]
    principals: Counts = {}
    async with db.transaction() as c, c.cursor() as cur:
        if src.path(PRINCIPALS_FILE).exists():
            with src.open(PRINCIPALS_FILE) as plite:
                principals = await principal_store_pg.import_rows(plite, cur, db.schema)
        await cur.executemany(
            "INSERT INTO revisions (revision, kind, actor, reason, create_time_ns, diff, restored_revision, config)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
            [
                (
                    s.revision,
                    s.kind,
                    s.actor,
                    s.reason,
                    s.create_time_ns,
                    Jsonb(s.diff),
                    s.restored_revision,
                    s.config,
                )
                for s in rows
            ],
        )
        await cur.execute("UPDATE head SET revision = %s", (max((s.revision for s in rows), default=0),))
    return {"revisions": len(rows), **principals}


async def export_sqlite(db: Database, dest: Path) -> Counts:
    async with db.connection() as c:
        rows = [row_to_revision(r) for r in await (await c.execute(SELECT + " ORDER BY revision")).fetchall()]
    store = SqliteRevisionStore(dest / _SQLITE_FILE)
    try:
        with transaction(store._db):
            store._db.executemany(
                "INSERT INTO revisions (revision, kind, actor, reason, create_time_ns, diff, restored_revision, config)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        s.revision,
                        s.kind,
                        s.actor,
                        s.reason,
                        s.create_time_ns,
                        json.dumps(s.diff, ensure_ascii=False),
                        s.restored_revision,
                        s.config,
                    )
                    for s in rows
                ],
            )
    finally:
        await store.close()
    principals = SqlitePrincipalStore(dest / PRINCIPALS_FILE)
    try:
        counts = await principal_store_pg.export_rows(db, principals.sqlite)
    finally:
        await principals.close()
    return {"revisions": len(rows), **counts}


COPIER = StoreCopier(
    service="config",
    schema=SCHEMA,
    migrations=MIGRATIONS,
    sqlite_files=(_SQLITE_FILE, PRINCIPALS_FILE),
    import_sqlite=import_sqlite,
    export_sqlite=export_sqlite,
    nonempty_query="SELECT (SELECT count(*) FROM revisions) + (SELECT count(*) FROM principals_issued)"
    " + (SELECT count(*) FROM principals_revoked_file)",
)
