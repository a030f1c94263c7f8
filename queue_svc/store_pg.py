"""Run control's PostgreSQL store (schema `flynn_queue`), with the same guarantees as the SQLite one.

Design (issue 13's design point). Run control keeps its synchronous critical section: an operation
mutates memory and queues its writes, and nothing awaits inside it, so the per-session invariants
(one active run, one terminal event, one final, gapless sequence numbers) stay the property of one
loop turn and need no locks in the database. The commit is handed to ONE dedicated writer connection
that runs each batch as one transaction in pipeline mode: every statement of the batch is sent
without waiting, then COMMIT, so a batch costs about one network round trip plus the server's WAL
flush, whatever its size; while it is in flight the next batch fills (group commit). Acknowledgements
wait for that COMMIT, exactly as they wait for the fsync on SQLite. The alternative (asynchronous
operations with per-session serialization, each doing its own transaction) costs a round trip per
operation on a pool connection, needs row locks or serializable retries to keep the invariants, and
measured slower on this machine (bench/storage): pgbench commits a small transaction in 0.64 ms at
one client, and group commit amortizes that over every operation of a batch.

Reads never run inside an operation. The few an operation needs (an idempotency key, a finished run,
a reply awaiting speech) are awaited before it enters its critical section, on pooled reader
connections, and the store's overlays (store.py) add every write queued or committed since the read
started, so the check is complete without holding anything across the await.

A commit that fails because the database went away is retried on a fresh connection, in order, until
it succeeds: the batch's operations are in memory already and later batches build on them, so the
batch is never dropped. Each batch writes its number into `meta` in the same transaction, so a retry
after a COMMIT whose answer was lost finds it applied and does not apply it twice. Meanwhile callers
wait (bounded by their deadline; new calls are refused with UNAVAILABLE / DATABASE_UNAVAILABLE while
the writer is down) and the service's health is NOT_SERVING (flynn_runtime/database_health.py).

For fenced ownership (issue 14): every batch is one transaction on one connection, so a batch can
begin by checking the owner epoch of each session it writes (`SELECT … FOR SHARE` on a lease row, or
an epoch column compared in each UPDATE) and be refused as a whole when stale; the writer is the one
place where that check goes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Generic, TypeVar

import psycopg

from flynn_runtime.database import Database, database_unavailable
from flynn_runtime.pg_migrations import Migration
from queue_svc.store import (
    MESSAGE_COLS,
    PAGE,
    REPLY_COLS,
    RUN_COLS,
    MessageRow,
    QueueEntryRow,
    QueueStore,
    ReplyRow,
    RunRow,
    SessionRow,
    Statement,
    message_from,
    reply_from,
    run_from,
)

log = logging.getLogger(__name__)

K = TypeVar("K")
V = TypeVar("V")

SCHEMA = "flynn_queue"

MIGRATIONS = (
    Migration(
        1,
        "run control: sessions, messages, runs, events, replies, queue entries",
        """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE sessions (
  session_key TEXT PRIMARY KEY,
  channel TEXT NOT NULL,
  message_count BIGINT NOT NULL DEFAULT 0,
  run_count BIGINT NOT NULL DEFAULT 0,
  last_session_seq BIGINT NOT NULL DEFAULT 0
);
CREATE TABLE messages (
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
  effective_mode BYTEA NOT NULL,
  event_seq BIGINT NOT NULL,
  receive_time DOUBLE PRECISION NOT NULL,
  causation BYTEA NOT NULL,
  UNIQUE (session_key, idempotency_key)
);
CREATE TABLE runs (
  seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
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
  create_time DOUBLE PRECISION NOT NULL,
  start_time DOUBLE PRECISION,
  cancel_request_time DOUBLE PRECISION,
  end_time DOUBLE PRECISION,
  attempt INTEGER NOT NULL DEFAULT 1,
  cancel_reason TEXT NOT NULL DEFAULT '',
  causation BYTEA NOT NULL
);
CREATE INDEX runs_by_session ON runs (session_key, seq);
CREATE INDEX runs_by_state ON runs (state, seq);
CREATE TABLE events (
  global_seq BIGINT PRIMARY KEY,
  session_key TEXT NOT NULL,
  session_seq BIGINT NOT NULL,
  type INTEGER NOT NULL,
  data BYTEA NOT NULL
);
CREATE INDEX events_by_session ON events (session_key, global_seq);
CREATE TABLE replies (
  seq BIGINT GENERATED ALWAYS AS IDENTITY,
  reply_id TEXT PRIMARY KEY,
  cursor BIGINT UNIQUE,
  kind INTEGER NOT NULL,
  run_id TEXT NOT NULL DEFAULT '',
  session_key TEXT NOT NULL,
  channel TEXT NOT NULL,
  idempotency_key TEXT NOT NULL DEFAULT '',
  speech_state TEXT NOT NULL,
  data BYTEA NOT NULL
);
CREATE UNIQUE INDEX one_final_per_run ON replies (run_id) WHERE kind = 1;
CREATE UNIQUE INDEX reply_idempotency ON replies (session_key, idempotency_key) WHERE idempotency_key <> '';
CREATE INDEX replies_pending ON replies (speech_state) WHERE speech_state = 'pending';
CREATE TABLE queue_entries (
  session_key TEXT NOT NULL,
  pos DOUBLE PRECISION NOT NULL,
  kind TEXT NOT NULL,
  run_id TEXT NOT NULL DEFAULT '',
  message_id TEXT NOT NULL DEFAULT '',
  PRIMARY KEY (session_key, pos)
);
""",
    ),
)

MARK_BATCH = "INSERT INTO meta (key, value) VALUES ('batch', %s) ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value"

_pg_sql: dict[str, str] = {}


def pg(sql: str) -> str:
    """The shared statement text (store.py, `?` placeholders) with psycopg's `%s` placeholders."""
    out = _pg_sql.get(sql)
    if out is None:
        out = _pg_sql[sql] = sql.replace("?", "%s")
    return out


def _table(sql: str) -> str:
    words = sql.split()
    return words[2] if words[0] in ("INSERT", "DELETE") else words[1]


def compact(batch: list[Statement]) -> list[tuple[str, list[tuple[object, ...]]]]:
    """The batch as few `executemany` groups as possible, with the same effect.

    Tables are independent (no foreign keys), so statements are grouped per table, keeping their
    order within the table. Sessions and runs are written only by full-row upserts keyed by their
    first parameter: the last one per key wins. Messages and replies are inserted, then updated
    (an update always targets a row inserted earlier), so inserts may go first. Queue entries keep
    their exact order (a position can be inserted, deleted and reused within one batch)."""
    by_table: dict[str, list[Statement]] = {}
    for st in batch:
        by_table.setdefault(_table(st[0]), []).append(st)
    groups: list[tuple[str, list[tuple[object, ...]]]] = []
    for table, sts in by_table.items():
        if table in ("sessions", "runs"):
            last: dict[object, Statement] = {}
            for st in sts:
                last.pop(st[1][0], None)
                last[st[1][0]] = st
            sts = list(last.values())
        elif table in ("messages", "replies"):
            sts = [st for st in sts if st[0].startswith("INSERT")] + [
                st for st in sts if not st[0].startswith("INSERT")
            ]
        for sql, params in sts:
            if groups and groups[-1][0] == sql:
                groups[-1][1].append(params)
            else:
                groups.append((sql, [params]))
    return groups


class Coalescer(Generic[K, V]):
    """Lookups by key gathered into one query: while a query is in flight, the keys asked for meanwhile
    wait for the next one (the read-side twin of group commit). A submit storm costs one round trip
    per batch of idempotency checks, not one pooled connection per check."""

    def __init__(self, fetch: Callable[[list[K]], Awaitable[dict[K, V]]], max_keys: int = 500) -> None:
        self._fetch = fetch
        self._max = max_keys
        self._waiting: dict[K, asyncio.Future[V | None]] = {}
        self._task: asyncio.Task[None] | None = None

    async def get(self, key: K) -> V | None:
        fut = self._waiting.get(key)
        if fut is None:
            fut = self._waiting[key] = asyncio.get_running_loop().create_future()
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._run())
        return await asyncio.shield(fut)

    async def _run(self) -> None:
        while self._waiting:
            keys = list(self._waiting)[: self._max]
            futs = {k: self._waiting.pop(k) for k in keys}
            try:
                found = await self._fetch(keys)
            except Exception as e:
                for f in futs.values():
                    if not f.done():
                        f.set_exception(e)
                        f.exception()  # retrieved here; the waiters still get it
                continue
            for k, f in futs.items():
                if not f.done():
                    f.set_result(found.get(k))


class PgQueueStore(QueueStore):
    """Queued writes committed by one writer connection (pipelined), reads on the pool."""

    backend = "postgresql"

    def __init__(self, db: Database) -> None:
        super().__init__()
        self.db = db
        self._writer: psycopg.Connection[tuple[object, ...]] | None = None
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="queue-pg-writer")
        self._reader: psycopg.AsyncConnection[tuple[object, ...]] | None = None
        self.writer_ok = True
        self._closed = False
        self._key_lookups: Coalescer[tuple[str, str], MessageRow] = Coalescer(self._messages_by_keys)

    @classmethod
    async def open(cls, db: Database) -> PgQueueStore:
        store = cls(db)
        await asyncio.get_running_loop().run_in_executor(store._thread, store._connect_writer)
        return store

    def _kwargs(self, name: str) -> dict[str, object]:
        return Database.connect_kwargs(self.db.settings, self.db.schema, self.db.timeouts, name)

    def _connect_writer(self) -> psycopg.Connection[tuple[object, ...]]:
        """(Re)connect the writer; runs in the writer thread."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._writer = psycopg.connect(**self._kwargs("flynn-queue-writer"))  # type: ignore[arg-type]
        return self._writer

    async def close(self) -> None:
        self._closed = True
        if self._writer is not None:
            self._writer.close()
        self._thread.shutdown(wait=True)
        if self._reader is not None:
            await self._reader.close()

    def check_writable(self) -> None:
        if not self.writer_ok:
            raise database_unavailable(self.db.settings, "run control's writer is waiting for the database")

    # --- commit (the writer thread) ------------------------------------------------------------

    async def _commit(self, batch: list[Statement], number: int) -> None:
        loop = asyncio.get_running_loop()
        delay = 0.05
        while True:
            try:
                await loop.run_in_executor(self._thread, self._commit_once, batch, number)
                self.writer_ok = True
                return
            except (psycopg.OperationalError, psycopg.InterfaceError) as e:
                if self._closed:
                    raise
                self.writer_ok = False
                log.warning(
                    "run-control commit failed; retrying the batch", extra={"batch": number, "error": str(e)}
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)

    def _commit_once(self, batch: list[Statement], number: int) -> None:
        """One transaction, pipelined: the statements go out without waiting, then COMMIT."""
        conn = self._writer
        if conn is None or conn.closed or conn.broken:
            conn = self._connect_writer()
            if self._applied(conn, number):
                return  # committed before the connection broke; only the answer was lost
        groups = compact(batch)
        with conn.pipeline(), conn.transaction():
            cur = conn.cursor()
            cur.execute(MARK_BATCH, (str(number),))
            for sql, rows in groups:
                if len(rows) == 1:
                    cur.execute(pg(sql), rows[0])
                else:
                    cur.executemany(pg(sql), rows)

    @staticmethod
    def _applied(conn: psycopg.Connection[tuple[object, ...]], number: int) -> bool:
        row = conn.execute("SELECT value FROM meta WHERE key = 'batch'").fetchone()
        conn.commit()
        return row is not None and int(str(row[0])) >= number

    # --- reads -------------------------------------------------------------------------------

    async def _one(self, sql: str, params: Sequence[object] = ()) -> tuple[object, ...] | None:
        async with self.db.connection() as conn:
            cur = await conn.execute(pg(sql), params)
            return await cur.fetchone()

    async def _all(self, sql: str, params: Sequence[object] = ()) -> list[tuple[object, ...]]:
        async with self.db.connection() as conn:
            cur = await conn.execute(pg(sql), params)
            return await cur.fetchall()

    async def _read_message_by_key(self, session_key: str, idempotency_key: str) -> MessageRow | None:
        return await self._key_lookups.get((session_key, idempotency_key))

    async def _messages_by_keys(self, keys: list[tuple[str, str]]) -> dict[tuple[str, str], MessageRow]:
        """One query for every idempotency key looked up while the previous query was in flight, on a
        connection of its own (the coalescer runs one query at a time)."""
        sql = pg(
            f"SELECT {MESSAGE_COLS} FROM messages WHERE (session_key, idempotency_key) IN "
            "(SELECT * FROM unnest(?::text[], ?::text[]))"
        )
        params = ([k[0] for k in keys], [k[1] for k in keys])
        try:
            if self._reader is None or self._reader.closed or self._reader.broken:
                self._reader = None
                kwargs = {**self._kwargs("flynn-queue-reader"), "autocommit": True}
                self._reader = await psycopg.AsyncConnection.connect(**kwargs)  # type: ignore[arg-type]
            cur = await self._reader.execute(sql, params)
            rows = await cur.fetchall()
        except (psycopg.OperationalError, psycopg.InterfaceError) as e:
            raise self.db.unavailable(e) from e
        found = [message_from(r) for r in rows]
        return {(m.session_key, m.idempotency_key): m for m in found}

    async def _read_message(self, message_id: str) -> MessageRow | None:
        row = await self._one(f"SELECT {MESSAGE_COLS} FROM messages WHERE message_id = ?", (message_id,))
        return message_from(row) if row else None

    async def _read_run(self, run_id: str) -> RunRow | None:
        row = await self._one(f"SELECT {RUN_COLS} FROM runs WHERE run_id = ?", (run_id,))
        return run_from(row) if row else None

    async def _read_reply(self, reply_id: str) -> ReplyRow | None:
        row = await self._one(f"SELECT {REPLY_COLS} FROM replies WHERE reply_id = ?", (reply_id,))
        return reply_from(row) if row else None

    async def _read_reply_by_key(self, session_key: str, idempotency_key: str) -> ReplyRow | None:
        sql = f"SELECT {REPLY_COLS} FROM replies WHERE session_key = ? AND idempotency_key = ?"
        row = await self._one(sql, (session_key, idempotency_key))
        return reply_from(row) if row else None

    async def max_global_seq(self) -> int:
        row = await self._one("SELECT COALESCE(MAX(global_seq), 0) FROM events")
        return int(row[0]) if row else 0  # type: ignore[call-overload]

    async def max_reply_cursor(self) -> int:
        row = await self._one("SELECT COALESCE(MAX(cursor), 0) FROM replies")
        return int(row[0]) if row else 0  # type: ignore[call-overload]

    async def sessions(self) -> list[SessionRow]:
        rows = await self._all(
            "SELECT session_key, channel, message_count, run_count, last_session_seq FROM sessions"
        )
        return [SessionRow(*r) for r in rows]  # type: ignore[arg-type]

    async def runs_in_states(self, states: tuple[int, ...]) -> list[RunRow]:
        rows = await self._all(
            f"SELECT {RUN_COLS} FROM runs WHERE state = ANY(?) ORDER BY seq", (list(states),)
        )
        return [run_from(r) for r in rows]

    async def list_runs(
        self, session_key: str, state: int, before_seq: int, limit: int
    ) -> list[tuple[int, RunRow]]:
        where, args = ["seq < ?"], [before_seq]
        if session_key:
            where.append("session_key = ?")
            args.append(session_key)  # type: ignore[arg-type]
        if state:
            where.append("state = ?")
            args.append(state)
        rows = await self._all(
            f"SELECT seq, {RUN_COLS} FROM runs WHERE {' AND '.join(where)} ORDER BY seq DESC LIMIT ?",
            (*args, limit),
        )
        return [(int(r[0]), run_from(r[1:])) for r in rows]  # type: ignore[call-overload]

    async def queue_entries(self) -> list[QueueEntryRow]:
        rows = await self._all(
            "SELECT session_key, pos, kind, run_id, message_id FROM queue_entries ORDER BY session_key, pos"
        )
        return [QueueEntryRow(*r) for r in rows]  # type: ignore[arg-type]

    async def events_after(
        self, after_seq: int, session_key: str = "", limit: int = PAGE, upto: int = 1 << 62
    ) -> list[bytes]:
        if session_key:
            rows = await self._all(
                "SELECT data FROM events WHERE session_key = ? AND global_seq > ? AND global_seq <= ? "
                "ORDER BY global_seq LIMIT ?",
                (session_key, after_seq, upto, limit),
            )
        else:
            rows = await self._all(
                "SELECT data FROM events WHERE global_seq > ? AND global_seq <= ? ORDER BY global_seq LIMIT ?",
                (after_seq, upto, limit),
            )
        return [bytes(r[0]) for r in rows]  # type: ignore[call-overload]

    async def replies_after(self, after_cursor: int, limit: int = PAGE, upto: int = 1 << 62) -> list[bytes]:
        rows = await self._all(
            "SELECT data FROM replies WHERE cursor IS NOT NULL AND cursor > ? AND cursor <= ? ORDER BY cursor LIMIT ?",
            (after_cursor, upto, limit),
        )
        return [bytes(r[0]) for r in rows]  # type: ignore[call-overload]

    async def pending_speech(self) -> list[ReplyRow]:
        rows = await self._all(
            f"SELECT {REPLY_COLS} FROM replies WHERE speech_state = 'pending' ORDER BY seq"
        )
        return [reply_from(r) for r in rows]
