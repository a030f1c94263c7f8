"""WAL checkpoints no commit waits for (flynn_runtime/sqlite_db.Checkpointer), on real SQLite files."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from flynn_runtime.sqlite_db import (
    BACKSTOP_PAGES,
    JOURNAL_SIZE_LIMIT,
    RESTART_PAGES,
    Checkpointer,
    open_db,
    transaction,
)

ROW = b"x" * 8000  # two pages of 4 KiB each
FRAME = 4096 + 24  # one page in the WAL


@contextmanager
def writer(path: Path, **kw: float) -> Iterator[tuple[sqlite3.Connection, ThreadPoolExecutor, Checkpointer]]:
    """A writer as the queue store has it: one connection used by one thread (its executor)."""
    db = open_db(path, schema="CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, v BLOB NOT NULL);")
    pool = ThreadPoolExecutor(max_workers=1)
    checkpointer = Checkpointer(path, db, pool, **kw)  # type: ignore[arg-type]
    try:
        yield db, pool, checkpointer
    finally:
        pool.shutdown(wait=True)
        checkpointer.close()
        db.close()


def commit(db: sqlite3.Connection, pool: ThreadPoolExecutor, checkpointer: Checkpointer, n: int) -> None:
    def one() -> None:
        with transaction(db):
            db.execute("INSERT INTO t (v) VALUES (?)", (ROW,))
        checkpointer.committed()

    for _ in range(n):
        pool.submit(one).result()


def test_writer_settings(tmp_path: Path) -> None:
    with writer(tmp_path / "s.db") as (db, _, _):
        assert db.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == BACKSTOP_PAGES
        assert db.execute("PRAGMA journal_size_limit").fetchone()[0] == JOURNAL_SIZE_LIMIT
        assert db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL: durability unchanged
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_background_checkpoints_copy_the_wal_into_the_database(tmp_path: Path) -> None:
    """60 commits of 2 pages each stay far below every checkpoint of the writer's, so only the
    background ones can have copied them into the database file: they did, and every row is there."""
    path = tmp_path / "c.db"
    with writer(path, every_commits=10, every_seconds=3600) as (db, pool, checkpointer):
        size_before = path.stat().st_size
        commit(db, pool, checkpointer, 60)
        checkpointer.close()  # waits for the running one (closing twice is harmless)
        assert checkpointer.runs >= 1 and checkpointer.restarts == 0
        # The main file holds what the checkpoints copied: at least 10 commits' rows.
        assert path.stat().st_size >= size_before + 10 * len(ROW)
        assert db.execute("SELECT COUNT(*) FROM t").fetchone()[0] == 60
    check = sqlite3.connect(path)  # every connection closed: every row reads back from the file
    try:
        assert check.execute("SELECT COUNT(*), SUM(length(v)) FROM t").fetchone() == (60, 60 * len(ROW))
    finally:
        check.close()


def test_a_quiet_writer_is_checkpointed_after_every_seconds(tmp_path: Path) -> None:
    """Few commits: each one starts a background checkpoint once `every_seconds` have passed (0)."""
    with writer(tmp_path / "q.db", every_commits=1_000_000, every_seconds=0.0) as (db, pool, checkpointer):
        commit(db, pool, checkpointer, 3)
        checkpointer.close()
        assert checkpointer.runs >= 1
        busy, pages, copied = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        assert busy == 0 and copied == pages  # nothing left behind by the background ones


def test_the_writer_restarts_the_wal_so_it_stays_small(tmp_path: Path) -> None:
    """A busy writer: its thread completes a checkpoint between two commits once the WAL has
    RESTART_PAGES, so the WAL restarts from its beginning and the file does not grow with the load
    (without it, background checkpoints never catch up with the writer)."""
    path = tmp_path / "w.db"
    with writer(path, every_commits=25, every_seconds=3600) as (db, pool, checkpointer):
        commit(db, pool, checkpointer, 4 * RESTART_PAGES // 2)  # 4x the restart point, below the backstop
        assert checkpointer.restarts >= 2
        wal = Path(f"{path}-wal").stat().st_size
        assert wal <= 2 * RESTART_PAGES * FRAME, wal


def test_a_commit_while_closing_is_not_failed_by_its_checkpoint(tmp_path: Path) -> None:
    """The store closes its writer's executor while the last commit may still run: that commit's
    `committed()` finds both executors shut down, and starts nothing rather than raising."""
    path = tmp_path / "x.db"
    with writer(path, every_commits=1, every_seconds=0.0) as (db, pool, checkpointer):
        checkpointer.close()
        pool.shutdown(wait=True)
        with transaction(db):
            db.execute("INSERT INTO t (v) VALUES (?)", (ROW,))
        checkpointer._wal_pages = RESTART_PAGES  # a restart would be due too
        checkpointer.committed()
        assert checkpointer.runs == 0 and checkpointer.restarts == 0
