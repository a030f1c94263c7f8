"""Run control's PostgreSQL store (schema `flynn_queue`), with the same guarantees as the SQLite one.

Design (issue 13's design point). Run control keeps its synchronous critical section: an operation
mutates memory and queues its writes, and nothing awaits inside it, so the per-session invariants
(one active run, one terminal event, one final, gapless sequence numbers) stay the property of one
loop turn and need no locks in the database. The commit is handed to ONE dedicated writer connection
in its own thread that sends each batch as ONE simple-query message (`batch_text`: the statements with
their parameters bound client-side, the events of a batch in one multi-row INSERT), which the server
runs as one implicit transaction: a batch costs one network round trip plus the server's WAL flush,
whatever its size, and once sent nothing of it waits for this process (its statements are PREPAREd
once per connection and sent as EXECUTE, so the server plans each once); while it is in flight the next
batch fills (group commit). (It was a pipeline of prepared statements; but a pipeline is sent
statement by statement as the thread produces them, so the server held the `seqs` row lock that
orders every replica's commits, below, while a writer thread starved of CPU or of its GIL sent the
rest: on 2 busy cores that stretched every replica's commits behind it.) Acknowledgements wait for that COMMIT, exactly
as they wait for the fsync on SQLite. The thread matters: measured in-process with 32 callers, the
threaded writer sustained 445-580 msg/s where the same writer as an async connection on the event
loop managed 198 (plain) to 303 (pipelined), its round trips waiting behind the busy loop. The
alternative design (asynchronous operations with per-session serialization, a transaction each)
would pay a round trip per operation instead of per batch and need row locks to keep the invariants.

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

Several replicas (replica.py) share this schema. Each batch's transaction starts with the lease
fence of the sessions it writes (flynn_runtime/leases.py: refused as a whole, SQLSTATE LF409, when an
epoch is stale), writes the tables that carry no numbers, then takes its event numbers and reply
cursors from the `seqs` counter row (held until COMMIT, so all replicas commit in number order) and
writes the numbered rows last, so that lock is held as briefly as the transaction allows. The rows
carry provisional numbers and the statements add the batch's base themselves (`NUMBERED`: the column,
and the serialized RunEvent / Reply with the final number appended, a protobuf singular field's last
value winning), so the batch still costs one round trip. Each writer marks its batches under its own `meta` key, and NOTIFY
flynn_queue wakes the other replicas' stream tailers (tail.py).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Generic, NamedTuple, TypeVar

import psycopg

from flynn_runtime import leases, replica_registry
from flynn_runtime.database import Database, database_unavailable
from flynn_runtime.db_copy import Counts, SqliteSource, StoreCopier, Table, export_tables, import_tables
from flynn_runtime.pg_migrations import Migration
from flynn_runtime.sqlite_db import open_db
from queue_svc.store import (
    INSERT_EVENT,
    INSERT_MESSAGE,
    INSERT_REPLY,
    MESSAGE_COLS,
    PAGE,
    REPLY_COLS,
    RUN_COLS,
    UPDATE_REPLY,
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
    provisional_spans,
    reply_from,
    run_from,
    table_of,
)
from queue_svc.store_sqlite import SCHEMA as SQLITE_SCHEMA

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
  seq BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
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
  seq BIGINT GENERATED BY DEFAULT AS IDENTITY,
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
    Migration(
        2,
        "run control on several replicas: session leases with fencing epochs, database-wide sequences",
        leases.MIGRATION_SQL
        + """
CREATE TABLE seqs (
  id INTEGER PRIMARY KEY CHECK (id = 1),
  gseq BIGINT NOT NULL,        -- last event number handed out
  cursor BIGINT NOT NULL,      -- last reply cursor handed out
  g_base BIGINT NOT NULL DEFAULT 0,  -- the current batch's event offset (final = provisional + g_base)
  c_base BIGINT NOT NULL DEFAULT 0   -- the current batch's cursor offset
);
INSERT INTO seqs (id, gseq, cursor) VALUES (1, (SELECT COALESCE(MAX(global_seq), 0) FROM events),
                                            (SELECT COALESCE(MAX(cursor), 0) FROM replies));
-- Protobuf encodings appended to a serialized message: for a singular field the last value read
-- wins, so `data || pb_event_numbers(n)` is the event with global_seq = n, event_id = 'evt_' || n.
CREATE FUNCTION pb_varint(v BIGINT) RETURNS BYTEA LANGUAGE plpgsql IMMUTABLE STRICT AS $$
DECLARE out BYTEA := ''::bytea;
BEGIN
  LOOP
    IF v < 128 THEN
      RETURN out || set_byte('\\x00'::bytea, 0, v::int);
    END IF;
    out := out || set_byte('\\x00'::bytea, 0, ((v & 127) | 128)::int);
    v := v >> 7;
  END LOOP;
END $$;
CREATE FUNCTION pb_event_numbers(n BIGINT) RETURNS BYTEA LANGUAGE sql IMMUTABLE STRICT AS $$
  SELECT '\\x08'::bytea || pb_varint(n) || '\\x1a'::bytea
         || set_byte('\\x00'::bytea, 0, octet_length('evt_' || n)) || convert_to('evt_' || n, 'UTF8')
$$;
CREATE FUNCTION pb_reply_cursor(n BIGINT) RETURNS BYTEA LANGUAGE sql IMMUTABLE STRICT AS $$
  SELECT '\\x10'::bytea || pb_varint(n)
$$;
DELETE FROM meta WHERE key = 'batch';
""",
    ),
    Migration(
        3,
        "unfinished runs by session (loading a session reads only its unfinished runs, not its history)",
        # States 1, 2, 3: queued, started, cancel requested (RunState). The index holds only the runs
        # not yet finished, so it stays small however long the history of runs grows.
        "CREATE INDEX runs_unfinished ON runs (session_key, seq) WHERE state IN (1, 2, 3);",
    ),
    Migration(4, "every replica as it knows itself, with a heartbeat", replica_registry.MIGRATION_SQL),
)

#: RunStates of the runs_unfinished index (migration 3).
UNFINISHED = frozenset({1, 2, 3})

_pg_sql: dict[str, str] = {}


def pg(sql: str) -> str:
    """The shared statement text (store.py, `?` placeholders) with psycopg's `%s` placeholders."""
    out = _pg_sql.get(sql)
    if out is None:
        out = _pg_sql[sql] = sql.replace("?", "%s")
    return out


#: Each writer process marks its last batch under its own key (several replicas write at once).
MARK_BATCH = (
    "INSERT INTO meta (key, value) SELECT %s, %s || ':' || s.g_base || ':' || s.c_base FROM seqs s WHERE s.id = 1 "
    "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value"
)
#: Takes the database-wide numbers for a batch's events and replies: the batch's provisional numbers
#: p (handed out in memory, contiguous within the batch) become p + g_base (events) and p + c_base
#: (cursors), computed by the statements themselves (NUMBERED below), so no round trip waits for
#: them. The row lock it takes is held until COMMIT, so batches of all replicas commit in the order
#: of their numbers: a reader that sees number n committed has seen every number below it.
TAKE_NUMBERS = (
    "UPDATE seqs SET g_base = gseq - %s, c_base = cursor - %s, gseq = gseq + %s, cursor = cursor + %s "
    "WHERE id = 1 RETURNING g_base, c_base"
)
_BASES = "(SELECT g_base FROM seqs WHERE id = 1)", "(SELECT c_base FROM seqs WHERE id = 1)"
#: The statements that carry numbers, as run in a numbered batch: (SQL, how to reorder the params).
NUMBERED: dict[str, tuple[str, Callable[[tuple[object, ...]], tuple[object, ...]]]] = {
    INSERT_EVENT: (
        "INSERT INTO events (global_seq, session_key, session_seq, type, data) "
        "SELECT %s + s.g_base, %s, %s, %s, %s || pb_event_numbers(%s + s.g_base) FROM seqs s WHERE s.id = 1",
        lambda p: (p[0], p[1], p[2], p[3], p[4], p[0]),
    ),
    INSERT_MESSAGE: (
        pg(INSERT_MESSAGE).replace(
            "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
            f"VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s + {_BASES[0]}, %s, %s)",
        ),
        lambda p: p,
    ),
    INSERT_REPLY: (
        "INSERT INTO replies (reply_id, cursor, kind, run_id, session_key, channel, idempotency_key, "
        "speech_state, data) SELECT %s, %s + s.c_base, %s, %s, %s, %s, %s, %s, "
        "%s || COALESCE(pb_reply_cursor(%s + s.c_base), ''::bytea) FROM seqs s WHERE s.id = 1 "
        "ON CONFLICT DO NOTHING",
        lambda p: (*p[:8], p[8], p[1]),
    ),
    UPDATE_REPLY: (
        "UPDATE replies r SET cursor = %s + s.c_base, speech_state = %s, "
        "data = %s || COALESCE(pb_reply_cursor(%s + s.c_base), ''::bytea) FROM seqs s "
        "WHERE s.id = 1 AND r.reply_id = %s",
        lambda p: (p[0], p[1], p[2], p[0], p[3]),
    ),
}
#: Wakes the other replicas' stream tailers at COMMIT (a wake-up only: they read the tables).
NOTIFY = "SELECT pg_notify('flynn_queue', %s)"
CHANNEL = "flynn_queue"
#: The lease scope of run-control sessions (flynn_runtime/leases.py).
SESSION_SCOPE = "session"


#: Several events of a batch inserted by one statement (the bulk of a batch: streamed output).
INSERT_EVENTS = (
    "INSERT INTO events (global_seq, session_key, session_seq, type, data) "
    "SELECT v.g + s.g_base, v.k, v.q, v.t, v.d || pb_event_numbers(v.g + s.g_base) "
    "FROM (VALUES {rows}) AS v(g, k, q, t, d), seqs s WHERE s.id = 1"
)
EVENT_ROW = "(%s::bigint, %s::text, %s::bigint, %s::integer, %s::bytea)"
#: The tables whose statements carry the batch's numbers: written after TAKE_NUMBERS, the others before.
NUMBERED_TABLES = frozenset(table_of(sql) for sql in NUMBERED)


class Group(NamedTuple):
    """A compacted statement group as the writer sends it (numbered statements add the batch's base)."""

    sql: str  # PostgreSQL text (%s placeholders)
    rows: list[tuple[object, ...]]
    numbered: bool  # of a table that carries numbers: goes after TAKE_NUMBERS
    events: bool  # INSERT_EVENT: all rows in one statement


def _pg_group(sql: str, rows: list[tuple[object, ...]]) -> Group:
    numbered = NUMBERED.get(sql)
    if numbered is None:
        return Group(pg(sql), rows, table_of(sql) in NUMBERED_TABLES, False)
    sql_pg, reorder = numbered
    if sql == INSERT_EVENT:
        return Group(sql_pg, rows, True, True)
    return Group(sql_pg, [reorder(r) for r in rows], True, False)


def preparable(sql: str) -> bool:
    """Whether PREPARE can infer every parameter's type of this statement from its columns (VALUES,
    SET, WHERE); an INSERT … SELECT's select list cannot (its parameters would be read as text)."""
    return "VALUES (" in sql or not sql.startswith("INSERT")


def dollar(sql: str) -> str:
    """A statement's `%s` placeholders as PREPARE's `$1`, `$2`, …"""
    pieces = sql.split("%s")
    return pieces[0] + "".join(f"${i}{piece}" for i, piece in enumerate(pieces[1:], start=1))


def batch_text(cur: psycopg.ClientCursor[tuple[object, ...]], fence: tuple[str, tuple[object, ...]] | None,
               groups: list[Group], take: tuple[object, ...], mark: tuple[object, ...],
               notify: tuple[object, ...] | None, prepared: dict[str, str]) -> tuple[str, int]:  # fmt: skip
    """The whole batch as ONE simple-query message (parameters bound here, client-side), run by the
    server as one implicit transaction: the fence, the statements of the tables without numbers, then
    TAKE_NUMBERS, the numbered statements, NOTIFY. The server then holds the `seqs` row lock (which
    orders every replica's commits) only while it runs the numbered part and flushes the COMMIT: never
    while this process, maybe descheduled or waiting for its GIL, sends the rest of a pipeline.
    A statement `prepared` names (PREPAREd on this connection before) is sent as `EXECUTE name(…)`, so
    the server plans it once per connection, as it did the pipeline's prepared statements.
    Returns the text and the index of TAKE_NUMBERS' result among the statements' results."""
    parts: list[str] = []
    take_at = 0
    if fence is not None:
        parts.append(cur.mogrify(*fence))
    for numbered_part in (False, True):
        if numbered_part:
            take_at = len(parts)
            parts.append(cur.mogrify(TAKE_NUMBERS, take))
            parts.append(cur.mogrify(MARK_BATCH, mark))
        for g in groups:
            if g.numbered != numbered_part:
                continue
            if g.events:
                rows = ", ".join(cur.mogrify(EVENT_ROW, r) for r in g.rows)
                parts.append(INSERT_EVENTS.format(rows=rows))
            elif g.sql in prepared:
                name = prepared[g.sql]
                for r in g.rows:
                    parts.append(f"EXECUTE {name}({cur.mogrify(', '.join(['%s'] * len(r)), r)})")
            else:
                parts.extend(cur.mogrify(g.sql, r) for r in g.rows)
    if notify is not None:
        parts.append(cur.mogrify(NOTIFY, notify))
    return ";\n".join(parts), take_at


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
        self._writer: psycopg.Connection[Row] | None = None
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="queue-pg-writer")
        self._reader: psycopg.AsyncConnection[Row] | None = None
        self.writer_ok = True
        self._closed = False
        #: Tags this process's batch numbers in `meta` (numbers restart at 1 in every process).
        self._writer_id = secrets.token_hex(8)
        self._key_lookups: Coalescer[tuple[str, str], MessageRow] = Coalescer(self._messages_by_keys)
        #: The lease holder whose epochs fence every batch (run control's replica id); "" = unfenced.
        self.holder = ""
        #: With leases: the server ends the writer's session when it sits inside a transaction this
        #: long (a frozen process), so the FOR SHARE locks of its fence never keep a takeover waiting.
        self.idle_in_transaction_ms = 0
        self._tuned_ms = 0
        #: Statements PREPAREd on the current writer connection: {PostgreSQL text: name}.
        self._prepared: dict[str, str] = {}
        self._session_lookups: Coalescer[str, SessionRow] = Coalescer(self._sessions_by_keys)

    @classmethod
    async def open(cls, db: Database) -> PgQueueStore:
        store = cls(db)
        await asyncio.get_running_loop().run_in_executor(store._thread, store._connect_writer)
        # Numbers continue past anything imported (flynn db import) after the counters were made.
        async with db.transaction() as conn:
            await conn.execute(
                "UPDATE seqs SET gseq = GREATEST(gseq, (SELECT COALESCE(MAX(global_seq), 0) FROM events)), "
                "cursor = GREATEST(cursor, (SELECT COALESCE(MAX(cursor), 0) FROM replies)) WHERE id = 1"
            )
        return store

    def _conninfo(self, name: str) -> str:
        return Database.conninfo(self.db.settings, self.db.schema, self.db.timeouts, name)

    def _connect_writer(self) -> psycopg.Connection[Row]:
        """(Re)connect the writer; runs in the writer thread."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        # Autocommit: each batch is one multi-statement message, which the server runs as one
        # implicit transaction (committed at its end, rolled back whole on an error).
        self._writer = psycopg.connect(self._conninfo("flynn-queue-writer"), autocommit=True)
        return self._writer

    async def close(self) -> None:
        self._closed = True
        if self._writer is not None:
            self._writer.close()
        self._thread.shutdown(wait=True)
        if self._reader is not None:
            await self._reader.close()

    @property
    def writer_id(self) -> str:
        """This process's writer (the payload of its NOTIFY wake-ups)."""
        return self._writer_id

    def check_writable(self) -> None:
        if not self.writer_ok:
            raise database_unavailable(self.db.settings, "run control's writer is waiting for the database")

    # --- commit (the writer thread) ------------------------------------------------------------

    async def _commit(
        self, batch: list[Statement], number: int, epochs: dict[str, int], on_durable: Callable[[], None]
    ) -> None:
        delay = 0.05
        # Prepared on the loop: the writer thread needs the GIL (which the busy loop holds) as little
        # as it can, each time it wants it back costing up to a switch interval.
        groups = [_pg_group(sql, rows) for sql, rows in compact(batch)]
        spans = provisional_spans(batch)

        def committed(offsets: tuple[int, int]) -> None:
            self.offsets = offsets
            self.writer_ok = True
            on_durable()

        while True:
            try:
                await in_thread(
                    self._thread, lambda: self._commit_once(groups, spans, number, epochs), committed
                )
                return
            except psycopg.DatabaseError as e:
                stale = leases.stale_from(e, SESSION_SCOPE)
                if stale is not None:
                    self.writer_ok = True
                    raise stale from None
                if not isinstance(e, psycopg.OperationalError):
                    raise
                if self._closed:
                    raise
                self.writer_ok = False
                log.warning(
                    "run-control commit failed; retrying the batch", extra={"batch": number, "error": str(e)}
                )
            except psycopg.InterfaceError as e:
                if self._closed:
                    raise
                self.writer_ok = False
                log.warning(
                    "run-control commit failed; retrying the batch", extra={"batch": number, "error": str(e)}
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)

    def _commit_once(
        self,
        groups: list[Group],
        spans: tuple[tuple[int, int] | None, tuple[int, int] | None],
        number: int,
        epochs: dict[str, int],
    ) -> tuple[int, int]:
        """One transaction, sent as one message (batch_text): one round trip plus the WAL flush, and
        nothing of it waits for this process once sent. Returns the offsets the database added to the
        batch's provisional event numbers and reply cursors."""
        conn = self._writer
        g_span, c_span = spans
        if conn is None or conn.closed or conn.broken:
            conn = self._connect_writer()
            self._tuned_ms = 0
            self._prepared = {}
            applied = self._applied(conn, number)
            if applied is not None:
                return applied  # committed before the connection broke; only the answer was lost
        if self._tuned_ms != self.idle_in_transaction_ms:
            conn.execute(
                "SELECT set_config('idle_in_transaction_session_timeout', %s, false)",
                (str(self.idle_in_transaction_ms),),
            )
            self._tuned_ms = self.idle_in_transaction_ms
        for g in groups:  # a statement new on this connection: planned once, before the batch is sent
            if not g.events and g.sql not in self._prepared and preparable(g.sql):
                name = f"flynn_q{len(self._prepared)}"
                conn.execute(f"PREPARE {name} AS {dollar(g.sql)}".encode(conn.info.encoding))
                self._prepared[g.sql] = name
        g_first, g_last = g_span or (1, 0)
        c_first, c_last = c_span or (1, 0)
        cur = psycopg.ClientCursor(conn)
        text, take_at = batch_text(
            cur,
            leases.fence(SESSION_SCOPE, self.holder, epochs) if self.holder and epochs else None,
            groups,
            (g_first - 1, c_first - 1, g_last - g_first + 1, c_last - c_first + 1),
            (f"batch:{self._writer_id}", str(number)),
            (self._writer_id,) if g_span or c_span else None,
            self._prepared,
        )
        cur.execute(text.encode(conn.info.encoding))
        for _ in range(take_at):
            cur.nextset()  # to TAKE_NUMBERS' result
        row = cur.fetchone()
        assert row is not None
        g_off = int(row[0]) if g_span else 0
        c_off = int(row[1]) if c_span else 0
        return g_off, c_off

    def _applied(self, conn: psycopg.Connection[Row], number: int) -> tuple[int, int] | None:
        """The offsets of batch `number` of this process when it is committed (its COMMIT's answer was
        lost), else None."""
        row = conn.execute("SELECT value FROM meta WHERE key = %s", (f"batch:{self._writer_id}",)).fetchone()
        conn.commit()
        if row is None:
            return None
        last, g_off, c_off = (int(x) for x in str(row[0]).split(":"))
        return (g_off, c_off) if last >= number else None

    # --- reads -------------------------------------------------------------------------------

    async def _one(self, sql: str, params: Sequence[object] = ()) -> Row | None:
        async with self.db.connection() as conn:
            cur = await conn.execute(pg(sql), params)
            return await cur.fetchone()

    async def _all(self, sql: str, params: Sequence[object] = ()) -> list[Row]:
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
        rows = await self._hot_read(sql, ([k[0] for k in keys], [k[1] for k in keys]))
        found = [message_from(r) for r in rows]
        return {(m.session_key, m.idempotency_key): m for m in found}

    async def _hot_read(self, sql: str, params: Sequence[object]) -> list[Row]:
        """A query of the submit path on the store's own reader connection (no pool checkout)."""
        try:
            if self._reader is None or self._reader.closed or self._reader.broken:
                self._reader = None
                self._reader = await psycopg.AsyncConnection.connect(
                    self._conninfo("flynn-queue-reader"), autocommit=True
                )
            cur = await self._reader.execute(sql, params)
            return await cur.fetchall()
        except (psycopg.OperationalError, psycopg.InterfaceError) as e:
            raise self.db.unavailable(e) from e

    async def _sessions_by_keys(self, keys: list[str]) -> dict[str, SessionRow]:
        """Sessions loaded back into memory, several callers' in one query."""
        rows = await self._hot_read(
            pg("SELECT session_key, channel, message_count, run_count, last_session_seq FROM sessions "
               "WHERE session_key = ANY(?)"),
            (keys,),
        )  # fmt: skip
        return {str(r[0]): SessionRow(*r) for r in rows}

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
        # `<> ''` (every PostReply has a key) lets the partial index reply_idempotency serve it (no scan).
        sql = f"SELECT {REPLY_COLS} FROM replies WHERE session_key = ? AND idempotency_key = ? AND idempotency_key <> ''"
        row = await self._one(sql, (session_key, idempotency_key))
        return reply_from(row) if row else None

    async def max_global_seq(self) -> int:
        row = await self._one("SELECT COALESCE(MAX(global_seq), 0) FROM events")
        return int(row[0]) if row else 0

    async def max_reply_cursor(self) -> int:
        row = await self._one("SELECT COALESCE(MAX(cursor), 0) FROM replies")
        return int(row[0]) if row else 0

    async def heads(self) -> tuple[int, int]:
        """The last event number and reply cursor committed by any replica, in one query."""
        row = await self._one(
            "SELECT (SELECT COALESCE(MAX(global_seq), 0) FROM events), (SELECT COALESCE(MAX(cursor), 0) FROM replies)"
        )
        return (int(row[0]), int(row[1])) if row else (0, 0)

    async def sessions_per_channel(self) -> dict[str, int]:
        rows = await self._all("SELECT channel, COUNT(*) FROM sessions GROUP BY channel")
        return {str(r[0]): int(r[1]) for r in rows}

    async def busy_sessions(self) -> list[SessionRow]:
        rows = await self._all(
            "SELECT session_key, channel, message_count, run_count, last_session_seq FROM sessions WHERE session_key IN "
            "(SELECT session_key FROM runs WHERE state IN (1, 2, 3) UNION SELECT session_key FROM queue_entries)"
        )
        return [SessionRow(*r) for r in rows]

    async def _read_session(self, session_key: str) -> SessionRow | None:
        return await self._session_lookups.get(session_key)

    async def runs_in_states(self, states: tuple[int, ...], session_key: str | None = None) -> list[RunRow]:
        if session_key is None:
            rows = await self._all(
                f"SELECT {RUN_COLS} FROM runs WHERE state = ANY(?) ORDER BY seq", (list(states),)
            )
        elif UNFINISHED.issuperset(states):
            # The literal IN lets every plan (generic ones too) use runs_unfinished (migration 3).
            rows = await self._all(
                f"SELECT {RUN_COLS} FROM runs WHERE state IN (1, 2, 3) AND state = ANY(?) AND session_key = ? "
                "ORDER BY seq",
                (list(states), session_key),
            )
        else:
            rows = await self._all(
                f"SELECT {RUN_COLS} FROM runs WHERE state = ANY(?) AND session_key = ? ORDER BY seq",
                (list(states), session_key),
            )
        return [run_from(r) for r in rows]

    async def session_busy(self, session_key: str) -> bool:
        """Whether a stored session has anything to recover when it is loaded (an unfinished run, a
        queue entry, a reply awaiting speech): one query, each part an index probe."""
        row = await self._one(
            "SELECT EXISTS (SELECT 1 FROM runs WHERE state IN (1, 2, 3) AND session_key = ?)"
            " OR EXISTS (SELECT 1 FROM queue_entries WHERE session_key = ?)"
            " OR EXISTS (SELECT 1 FROM replies WHERE speech_state = 'pending' AND session_key = ?)",
            (session_key, session_key, session_key),
        )
        return bool(row and row[0])

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
        rows = await self._all(
            f"SELECT seq, {RUN_COLS} FROM runs WHERE {' AND '.join(where)} ORDER BY seq DESC LIMIT ?",
            (*args, limit),
        )
        return [(int(r[0]), run_from(r[1:])) for r in rows]

    async def queue_entries(self, session_key: str | None = None) -> list[QueueEntryRow]:
        if session_key is None:
            rows = await self._all(
                "SELECT session_key, pos, kind, run_id, message_id FROM queue_entries ORDER BY session_key, pos"
            )
        else:
            rows = await self._all(
                "SELECT session_key, pos, kind, run_id, message_id FROM queue_entries WHERE session_key = ? "
                "ORDER BY pos",
                (session_key,),
            )
        return [QueueEntryRow(*r) for r in rows]

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
        return [bytes(r[0]) for r in rows]

    async def replies_after(self, after_cursor: int, limit: int = PAGE, upto: int = 1 << 62) -> list[bytes]:
        rows = await self._all(
            "SELECT data FROM replies WHERE cursor IS NOT NULL AND cursor > ? AND cursor <= ? ORDER BY cursor LIMIT ?",
            (after_cursor, upto, limit),
        )
        return [bytes(r[0]) for r in rows]

    async def pending_speech(self, session_key: str | None = None) -> list[ReplyRow]:
        if session_key is None:
            rows = await self._all(
                f"SELECT {REPLY_COLS} FROM replies WHERE speech_state = 'pending' ORDER BY seq"
            )
        else:
            rows = await self._all(
                f"SELECT {REPLY_COLS} FROM replies WHERE speech_state = 'pending' AND session_key = ? ORDER BY seq",
                (session_key,),
            )
        return [reply_from(r) for r in rows]


# --- flynn db import / export ---------------------------------------------------------------------

_SQLITE_FILE = "queue/run_control.db"
_TABLES = (
    Table("sessions", ("session_key", "channel", "message_count", "run_count", "last_session_seq")),
    Table("messages", tuple(c.strip() for c in MESSAGE_COLS.split(","))),
    Table("runs", ("seq", *(c.strip() for c in RUN_COLS.split(","))), serial="seq"),
    Table("events", ("global_seq", "session_key", "session_seq", "type", "data")),
    Table(
        "replies",
        ("seq", *(c.strip() for c in REPLY_COLS.split(","))),
        serial="seq",
        sqlite_exprs=(("seq", "rowid"),),
    ),  # fmt: skip
    Table("queue_entries", ("session_key", "pos", "kind", "run_id", "message_id")),
)


async def import_sqlite(src: SqliteSource, db: Database) -> Counts:
    """Copy run control's SQLite file into the (empty) flynn_queue schema, ids and sequences kept."""
    with src.open(_SQLITE_FILE) as lite:
        return await import_tables(lite, db, _TABLES)


async def export_sqlite(db: Database, dest: Path) -> Counts:
    """Write run control's PostgreSQL state into a new SQLite file under `dest`."""
    lite = open_db(dest / _SQLITE_FILE, schema=SQLITE_SCHEMA)
    try:
        return await export_tables(db, lite, _TABLES)
    finally:
        lite.close()


COPIER = StoreCopier(
    service="queue",
    schema=SCHEMA,
    migrations=MIGRATIONS,
    sqlite_files=(_SQLITE_FILE,),
    import_sqlite=import_sqlite,
    export_sqlite=export_sqlite,
    nonempty_query="SELECT (SELECT count(*) FROM sessions) + (SELECT count(*) FROM events)",
)
