"""Embedded SQLite as every stateful service uses it: one way to open a database and run a transaction.

WAL journal; `synchronous=FULL` where a commit is a promise to a caller (the WAL is fsynced before
COMMIT returns), NORMAL where losing the last writes to a power cut is acceptable (survives kill -9).
Connections run in autocommit mode (isolation_level=None) so transactions are explicit.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal


def open_db(
    path: Path,
    *,
    synchronous: Literal["FULL", "NORMAL"] = "FULL",
    rows: bool = False,
    busy_timeout_ms: int = 5000,
    schema: str = "",
) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
    if rows:
        db.row_factory = sqlite3.Row
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(f"PRAGMA synchronous={synchronous}")
    db.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
    if schema:
        db.executescript(schema)
    return db


@contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE … COMMIT, or ROLLBACK on any exception. Inside an open transaction it joins it
    (the outermost one commits)."""
    if db.in_transaction:
        yield db
        return
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


class LockedSqliteStore:
    """The base of a store on one SQLite connection behind a lock: its blocking calls run on worker
    threads (`asyncio.to_thread`), each holding `_lock` while it uses `_db`."""

    def __init__(self, path: Path, *, schema: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._db = open_db(path, schema=schema)

    async def close(self) -> None:
        with self._lock:
            self._db.close()
