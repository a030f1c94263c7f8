"""Durable state of run control in one SQLite file (<data_dir>/queue/run_control.db).

WAL with synchronous=FULL: a batch is on disk when `flush()` returns, and run control acknowledges
nothing (a message, a cancel_requested, a final) before that, so it all survives SIGKILL. One writer
and group commit keep it fast: every operation of a loop turn shares one transaction (one fsync), and
the message, its events, the run rows and the queue entries of one SubmitMessage land together.

Rows hold serialized protos where the service only ever reads them back whole (events, replies).
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from flynn_runtime.sqlite_db import open_db, transaction
from queue_svc import metrics

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

PAGE = 500


@dataclass
class InputRow:
    message_id: str
    sender: str
    text: str

    def to_json(self) -> dict[str, str]:
        return {"id": self.message_id, "sender": self.sender, "text": self.text}

    @staticmethod
    def from_json(d: dict[str, str]) -> InputRow:
        return InputRow(d["id"], d.get("sender", ""), d.get("text", ""))


@dataclass
class RunRow:
    run_id: str
    session_key: str
    channel: str
    state: int
    mode: int
    inputs: list[InputRow]
    steered: list[str] = field(default_factory=list)
    error_kind: str = ""
    error_message: str = ""
    output: str = ""
    final_reply_id: str = ""
    create_time: float = 0.0
    start_time: float | None = None
    cancel_request_time: float | None = None
    end_time: float | None = None
    attempt: int = 1
    cancel_reason: str = ""
    causation: bytes = b""


@dataclass
class MessageRow:
    message_id: str
    session_key: str
    idempotency_key: str
    channel: str
    sender: str
    text: str
    mode: int
    disposition: int
    run_id: str
    interrupted_run_id: str
    effective_mode: bytes
    event_seq: int
    receive_time: float
    causation: bytes


@dataclass
class SessionRow:
    session_key: str
    channel: str
    message_count: int = 0
    run_count: int = 0
    last_session_seq: int = 0


@dataclass
class QueueEntryRow:
    session_key: str
    pos: float
    kind: str  # "run" | "collect"
    run_id: str
    message_id: str


@dataclass
class ReplyRow:
    reply_id: str
    cursor: int | None
    kind: int
    run_id: str
    session_key: str
    channel: str
    idempotency_key: str
    speech_state: str  # "none" | "pending" | "done"
    data: bytes


_RUN_COLS = (
    "run_id, session_key, channel, state, mode, inputs, steered, error_kind, error_message, output, "
    "final_reply_id, create_time, start_time, cancel_request_time, end_time, attempt, cancel_reason, causation"
)


def _run_from(row: sqlite3.Row | tuple[object, ...]) -> RunRow:
    r = tuple(row)
    return RunRow(
        run_id=str(r[0]),
        session_key=str(r[1]),
        channel=str(r[2]),
        state=int(r[3]),  # type: ignore[call-overload]
        mode=int(r[4]),  # type: ignore[call-overload]
        inputs=[InputRow.from_json(d) for d in json.loads(str(r[5]))],
        steered=list(json.loads(str(r[6]))),
        error_kind=str(r[7]),
        error_message=str(r[8]),
        output=str(r[9]),
        final_reply_id=str(r[10]),
        create_time=float(r[11]),  # type: ignore[arg-type]
        start_time=None if r[12] is None else float(r[12]),  # type: ignore[arg-type]
        cancel_request_time=None if r[13] is None else float(r[13]),  # type: ignore[arg-type]
        end_time=None if r[14] is None else float(r[14]),  # type: ignore[arg-type]
        attempt=int(r[15]),  # type: ignore[call-overload]
        cancel_reason=str(r[16]),
        causation=bytes(r[17]),  # type: ignore[arg-type]
    )


K = TypeVar("K")
V = TypeVar("V")


def _expire(overlay: dict[K, tuple[int, V]], number: int) -> None:
    """Drop overlay rows whose batch (`number` or earlier) is now durable."""
    for k in [k for k, (n, _) in overlay.items() if n <= number]:
        del overlay[k]


class QueueStore:
    """The embedded store, with pipelined group commit.

    Writes are queued (in order) by the event-loop thread and made durable by `flush()`, which runs
    them as ONE transaction (one fsync) on a writer connection in a worker thread, so the loop keeps
    serving while the disk syncs; operations arriving meanwhile form the next batch. Reads use a
    second connection (WAL: readers never wait for the writer) and see committed data, overlaid with
    the queued writes they must not miss (dedupe lookups, runs, replies).
    """

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / "run_control.db"
        self._writer = self._connect()
        self._writer.executescript(SCHEMA)
        self._db = self._connect()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="queue-store")
        self._pending: list[tuple[str, tuple[object, ...]]] = []
        self._batch = 1  # number of the batch now being filled
        # Overlays: queued rows, tagged with their batch, dropped once that batch is durable.
        self._msg_by_key: dict[tuple[str, str], tuple[int, MessageRow]] = {}
        self._msg_by_id: dict[str, tuple[int, MessageRow]] = {}
        self._runs: dict[str, tuple[int, RunRow]] = {}
        self._replies: dict[str, tuple[int, ReplyRow]] = {}
        self._reply_keys: dict[tuple[str, str], tuple[int, ReplyRow]] = {}
        self._finals: dict[str, int] = {}

    def _connect(self) -> sqlite3.Connection:
        return open_db(Path(self.path))

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._db.close()
        self._writer.close()

    # --- batching ------------------------------------------------------------------------------

    @property
    def has_pending(self) -> bool:
        return bool(self._pending)

    def mark(self) -> int:
        return len(self._pending)

    def rollback_to(self, mark: int) -> None:
        """Forget writes queued after `mark` (an operation that raised)."""
        del self._pending[mark:]

    def _queue(self, sql: str, params: tuple[object, ...]) -> None:
        self._pending.append((sql, params))

    async def flush(self) -> None:
        """Make every queued write durable (one transaction); raises when the commit failed."""
        if not self._pending:
            return
        batch, self._pending = self._pending, []
        number = self._batch
        self._batch += 1
        await asyncio.get_running_loop().run_in_executor(self._pool, self._commit, batch)
        _expire(self._msg_by_key, number)
        _expire(self._msg_by_id, number)
        _expire(self._runs, number)
        _expire(self._replies, number)
        _expire(self._reply_keys, number)
        for k in [k for k, n in self._finals.items() if n <= number]:
            del self._finals[k]

    def _commit(self, batch: list[tuple[str, tuple[object, ...]]]) -> None:
        with metrics.COMMIT_SECONDS.time():
            self._commit_now(batch)
        metrics.COMMIT_BATCH.observe(len(batch))

    def _commit_now(self, batch: list[tuple[str, tuple[object, ...]]]) -> None:
        with transaction(self._writer) as db:
            for sql, params in batch:
                db.execute(sql, params)

    # --- writes (queued; durable after flush) -------------------------------------------------

    def put_session(self, s: SessionRow) -> None:
        self._queue(
            "INSERT INTO sessions (session_key, channel, message_count, run_count, last_session_seq) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT (session_key) DO UPDATE SET channel=excluded.channel, "
            "message_count=excluded.message_count, run_count=excluded.run_count, "
            "last_session_seq=excluded.last_session_seq",
            (s.session_key, s.channel, s.message_count, s.run_count, s.last_session_seq),
        )

    def insert_message(self, m: MessageRow) -> None:
        self._queue(
            "INSERT INTO messages (message_id, session_key, idempotency_key, channel, sender, text, mode, "
            "disposition, run_id, interrupted_run_id, effective_mode, event_seq, receive_time, causation) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                m.message_id, m.session_key, m.idempotency_key, m.channel, m.sender, m.text, m.mode,
                m.disposition, m.run_id, m.interrupted_run_id, m.effective_mode, m.event_seq,
                m.receive_time, m.causation,
            ),
        )  # fmt: skip
        self._msg_by_key[(m.session_key, m.idempotency_key)] = (self._batch, m)
        self._msg_by_id[m.message_id] = (self._batch, m)

    def set_message_run(self, message_id: str, run_id: str) -> None:
        self._queue("UPDATE messages SET run_id = ? WHERE message_id = ?", (run_id, message_id))
        m = self.message(message_id)
        if m is not None:
            m.run_id = run_id
            self._msg_by_key[(m.session_key, m.idempotency_key)] = (self._batch, m)
            self._msg_by_id[m.message_id] = (self._batch, m)

    def put_run(self, r: RunRow) -> None:
        values = (
            r.run_id, r.session_key, r.channel, r.state, r.mode,
            json.dumps([i.to_json() for i in r.inputs]), json.dumps(r.steered),
            r.error_kind, r.error_message, r.output, r.final_reply_id, r.create_time, r.start_time,
            r.cancel_request_time, r.end_time, r.attempt, r.cancel_reason, r.causation,
        )  # fmt: skip
        self._queue(
            f"INSERT INTO runs ({_RUN_COLS}) VALUES ({', '.join('?' * 18)}) ON CONFLICT (run_id) DO UPDATE SET "
            "state=excluded.state, inputs=excluded.inputs, steered=excluded.steered, "
            "error_kind=excluded.error_kind, error_message=excluded.error_message, output=excluded.output, "
            "final_reply_id=excluded.final_reply_id, start_time=excluded.start_time, "
            "cancel_request_time=excluded.cancel_request_time, end_time=excluded.end_time, "
            "attempt=excluded.attempt, cancel_reason=excluded.cancel_reason",
            values,
        )
        self._runs[r.run_id] = (self._batch, r)

    def append_event(
        self, global_seq: int, session_key: str, session_seq: int, type_: int, data: bytes
    ) -> None:
        self._queue(
            "INSERT INTO events (global_seq, session_key, session_seq, type, data) VALUES (?, ?, ?, ?, ?)",
            (global_seq, session_key, session_seq, type_, data),
        )

    def insert_reply(self, r: ReplyRow) -> bool:
        """False when the reply is a second final for its run (refused; the unique index backs this up)."""
        if r.kind == 1:
            if r.run_id in self._finals or self._final_exists(r.run_id):
                return False
            self._finals[r.run_id] = self._batch
        if r.reply_id in self._replies or self.reply(r.reply_id) is not None:
            return False
        self._queue(
            "INSERT OR IGNORE INTO replies (reply_id, cursor, kind, run_id, session_key, channel, "
            "idempotency_key, speech_state, data) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (r.reply_id, r.cursor, r.kind, r.run_id, r.session_key, r.channel, r.idempotency_key,
             r.speech_state, r.data),
        )  # fmt: skip
        self._replies[r.reply_id] = (self._batch, r)
        if r.idempotency_key:
            self._reply_keys[(r.session_key, r.idempotency_key)] = (self._batch, r)
        return True

    def update_reply(self, reply_id: str, cursor: int | None, speech_state: str, data: bytes) -> None:
        self._queue(
            "UPDATE replies SET cursor = ?, speech_state = ?, data = ? WHERE reply_id = ?",
            (cursor, speech_state, data, reply_id),
        )
        r = self.reply(reply_id)
        if r is not None:
            r.cursor, r.speech_state, r.data = cursor, speech_state, data
            self._replies[reply_id] = (self._batch, r)
            if r.idempotency_key:
                self._reply_keys[(r.session_key, r.idempotency_key)] = (self._batch, r)

    def add_queue_entry(self, e: QueueEntryRow) -> None:
        self._queue(
            "INSERT INTO queue_entries (session_key, pos, kind, run_id, message_id) VALUES (?, ?, ?, ?, ?)",
            (e.session_key, e.pos, e.kind, e.run_id, e.message_id),
        )

    def remove_queue_entry(self, session_key: str, pos: float) -> None:
        self._queue("DELETE FROM queue_entries WHERE session_key = ? AND pos = ?", (session_key, pos))

    def _final_exists(self, run_id: str) -> bool:
        row = self._db.execute("SELECT 1 FROM replies WHERE run_id = ? AND kind = 1", (run_id,)).fetchone()
        return row is not None

    # --- reads -------------------------------------------------------------------------------

    def max_global_seq(self) -> int:
        row = self._db.execute("SELECT COALESCE(MAX(global_seq), 0) FROM events").fetchone()
        return int(row[0])

    def max_reply_cursor(self) -> int:
        row = self._db.execute("SELECT COALESCE(MAX(cursor), 0) FROM replies").fetchone()
        return int(row[0])

    def sessions(self) -> list[SessionRow]:
        rows = self._db.execute(
            "SELECT session_key, channel, message_count, run_count, last_session_seq FROM sessions"
        ).fetchall()
        return [SessionRow(*r) for r in rows]

    def session_channel(self, session_key: str) -> str | None:
        """The channel of a stored session (a session evicted from memory keeps its owner)."""
        row = self._db.execute(
            "SELECT channel FROM sessions WHERE session_key = ?", (session_key,)
        ).fetchone()
        return str(row[0]) if row is not None else None

    def message_by_key(self, session_key: str, idempotency_key: str) -> MessageRow | None:
        queued = self._msg_by_key.get((session_key, idempotency_key))
        if queued is not None:
            return queued[1]
        row = self._db.execute(
            "SELECT message_id, session_key, idempotency_key, channel, sender, text, mode, disposition, run_id, "
            "interrupted_run_id, effective_mode, event_seq, receive_time, causation FROM messages "
            "WHERE session_key = ? AND idempotency_key = ?",
            (session_key, idempotency_key),
        ).fetchone()
        return MessageRow(*row) if row else None

    def message(self, message_id: str) -> MessageRow | None:
        queued = self._msg_by_id.get(message_id)
        if queued is not None:
            return queued[1]
        row = self._db.execute(
            "SELECT message_id, session_key, idempotency_key, channel, sender, text, mode, disposition, run_id, "
            "interrupted_run_id, effective_mode, event_seq, receive_time, causation FROM messages "
            "WHERE message_id = ?",
            (message_id,),
        ).fetchone()
        return MessageRow(*row) if row else None

    def run(self, run_id: str) -> RunRow | None:
        queued = self._runs.get(run_id)
        if queued is not None:
            return queued[1]
        row = self._db.execute(f"SELECT {_RUN_COLS} FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        return _run_from(row) if row else None

    def runs_in_states(self, states: tuple[int, ...]) -> list[RunRow]:
        marks = ", ".join("?" * len(states))
        rows = self._db.execute(f"SELECT {_RUN_COLS} FROM runs WHERE state IN ({marks}) ORDER BY seq", states)
        return [_run_from(r) for r in rows.fetchall()]

    def list_runs(
        self, session_key: str, state: int, before_seq: int, limit: int
    ) -> list[tuple[int, RunRow]]:
        where, args = ["seq < ?"], [before_seq]
        if session_key:
            where.append("session_key = ?")
            args.append(session_key)  # type: ignore[arg-type]
        if state:
            where.append("state = ?")
            args.append(state)
        rows = self._db.execute(
            f"SELECT seq, {_RUN_COLS} FROM runs WHERE {' AND '.join(where)} ORDER BY seq DESC LIMIT ?",
            (*args, limit),
        ).fetchall()
        return [(int(r[0]), _run_from(tuple(r)[1:])) for r in rows]

    def queue_entries(self) -> list[QueueEntryRow]:
        rows = self._db.execute(
            "SELECT session_key, pos, kind, run_id, message_id FROM queue_entries ORDER BY session_key, pos"
        ).fetchall()
        return [QueueEntryRow(*r) for r in rows]

    def events_after(
        self, after_seq: int, session_key: str = "", limit: int = PAGE, upto: int = 1 << 62
    ) -> list[bytes]:
        if session_key:
            rows = self._db.execute(
                "SELECT data FROM events WHERE session_key = ? AND global_seq > ? AND global_seq <= ? "
                "ORDER BY global_seq LIMIT ?",
                (session_key, after_seq, upto, limit),
            )
        else:
            rows = self._db.execute(
                "SELECT data FROM events WHERE global_seq > ? AND global_seq <= ? ORDER BY global_seq LIMIT ?",
                (after_seq, upto, limit),
            )
        return [bytes(r[0]) for r in rows.fetchall()]

    def replies_after(self, after_cursor: int, limit: int = PAGE, upto: int = 1 << 62) -> list[bytes]:
        rows = self._db.execute(
            "SELECT data FROM replies WHERE cursor IS NOT NULL AND cursor > ? AND cursor <= ? ORDER BY cursor LIMIT ?",
            (after_cursor, upto, limit),
        )
        return [bytes(r[0]) for r in rows.fetchall()]

    def reply(self, reply_id: str) -> ReplyRow | None:
        queued = self._replies.get(reply_id)
        if queued is not None:
            return queued[1]
        row = self._db.execute(
            "SELECT reply_id, cursor, kind, run_id, session_key, channel, idempotency_key, speech_state, data "
            "FROM replies WHERE reply_id = ?",
            (reply_id,),
        ).fetchone()
        return ReplyRow(*row) if row else None

    def reply_by_key(self, session_key: str, idempotency_key: str) -> ReplyRow | None:
        queued = self._reply_keys.get((session_key, idempotency_key))
        if queued is not None:
            return queued[1]
        row = self._db.execute(
            "SELECT reply_id, cursor, kind, run_id, session_key, channel, idempotency_key, speech_state, data "
            "FROM replies WHERE session_key = ? AND idempotency_key = ?",
            (session_key, idempotency_key),
        ).fetchone()
        return ReplyRow(*row) if row else None

    def pending_speech(self) -> list[ReplyRow]:
        rows = self._db.execute(
            "SELECT reply_id, cursor, kind, run_id, session_key, channel, idempotency_key, speech_state, data "
            "FROM replies WHERE speech_state = 'pending' ORDER BY rowid"
        ).fetchall()
        return [ReplyRow(*r) for r in rows]
