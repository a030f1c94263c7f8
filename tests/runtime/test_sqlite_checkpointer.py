"""WAL checkpoints in the background (flynn_runtime/sqlite_db.Checkpointer), on real SQLite files."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from flynn_runtime.sqlite_db import (
    JOURNAL_SIZE_LIMIT,
    WRITER_CHECKPOINT_PAGES,
    Checkpointer,
    open_db,
    transaction,
)

ROW = b"x" * 8000  # two pages of 4 KiB each
FRAME = 4096 + 24  # one page in the WAL


@contextmanager
def writer(
    path: Path, every_commits: int, every_seconds: float
) -> Iterator[tuple[sqlite3.Connection, Checkpointer]]:
    db = open_db(path, schema="CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, v BLOB NOT NULL);")
    checkpointer = Checkpointer(path, db, every_commits=every_commits, every_seconds=every_seconds)
    try:
        yield db, checkpointer
    finally:
        checkpointer.close()
        db.close()


def commit(db: sqlite3.Connection, checkpointer: Checkpointer, n: int) -> None:
    for _ in range(n):
        with transaction(db):
            db.execute("INSERT INTO t (v) VALUES (?)", (ROW,))
        checkpointer.committed()


def test_writer_settings(tmp_path: Path) -> None:
    with writer(tmp_path / "s.db", 25, 1.0) as (db, _):
        assert db.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == WRITER_CHECKPOINT_PAGES
        assert db.execute("PRAGMA journal_size_limit").fetchone()[0] == JOURNAL_SIZE_LIMIT
        assert JOURNAL_SIZE_LIMIT > WRITER_CHECKPOINT_PAGES * FRAME  # a normal restart keeps the file
        assert db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL: durability unchanged
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_background_checkpoints_copy_the_wal_into_the_database(tmp_path: Path) -> None:
    """60 commits of 2 pages each stay far below the writer's own checkpoint, so only the background
    ones can have copied them into the database file: they did, and every row is there."""
    path = tmp_path / "c.db"
    with writer(path, 10, 3600) as (db, checkpointer):
        size_before = path.stat().st_size
        commit(db, checkpointer, 60)
        checkpointer.close()  # waits for the running one (closing twice is harmless)
        assert checkpointer.runs >= 1
        assert path.stat().st_size >= size_before + 10 * len(ROW)  # at least 10 commits' rows copied
        assert db.execute("SELECT COUNT(*) FROM t").fetchone()[0] == 60
    check = sqlite3.connect(path)  # every connection closed: every row reads back from the file
    try:
        assert check.execute("SELECT COUNT(*), SUM(length(v)) FROM t").fetchone() == (60, 60 * len(ROW))
    finally:
        check.close()


def test_a_quiet_writer_is_checkpointed_after_every_seconds(tmp_path: Path) -> None:
    """Few commits: each one starts a background checkpoint once `every_seconds` have passed (0)."""
    with writer(tmp_path / "q.db", 1_000_000, 0.0) as (db, checkpointer):
        commit(db, checkpointer, 3)
        checkpointer.close()
        assert checkpointer.runs >= 1
        busy, pages, copied = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        assert busy == 0 and copied == pages  # nothing left behind by the background ones


def test_the_wal_restarts_so_it_stays_bounded(tmp_path: Path) -> None:
    """A writer that commits back to back, 2.5x the writer's checkpoint in pages: the WAL restarts
    from its beginning (after a background checkpoint that caught up, or the writer's own), so its
    file stays within the writer's checkpoint and does not grow with the load."""
    path = tmp_path / "w.db"
    with writer(path, 25, 3600) as (db, checkpointer):
        commit(db, checkpointer, 5 * WRITER_CHECKPOINT_PAGES // 4)
        wal = Path(f"{path}-wal").stat().st_size
        assert wal <= (WRITER_CHECKPOINT_PAGES + 50) * FRAME, wal
        assert db.execute("SELECT COUNT(*) FROM t").fetchone()[0] == 5 * WRITER_CHECKPOINT_PAGES // 4


def test_a_commit_while_closing_is_not_failed_by_its_checkpoint(tmp_path: Path) -> None:
    """The store may close while its last commit runs: that commit's `committed()` finds the
    checkpointer shut down and starts nothing rather than raising."""
    with writer(tmp_path / "x.db", 1, 0.0) as (db, checkpointer):
        checkpointer.close()
        with transaction(db):
            db.execute("INSERT INTO t (v) VALUES (?)", (ROW,))
        checkpointer.committed()
        assert checkpointer.runs == 0
