"""Run control's embedded store: one SQLite file (<data_dir>/queue/run_control.db).

WAL with synchronous=FULL: a batch is on disk when `flush()` returns, and run control acknowledges
nothing (a message, a cancel_requested, a final) before that, so it all survives SIGKILL. One writer
and group commit keep it fast: every operation of a loop turn shares one transaction (one fsync),
committed on a writer connection in a worker thread so the loop keeps serving while the disk syncs.
Reads use a second connection (WAL: readers never wait for the writer); they are local and short, so
they run on the loop (their `async` is the shared interface, store.py). WAL checkpoints run mostly on
a connection and thread of their own (`Checkpointer`, sqlite_db.py): on a big store a checkpoint copies
pages spread over the whole file, and inside a commit it was the tail of submit->ack
(docs/operations/DATABASE.md, "SQLite settings").

Rows hold serialized protos where the service only ever reads them back whole (events, replies).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from flynn_runtime.sqlite_db import Checkpointer, open_db, transaction
from queue_svc.store import (
    MESSAGE_COLS,
    PAGE,
    REPLY_COLS,
    RUN_COLS,
    MessageRow,
    QueueEntryRow,
    QueueStore,
    ReplyRow,
    Row,
    RunRow,
    SessionRow,
    Statement,
    compact,
    in_thread,
    message_from,
    reply_from,
    run_from,
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS sessions (
  session_key TEXT PRIMARY KEY,
  channel TEXT NOT NULL,
  message_count INTEGER NOT NULL DEFAULT 0,
  run_count INTEGER NOT NULL DEFAULT 0,
  last_session_seq INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS messages (
  message_id TEXT PRIMARY KEY,
  session_key TEXT NOT NULL,
  idempotency_key TEXT NOT NULL,
  channel TEXT NOT NULL,
  sender TEXT NOT NULL,
  text TEXT NOT NULL,
  mode INTEGER NOT NULL,
  disposition INTEGER NOT NULL,
  run_id TEXT NOT NULL DEFAULT '',
  interrupted_run_id TEXT NOT NULL DEFAULT '',
  effective_mode BLOB NOT NULL,
  event_seq INTEGER NOT NULL,
  receive_time REAL NOT NULL,
  causation BLOB NOT NULL,
  UNIQUE (session_key, idempotency_key)
);
CREATE TABLE IF NOT EXISTS runs (
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  run_id TEXT NOT NULL UNIQUE,
  session_key TEXT NOT NULL,
  channel TEXT NOT NULL,
  state INTEGER NOT NULL,
  mode INTEGER NOT NULL,
  inputs TEXT NOT NULL,
  steered TEXT NOT NULL,
  error_kind TEXT NOT NULL DEFAULT '',
  error_message TEXT NOT NULL DEFAULT '',
  output TEXT NOT NULL DEFAULT '',
  final_reply_id TEXT NOT NULL DEFAULT '',
  create_time REAL NOT NULL,
  start_time REAL,
  cancel_request_time REAL,
  end_time REAL,
  attempt INTEGER NOT NULL DEFAULT 1,
  cancel_reason TEXT NOT NULL DEFAULT '',
  causation BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS runs_by_session ON runs (session_key, seq);
CREATE INDEX IF NOT EXISTS runs_by_state ON runs (state, seq);
CREATE TABLE IF NOT EXISTS events (
  global_seq INTEGER PRIMARY KEY,
  session_key TEXT NOT NULL,
  session_seq INTEGER NOT NULL,
  type INTEGER NOT NULL,
  data BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_session ON events (session_key, global_seq);
CREATE TABLE IF NOT EXISTS replies (
  reply_id TEXT PRIMARY KEY,
  cursor INTEGER UNIQUE,
  kind INTEGER NOT NULL,
  run_id TEXT NOT NULL DEFAULT '',
  session_key TEXT NOT NULL,
  channel TEXT NOT NULL,
  idempotency_key TEXT NOT NULL DEFAULT '',
  speech_state TEXT NOT NULL,
  data BLOB NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS one_final_per_run ON replies (run_id) WHERE kind = 1;
CREATE UNIQUE INDEX IF NOT EXISTS reply_idempotency ON replies (session_key, idempotency_key)
  WHERE idempotency_key != '';
CREATE INDEX IF NOT EXISTS replies_pending ON replies (speech_state) WHERE speech_state = 'pending';
CREATE TABLE IF NOT EXISTS queue_entries (
  session_key TEXT NOT NULL,
  pos REAL NOT NULL,
  kind TEXT NOT NULL,
  run_id TEXT NOT NULL DEFAULT '',
  message_id TEXT NOT NULL DEFAULT '',
  PRIMARY KEY (session_key, pos)
);
"""


class SqliteQueueStore(QueueStore):
    """The embedded store, with pipelined group commit (see the module docstring)."""

    backend = "sqlite"

    def __init__(self, directory: Path) -> None:
        super().__init__()
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / "run_control.db"
        self._writer = open_db(self.path)
        self._writer.executescript(SCHEMA)
        self._db = open_db(self.path)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="queue-store")
        self._checkpointer = Checkpointer(self.path, self._writer)

    async def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._checkpointer.close()
        self._db.close()
        self._writer.close()

    async def _commit(
        self, batch: list[Statement], number: int, epochs: dict[str, int], on_durable: Callable[[], None]
    ) -> None:
        # Compacted on the loop: the writer thread needs the GIL (which the busy loop holds) as little as
        # it can, each time it wants it back costing up to a switch interval.
        groups = compact(batch)
        await in_thread(self._pool, lambda: self._commit_now(groups), lambda _: on_durable())

    def _commit_now(self, groups: list[tuple[str, list[tuple[object, ...]]]]) -> None:
        with transaction(self._writer) as db:
            for sql, rows in groups:
                db.executemany(sql, rows)
        self._checkpointer.committed()

    def _one(self, sql: str, params: tuple[object, ...]) -> Row | None:
        row = self._db.execute(sql, params).fetchone()
        return tuple(row) if row is not None else None

    def _all(self, sql: str, params: tuple[object, ...] = ()) -> list[Row]:
        return [tuple(r) for r in self._db.execute(sql, params).fetchall()]

    async def _read_message_by_key(self, session_key: str, idempotency_key: str) -> MessageRow | None:
        sql = f"SELECT {MESSAGE_COLS} FROM messages WHERE session_key = ? AND idempotency_key = ?"
        row = self._one(sql, (session_key, idempotency_key))
        return message_from(row) if row else None

    async def _read_message(self, message_id: str) -> MessageRow | None:
        row = self._one(f"SELECT {MESSAGE_COLS} FROM messages WHERE message_id = ?", (message_id,))
        return message_from(row) if row else None

    async def _read_run(self, run_id: str) -> RunRow | None:
        row = self._one(f"SELECT {RUN_COLS} FROM runs WHERE run_id = ?", (run_id,))
        return run_from(row) if row else None

    async def _read_reply(self, reply_id: str) -> ReplyRow | None:
        row = self._one(f"SELECT {REPLY_COLS} FROM replies WHERE reply_id = ?", (reply_id,))
        return reply_from(row) if row else None

    async def _read_reply_by_key(self, session_key: str, idempotency_key: str) -> ReplyRow | None:
        # `!= ''` (every PostReply has a key) lets the partial index reply_idempotency serve it (no scan).
        sql = f"SELECT {REPLY_COLS} FROM replies WHERE session_key = ? AND idempotency_key = ? AND idempotency_key != ''"
        row = self._one(sql, (session_key, idempotency_key))
        return reply_from(row) if row else None

    async def max_global_seq(self) -> int:
        row = self._one("SELECT COALESCE(MAX(global_seq), 0) FROM events", ())
        return int(row[0]) if row else 0

    async def max_reply_cursor(self) -> int:
        row = self._one("SELECT COALESCE(MAX(cursor), 0) FROM replies", ())
        return int(row[0]) if row else 0

    async def sessions_per_channel(self) -> dict[str, int]:
        rows = self._all("SELECT channel, COUNT(*) FROM sessions GROUP BY channel")
        return {str(r[0]): int(r[1]) for r in rows}

    async def busy_sessions(self) -> list[SessionRow]:
        rows = self._all(
            "SELECT session_key, channel, message_count, run_count, last_session_seq FROM sessions WHERE session_key IN "
            "(SELECT session_key FROM runs WHERE state IN (1, 2, 3) UNION SELECT session_key FROM queue_entries)"
        )
        return [SessionRow(*r) for r in rows]

    async def _read_session(self, session_key: str) -> SessionRow | None:
        row = self._one(
            "SELECT session_key, channel, message_count, run_count, last_session_seq FROM sessions WHERE session_key = ?",
            (session_key,),
        )
        return SessionRow(*row) if row else None

    async def runs_in_states(self, states: tuple[int, ...], session_key: str | None = None) -> list[RunRow]:
        marks = ", ".join("?" * len(states))
        if session_key is None:
            rows = self._all(f"SELECT {RUN_COLS} FROM runs WHERE state IN ({marks}) ORDER BY seq", states)
        else:
            rows = self._all(
                f"SELECT {RUN_COLS} FROM runs WHERE state IN ({marks}) AND session_key = ? ORDER BY seq",
                (*states, session_key),
            )
        return [run_from(r) for r in rows]

    async def list_runs(
        self, session_key: str, state: int, before_seq: int, limit: int
    ) -> list[tuple[int, RunRow]]:
        where = ["seq < ?"]
        args: list[object] = [before_seq]
        if session_key:
            where.append("session_key = ?")
            args.append(session_key)
        if state:
            where.append("state = ?")
            args.append(state)
        rows = self._all(
            f"SELECT seq, {RUN_COLS} FROM runs WHERE {' AND '.join(where)} ORDER BY seq DESC LIMIT ?",
            (*args, limit),
        )
        return [(int(r[0]), run_from(r[1:])) for r in rows]

    async def queue_entries(self, session_key: str | None = None) -> list[QueueEntryRow]:
        if session_key is None:
            rows = self._all(
                "SELECT session_key, pos, kind, run_id, message_id FROM queue_entries ORDER BY session_key, pos"
            )
        else:
            rows = self._all(
                "SELECT session_key, pos, kind, run_id, message_id FROM queue_entries WHERE session_key = ? "
                "ORDER BY pos",
                (session_key,),
            )
        return [QueueEntryRow(*r) for r in rows]

    async def events_after(
        self, after_seq: int, session_key: str = "", limit: int = PAGE, upto: int = 1 << 62
    ) -> list[bytes]:
        if session_key:
            rows = self._all(
                "SELECT data FROM events WHERE session_key = ? AND global_seq > ? AND global_seq <= ? "
                "ORDER BY global_seq LIMIT ?",
                (session_key, after_seq, upto, limit),
            )
        else:
            rows = self._all(
                "SELECT data FROM events WHERE global_seq > ? AND global_seq <= ? ORDER BY global_seq LIMIT ?",
                (after_seq, upto, limit),
            )
        return [bytes(r[0]) for r in rows]

    async def replies_after(self, after_cursor: int, limit: int = PAGE, upto: int = 1 << 62) -> list[bytes]:
        rows = self._all(
            "SELECT data FROM replies WHERE cursor IS NOT NULL AND cursor > ? AND cursor <= ? ORDER BY cursor LIMIT ?",
            (after_cursor, upto, limit),
        )
        return [bytes(r[0]) for r in rows]

    async def pending_speech(self, session_key: str | None = None) -> list[ReplyRow]:
        if session_key is None:
            rows = self._all(
                f"SELECT {REPLY_COLS} FROM replies WHERE speech_state = 'pending' ORDER BY rowid"
            )
        else:
            rows = self._all(
                f"SELECT {REPLY_COLS} FROM replies WHERE speech_state = 'pending' AND session_key = ? ORDER BY rowid",
                (session_key,),
            )
        return [reply_from(r) for r in rows]
