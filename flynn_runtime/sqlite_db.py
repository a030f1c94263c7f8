"""Embedded SQLite as every stateful service uses it: one way to open a database and run a transaction.

WAL journal; `synchronous=FULL` where a commit is a promise to a caller (the WAL is fsynced before
COMMIT returns), NORMAL where losing the last writes to a power cut is acceptable (survives kill -9).
Connections run in autocommit mode (isolation_level=None) so transactions are explicit.

`Checkpointer`: a busy writer's WAL checkpoints in the background instead of inside its commits.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

log = logging.getLogger(__name__)

#: The writer's own automatic checkpoint, inside a COMMIT (pages of 4 KiB; SQLite's default is 1,000).
WRITER_CHECKPOINT_PAGES = 4000
#: The WAL file is truncated back to this size when it restarts after a spike (bytes; above the
#: writer's checkpoint, so that the file is not shrunk and grown again at every restart).
JOURNAL_SIZE_LIMIT = 32 * 1024 * 1024


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


class Checkpointer:
    """WAL checkpoints in the background, so that few commits wait for one, and those only briefly.

    SQLite checkpoints inside the COMMIT that takes the WAL past 1,000 pages (`wal_autocheckpoint`):
    that commit, and every caller waiting for it, pays for copying the WAL's pages into the database
    file and fsyncing it. On a big store those pages are spread over the whole file (a write to a
    random leaf of each index), so that checkpoint, and with it the tail of the commits, grows with
    the store. Here:

    - the writer's thread calls `committed()` after each commit; every `every_commits` commits (or
      after `every_seconds` with at least one) a PASSIVE checkpoint runs on this object's own
      connection and thread while the writer goes on (it takes no lock a writer or reader waits
      for): it copies what the WAL holds by then and fsyncs the database file;
    - when the writer is idle between two of them, the checkpoint has copied the whole WAL and the
      writer's next transaction restarts it from its beginning;
    - a busy writer never leaves that gap, so its own in-COMMIT checkpoint stays, but at
      `WRITER_CHECKPOINT_PAGES` (4x fewer commits run one) and with only the pages written since the
      last background checkpoint left to copy; it restarts the WAL. The WAL file keeps its size
      (`JOURNAL_SIZE_LIMIT` is above it): a WAL that grows costs every fsync a journal commit.

    Durability is unchanged: a commit is fsynced in the WAL before COMMIT returns
    (`synchronous=FULL`), and a checkpoint syncs the database file before it lets the WAL go.
    """

    def __init__(
        self, path: Path, writer: sqlite3.Connection, *, every_commits: int = 25, every_seconds: float = 1.0
    ) -> None:
        self.every_commits = every_commits
        self.every_seconds = every_seconds
        self.runs = 0  # background checkpoints done (tests)
        writer.execute(f"PRAGMA wal_autocheckpoint={WRITER_CHECKPOINT_PAGES}")
        writer.execute(f"PRAGMA journal_size_limit={JOURNAL_SIZE_LIMIT}")
        self._db = open_db(path)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wal-checkpoint")
        self._running: Future[None] | None = None
        self._commits = 0
        self._last = time.monotonic()

    def committed(self) -> None:
        """The writer committed (called on the writer's one thread). Never raises: the commit is done
        whatever happens to a checkpoint."""
        self._commits += 1
        if self._running is not None and not self._running.done():
            return
        now = time.monotonic()
        if self._commits >= self.every_commits or now - self._last >= self.every_seconds:
            self._commits = 0
            self._last = now
            self._running = _submit(self._pool, self._checkpoint)

    def _checkpoint(self) -> None:
        try:
            self._db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            self.runs += 1
        except sqlite3.Error:  # the next one tries again; the writer's own checkpoint bounds the WAL
            log.warning("background WAL checkpoint failed", exc_info=True)

    def close(self) -> None:
        """Wait for a running checkpoint and release its connection (before the writer closes: the
        last connection to close checkpoints what is left and removes the WAL)."""
        self._pool.shutdown(wait=True)
        self._db.close()


def _submit(pool: ThreadPoolExecutor, fn: Callable[[], None]) -> Future[None] | None:
    """`pool.submit(fn)`, or None when the pool is shutting down (its store is closing)."""
    try:
        return pool.submit(fn)
    except RuntimeError:
        return None
