"""Revision history in SQLite (WAL, synchronous=FULL) under <data_dir>/config/config.db.

Every call runs on a worker thread, off the event loop (sqlite_db.LockedSqliteStore).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from config_svc.revision_store import RevisionKind, StaleHead, StoredRevision
from flynn_runtime.sqlite_db import LockedSqliteStore, transaction

SCHEMA = """
CREATE TABLE IF NOT EXISTS revisions (
    revision          INTEGER PRIMARY KEY,
    kind              INTEGER NOT NULL,
    actor             TEXT    NOT NULL,
    reason            TEXT    NOT NULL,
    create_time_ns    INTEGER NOT NULL,
    diff              TEXT    NOT NULL,
    restored_revision INTEGER NOT NULL DEFAULT 0,
    config            BLOB    NOT NULL
);
"""

SELECT = (
    "SELECT revision, kind, actor, reason, create_time_ns, diff, restored_revision, config FROM revisions"
)


class SqliteRevisionStore(LockedSqliteStore):
    def __init__(self, path: Path) -> None:
        super().__init__(path, schema=SCHEMA)

    async def head(self) -> int:
        return await asyncio.to_thread(self._head)

    def _head(self) -> int:
        with self._lock:
            row = self._db.execute("SELECT MAX(revision) FROM revisions").fetchone()
        return int(row[0] or 0)

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
        return await asyncio.to_thread(
            self._append, kind, actor, reason, diff, config, restored_revision, expected_head
        )

    def _append(
        self,
        kind: RevisionKind,
        actor: str,
        reason: str,
        diff: list[tuple[str, str, str]],
        config: bytes,
        restored_revision: int,
        expected_head: int | None,
    ) -> StoredRevision:
        now = time.time_ns()
        with self._lock:
            with transaction(self._db):
                head = int(self._db.execute("SELECT MAX(revision) FROM revisions").fetchone()[0] or 0)
                if expected_head is not None and head != expected_head:
                    raise StaleHead(head)
                rev = head + 1
                self._db.execute(
                    "INSERT INTO revisions (revision, kind, actor, reason, create_time_ns, diff, restored_revision, config)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        rev,
                        kind,
                        actor,
                        reason,
                        now,
                        json.dumps(diff, ensure_ascii=False),
                        restored_revision,
                        config,
                    ),
                )
        return StoredRevision(rev, kind, actor, reason, now, list(diff), restored_revision, config)

    async def get(self, revision: int) -> StoredRevision | None:
        rows = await asyncio.to_thread(self._query, SELECT + " WHERE revision = ?", (revision,))
        return rows[0] if rows else None

    async def range(self, after: int, upto: int, limit: int = 1000) -> list[StoredRevision]:
        return await asyncio.to_thread(
            self._query,
            SELECT + " WHERE revision > ? AND revision <= ? ORDER BY revision ASC LIMIT ?",
            (after, upto, limit),
        )

    async def newest_first(self, before: int, limit: int) -> list[StoredRevision]:
        if before > 0:
            return await asyncio.to_thread(
                self._query, SELECT + " WHERE revision < ? ORDER BY revision DESC LIMIT ?", (before, limit)
            )
        return await asyncio.to_thread(self._query, SELECT + " ORDER BY revision DESC LIMIT ?", (limit,))

    def _query(self, q: str, args: tuple[object, ...]) -> list[StoredRevision]:
        with self._lock:
            rows = self._db.execute(q, args).fetchall()
        return [row_to_revision(r) for r in rows]

    def all_rows(self) -> list[StoredRevision]:
        """Every revision, oldest first (flynn db export)."""
        return self._query(SELECT + " ORDER BY revision ASC", ())


def row_to_revision(r: Sequence[Any]) -> StoredRevision:
    """A row of SELECT (either backend: diff is JSON text in SQLite, JSONB in PostgreSQL)."""
    diff = r[5] if isinstance(r[5], list) else json.loads(str(r[5]))
    return StoredRevision(
        revision=int(r[0]),
        kind=RevisionKind(int(r[1])),
        actor=str(r[2]),
        reason=str(r[3]),
        create_time_ns=int(r[4]),
        diff=[(str(a), str(b), str(c)) for a, b, c in diff],
        restored_revision=int(r[6]),
        config=bytes(r[7]),
    )
