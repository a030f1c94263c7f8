"""Append-only revision history in SQLite (WAL, synchronous=FULL) under <data_dir>/config/config.db.

One row per revision holds the whole config blob next to its metadata, written in one transaction:
a crash either keeps the whole revision or none of it, and a revision number is never reused.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from flynn_runtime.sqlite_db import open_db, transaction

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


@dataclass(frozen=True)
class StoredRevision:
    revision: int
    kind: int
    actor: str
    reason: str
    create_time_ns: int
    diff: list[tuple[str, str, str]] = field(default_factory=list)
    restored_revision: int = 0
    config: bytes = b""


class RevisionStore:
    """Thread-safe (one connection behind a lock); callers run it off the event loop."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._db = open_db(path, schema=SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def head(self) -> int:
        with self._lock:
            row = self._db.execute("SELECT MAX(revision) FROM revisions").fetchone()
        return int(row[0] or 0)

    def append(
        self,
        kind: int,
        actor: str,
        reason: str,
        diff: list[tuple[str, str, str]],
        config: bytes,
        restored_revision: int = 0,
        expected_head: int | None = None,
    ) -> StoredRevision:
        """Commit the next revision; ValueError('stale', head) when the head moved past expected_head."""
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

    def get(self, revision: int) -> StoredRevision | None:
        with self._lock:
            row = self._db.execute(_SELECT + " WHERE revision = ?", (revision,)).fetchone()
        return _row(row) if row else None

    def range(self, after: int, upto: int, limit: int = 1000) -> list[StoredRevision]:
        """Revisions after < r <= upto, oldest first."""
        with self._lock:
            rows = self._db.execute(
                _SELECT + " WHERE revision > ? AND revision <= ? ORDER BY revision ASC LIMIT ?",
                (after, upto, limit),
            ).fetchall()
        return [_row(r) for r in rows]

    def newest_first(self, before: int, limit: int) -> list[StoredRevision]:
        """Up to `limit` revisions below `before` (0 = from the head), newest first."""
        with self._lock:
            if before > 0:
                rows = self._db.execute(
                    _SELECT + " WHERE revision < ? ORDER BY revision DESC LIMIT ?", (before, limit)
                ).fetchall()
            else:
                rows = self._db.execute(_SELECT + " ORDER BY revision DESC LIMIT ?", (limit,)).fetchall()
        return [_row(r) for r in rows]


class StaleHead(Exception):
    def __init__(self, head: int) -> None:
        super().__init__(f"head is {head}")
        self.head = head


_SELECT = (
    "SELECT revision, kind, actor, reason, create_time_ns, diff, restored_revision, config FROM revisions"
)


def _row(r: tuple[object, ...]) -> StoredRevision:
    diff = [tuple(x) for x in json.loads(str(r[5]))]
    return StoredRevision(
        revision=int(r[0]),  # type: ignore[call-overload]
        kind=int(r[1]),  # type: ignore[call-overload]
        actor=str(r[2]),
        reason=str(r[3]),
        create_time_ns=int(r[4]),  # type: ignore[call-overload]
        diff=[(str(a), str(b), str(c)) for a, b, c in diff],
        restored_revision=int(r[6]),  # type: ignore[call-overload]
        config=bytes(r[7]),  # type: ignore[call-overload]
    )
