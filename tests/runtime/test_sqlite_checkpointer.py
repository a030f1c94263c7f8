"""WAL checkpoints in the background (flynn_runtime/sqlite_db.Checkpointer), on real SQLite files."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from flynn_runtime.sqlite_db import JOURNAL_SIZE_LIMIT, Checkpointer, open_db, transaction

ROW = b"x" * 8000  # two pages of 4 KiB each


def _writer(path: Path) -> sqlite3.Connection:
    db = open_db(path, schema="CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, v BLOB NOT NULL);")
    Checkpointer.serve(db)
    return db


def _commit(db: sqlite3.Connection, checkpointer: Checkpointer, n: int) -> None:
    for i in range(n):
        with transaction(db):
            db.execute("INSERT INTO t (v) VALUES (?)", (ROW,))
        checkpointer.committed()


def test_writer_settings(tmp_path: Path) -> None:
    db = _writer(tmp_path / "s.db")
    try:
        assert db.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 1000
        assert db.execute("PRAGMA journal_size_limit").fetchone()[0] == JOURNAL_SIZE_LIMIT
        assert db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL: durability unchanged
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        db.close()


def test_background_checkpoints_copy_the_wal_into_the_database(tmp_path: Path) -> None:
    """60 commits of 2 pages each stay far below the writer's own 1,000-page checkpoint, so only the
    checkpointer can have copied them into the database file: it did, and every row is there."""
    path = tmp_path / "c.db"
    db = _writer(path)
    checkpointer = Checkpointer(path, every_commits=10, every_seconds=3600)
    size_before = path.stat().st_size
    try:
        _commit(db, checkpointer, 60)
        checkpointer.close()  # waits for the running one
        assert checkpointer.runs >= 1
        # The main file holds what the checkpoints copied: at least 10 commits' rows (80 KB).
        assert path.stat().st_size >= size_before + 10 * len(ROW)
        assert db.execute("SELECT COUNT(*) FROM t").fetchone()[0] == 60
    finally:
        db.close()
    # The last connection closed: what was left went into the file, and every row reads back.
    check = sqlite3.connect(path)
    try:
        assert check.execute("SELECT COUNT(*), SUM(length(v)) FROM t").fetchone() == (60, 60 * len(ROW))
    finally:
        check.close()


def test_a_quiet_writer_is_checkpointed_after_every_seconds(tmp_path: Path) -> None:
    """Few commits: each one starts a checkpoint once `every_seconds` have passed (here 0)."""
    path = tmp_path / "q.db"
    db = _writer(path)
    checkpointer = Checkpointer(path, every_commits=1_000_000, every_seconds=0.0)
    try:
        _commit(db, checkpointer, 3)
        checkpointer.close()
        assert checkpointer.runs >= 1
        (busy, log_frames, copied) = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        assert busy == 0 and copied == log_frames  # nothing left behind by the background ones
    finally:
        db.close()


def test_the_writer_restarts_the_wal_so_it_stays_small(tmp_path: Path) -> None:
    """A busy writer with background checkpoints: the WAL still restarts from its beginning (the
    writer's own checkpoint at 1,000 pages completes it), so the file does not grow with the load."""
    path = tmp_path / "w.db"
    db = _writer(path)
    checkpointer = Checkpointer(path, every_commits=25, every_seconds=3600)
    try:
        _commit(db, checkpointer, 2000)  # 4,000 pages: four times the restart point
        wal = Path(f"{path}-wal").stat().st_size
        assert wal <= 2 * 1000 * (4096 + 24), wal
    finally:
        checkpointer.close()
        db.close()
