"""Embedded SQLite as every stateful service uses it: one way to open a database and run a transaction.

WAL journal; `synchronous=FULL` where a commit is a promise to a caller (the WAL is fsynced before
COMMIT returns), NORMAL where losing the last writes to a power cut is acceptable (survives kill -9).
Connections run in autocommit mode (isolation_level=None) so transactions are explicit.

`Checkpointer`: a busy writer's WAL checkpoints in the background instead of inside its commits.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

log = logging.getLogger(__name__)

#: The WAL file is truncated back to this size when it restarts after a spike (bytes; a writer served
#: by a `Checkpointer` restarts it at about 1,000 pages of 4 KiB, SQLite's default).
JOURNAL_SIZE_LIMIT = 16 * 1024 * 1024


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


class Checkpointer:
    """WAL checkpoints mostly done in the background, so the commit that triggers one hardly waits.

    SQLite checkpoints inside the COMMIT that takes the WAL past 1,000 pages (`wal_autocheckpoint`):
    that commit, and every caller waiting for it, pays for copying the WAL's pages into the database
    file and fsyncing it. On a big store those pages are spread over the whole file (a write to a
    random leaf of each index), so that fsync, and with it the tail of the commits, grows with the
    store. The writer's thread calls `committed()` after each commit, and every `every_commits`
    commits (or after `every_seconds` with at least one) a PASSIVE checkpoint runs on this object's
    own connection and thread while the writer goes on: it copies what the WAL holds by then and
    fsyncs the database file (a PASSIVE checkpoint takes no lock a writer or reader waits for). When
    the writer's own checkpoint comes due, only the last few commits' pages are left to copy and sync.
    That one still runs in the commit, on purpose: a checkpoint that has copied the whole WAL is what
    lets the writer's next transaction restart the WAL from its beginning; background checkpoints
    alone never catch up with a busy writer, and the WAL would grow (and the file be extended, which
    costs every fsync of the WAL a journal commit) up to the next quiet moment.

    Durability is unchanged: a commit is fsynced in the WAL before COMMIT returns
    (`synchronous=FULL`), and a checkpoint syncs the database file before it lets the WAL go.
    """

    def __init__(self, path: Path, *, every_commits: int = 25, every_seconds: float = 1.0) -> None:
        self.every_commits = every_commits
        self.every_seconds = every_seconds
        self.runs = 0  # checkpoints done (tests)
        self._db = open_db(path)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wal-checkpoint")
        self._running: Future[None] | None = None
        self._commits = 0
        self._last = time.monotonic()

    @staticmethod
    def serve(writer: sqlite3.Connection) -> None:
        """The writer's settings: its own checkpoint at SQLite's default (it restarts the WAL), the WAL
        file truncated back after a spike."""
        writer.execute("PRAGMA wal_autocheckpoint=1000")
        writer.execute(f"PRAGMA journal_size_limit={JOURNAL_SIZE_LIMIT}")

    def committed(self) -> None:
        """The writer committed (called on the writer's one thread): start a checkpoint when one is due
        and none is running."""
        self._commits += 1
        if self._running is not None and not self._running.done():
            return
        now = time.monotonic()
        if self._commits >= self.every_commits or now - self._last >= self.every_seconds:
            self._commits = 0
            self._last = now
            self._running = self._pool.submit(self._checkpoint)

    def _checkpoint(self) -> None:
        try:
            self._db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            self.runs += 1
        except sqlite3.Error:  # the next one tries again; the writer's own checkpoint bounds the WAL
            log.warning("background WAL checkpoint failed", exc_info=True)

    def close(self) -> None:
        """Wait for a running checkpoint and release the connection (before the writer closes: the
        last connection to close checkpoints what is left and removes the WAL)."""
        self._pool.shutdown(wait=True)
        self._db.close()
