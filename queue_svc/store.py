"""Run control's durable state: the rows, and the store both backends share (SQLite, PostgreSQL).

A store has three parts:

- queued writes: every write of an operation is queued (in order) by the event-loop thread, inside the
  operation's critical section, and made durable by `flush()` as ONE transaction (group commit); the
  SQL is the same for both backends (parameters only, never values in the text);
- overlays: the queued rows a read must not miss (idempotency lookups, runs, replies), tagged with
  their batch, kept until that batch is durable AND no read that started before it is still running
  (so an asynchronous read plus the overlay always sees every write, committed or queued);
- reads: asynchronous, done before an operation enters its critical section (never inside it), each
  answered from the overlay first.

The backends implement `_commit` (one transaction) and the `_read_*` queries: store_sqlite.py (one
file, WAL, fsync per batch) and store_pg.py (a dedicated writer connection, pooled readers).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, TypeAlias, TypeVar

from flynn.v1 import config_pb2
from flynn.v1 import run_control_pb2 as pb

from flynn_runtime.leases import StaleEpoch
from queue_svc import metrics

log = logging.getLogger(__name__)

PAGE = 500

RunState: TypeAlias = pb.RunState.ValueType
QueueMode: TypeAlias = config_pb2.QueueMode.ValueType
Disposition: TypeAlias = pb.Disposition.ValueType
ReplyKind: TypeAlias = pb.ReplyKind.ValueType


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
    state: RunState
    mode: QueueMode
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
    mode: QueueMode
    disposition: Disposition
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
    kind: ReplyKind
    run_id: str
    session_key: str
    channel: str
    idempotency_key: str
    speech_state: str  # "none" | "pending" | "done"
    data: bytes


RUN_COLS = (
    "run_id, session_key, channel, state, mode, inputs, steered, error_kind, error_message, output, "
    "final_reply_id, create_time, start_time, cancel_request_time, end_time, attempt, cancel_reason, causation"
)


def run_from(row: Sequence[Any]) -> RunRow:
    """A RunRow from the columns of RUN_COLS, in order."""
    r = tuple(row)
    return RunRow(
        run_id=str(r[0]),
        session_key=str(r[1]),
        channel=str(r[2]),
        state=RunState(int(r[3])),
        mode=QueueMode(int(r[4])),
        inputs=[InputRow.from_json(d) for d in json.loads(str(r[5]))],
        steered=list(json.loads(str(r[6]))),
        error_kind=str(r[7]),
        error_message=str(r[8]),
        output=str(r[9]),
        final_reply_id=str(r[10]),
        create_time=float(r[11]),
        start_time=None if r[12] is None else float(r[12]),
        cancel_request_time=None if r[13] is None else float(r[13]),
        end_time=None if r[14] is None else float(r[14]),
        attempt=int(r[15]),
        cancel_reason=str(r[16]),
        causation=bytes(r[17]),
    )


K = TypeVar("K")
V = TypeVar("V")

Statement = tuple[str, tuple[object, ...]]
#: A row as the database driver returns it: its values are typed by the schema, not by the driver.
Row: TypeAlias = tuple[Any, ...]

UPSERT_SESSION = (
    "INSERT INTO sessions (session_key, channel, message_count, run_count, last_session_seq) "
    "VALUES (?, ?, ?, ?, ?) ON CONFLICT (session_key) DO UPDATE SET channel=excluded.channel, "
    "message_count=excluded.message_count, run_count=excluded.run_count, "
    "last_session_seq=excluded.last_session_seq"
)
INSERT_MESSAGE = (
    "INSERT INTO messages (message_id, session_key, idempotency_key, channel, sender, text, mode, "
    "disposition, run_id, interrupted_run_id, effective_mode, event_seq, receive_time, causation) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
UPSERT_RUN = (
    f"INSERT INTO runs ({RUN_COLS}) VALUES ({', '.join('?' * 18)}) ON CONFLICT (run_id) DO UPDATE SET "
    "state=excluded.state, inputs=excluded.inputs, steered=excluded.steered, "
    "error_kind=excluded.error_kind, error_message=excluded.error_message, output=excluded.output, "
    "final_reply_id=excluded.final_reply_id, start_time=excluded.start_time, "
    "cancel_request_time=excluded.cancel_request_time, end_time=excluded.end_time, "
    "attempt=excluded.attempt, cancel_reason=excluded.cancel_reason"
)
INSERT_REPLY = (
    "INSERT INTO replies (reply_id, cursor, kind, run_id, session_key, channel, idempotency_key, speech_state, "
    "data) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING"
)
MESSAGE_COLS = (
    "message_id, session_key, idempotency_key, channel, sender, text, mode, disposition, run_id, "
    "interrupted_run_id, effective_mode, event_seq, receive_time, causation"
)
REPLY_COLS = "reply_id, cursor, kind, run_id, session_key, channel, idempotency_key, speech_state, data"


def message_from(r: Sequence[Any]) -> MessageRow:
    m = MessageRow(*r)
    m.effective_mode, m.causation = bytes(m.effective_mode), bytes(m.causation)
    return m


def reply_from(r: Sequence[Any]) -> ReplyRow:
    row = ReplyRow(*r)
    row.data = bytes(row.data)
    return row


def table_of(sql: str) -> str:
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
        by_table.setdefault(table_of(st[0]), []).append(st)
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


INSERT_EVENT = "INSERT INTO events (global_seq, session_key, session_seq, type, data) VALUES (?, ?, ?, ?, ?)"
UPDATE_REPLY = "UPDATE replies SET cursor = ?, speech_state = ?, data = ? WHERE reply_id = ?"


def provisional_spans(batch: list[Statement]) -> tuple[tuple[int, int] | None, tuple[int, int] | None]:
    """(first, last) of the provisional event numbers and reply cursors a batch uses (None: none)."""
    seqs: list[int] = []
    cursors: list[int] = []
    for sql, params in batch:
        if sql == INSERT_EVENT:
            seqs.append(_number(params[0]))
        elif sql == INSERT_REPLY and params[1] is not None:
            cursors.append(_number(params[1]))
        elif sql == UPDATE_REPLY and params[0] is not None:
            cursors.append(_number(params[0]))
    return (
        (min(seqs), max(seqs)) if seqs else None,
        (min(cursors), max(cursors)) if cursors else None,
    )


def _number(value: object) -> int:
    """A sequence number or cursor of a queued statement (the ledger writes them as ints)."""
    assert isinstance(value, int), value
    return value


def _nothing() -> None:
    pass


R = TypeVar("R")


async def in_thread(pool: Executor, fn: Callable[[], R], then: Callable[[R], None]) -> R:
    """`fn()` on the writer's thread; `then(result)` runs on the loop thread in the callback that
    receives the result, so whatever waits on it is woken in that loop turn. (`run_in_executor`
    resumes its awaiting coroutine one turn later, and a caller behind a shared, shielded future two
    turns after that: on a busy loop each turn is a queue of other callbacks.)"""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[R] = loop.create_future()

    def settle(result: R) -> None:
        if fut.cancelled():
            return
        try:
            then(result)  # first: the callers it wakes run before the coroutine
        except Exception:
            log.exception("post-commit callback failed")
        fut.set_result(result)

    def fail(error: BaseException) -> None:
        if not fut.cancelled():
            fut.set_exception(error)

    def work() -> None:
        try:
            result = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the awaiting coroutine
            loop.call_soon_threadsafe(fail, e)
            return
        loop.call_soon_threadsafe(settle, result)

    pool.submit(work)
    return await fut


def _expire(overlay: dict[K, tuple[int, V]], number: int) -> None:
    """Drop overlay rows whose batch (`number` or earlier) may now be read from the database."""
    for k in [k for k, (n, _) in overlay.items() if n <= number]:
        del overlay[k]


def _drop(overlay: dict[K, tuple[int, V]], number: int) -> None:
    """Drop the overlay rows of batch `number` exactly (it was refused)."""
    for k in [k for k, (n, _) in overlay.items() if n == number]:
        del overlay[k]


class QueueStore:
    """Queued writes with group commit, overlays, and asynchronous reads (see the module docstring)."""

    backend = "none"

    def __init__(self) -> None:
        self._pending: list[Statement] = []
        self._batch = 1  # number of the batch now being filled
        self._durable = 0  # number of the last durable batch
        self._reads: dict[int, int] = {}  # durable batch number at a running read's start -> count
        self._msg_by_key: dict[tuple[str, str], tuple[int, MessageRow]] = {}
        self._msg_by_id: dict[str, tuple[int, MessageRow]] = {}
        self._msg_run: dict[str, tuple[int, str]] = {}
        self._runs: dict[str, tuple[int, RunRow]] = {}
        self._replies: dict[str, tuple[int, ReplyRow]] = {}
        self._reply_keys: dict[tuple[str, str], tuple[int, ReplyRow]] = {}
        self._finals: dict[str, tuple[int, bool]] = {}
        self._session_rows: dict[str, tuple[int, SessionRow]] = {}
        #: Fencing (several replicas, store_pg.py): the owner epoch of each session a queued write
        #: touches, taken when the write is queued; `epoch_of` is set by run control's ownership.
        self.epoch_of: Callable[[str], int] | None = None
        self._pending_epochs: dict[str, int] = {}
        #: (event offset, cursor offset) the last commit added to the provisional numbers of its
        #: batch (store_pg.py numbers events and replies in the database; SQLite keeps them: 0, 0).
        self.offsets: tuple[int, int] = (0, 0)

    async def close(self) -> None:
        """Release connections and threads."""

    def check_writable(self) -> None:
        """Raise UNAVAILABLE when a new write could not be made durable now (the database is away)."""

    # --- batching ------------------------------------------------------------------------------

    @property
    def has_pending(self) -> bool:
        return bool(self._pending)

    def mark(self) -> int:
        return len(self._pending)

    def rollback_to(self, mark: int) -> None:
        """Forget writes queued after `mark` (an operation that raised)."""
        del self._pending[mark:]

    def _queue(self, sql: str, params: tuple[object, ...], session: str = "") -> None:
        self._pending.append((sql, params))
        if session and self.epoch_of is not None and session not in self._pending_epochs:
            self._pending_epochs[session] = self.epoch_of(session)

    async def flush(self, on_durable: Callable[[], None] | None = None) -> None:
        """Make every queued write durable (one transaction); raises when the commit failed.

        `on_durable` runs on the loop thread as soon as the commit is known (in the callback that
        learns it, `in_thread`), before this coroutine resumes: group commit wakes its callers there."""
        if not self._pending:
            return
        batch, self._pending = self._pending, []
        epochs, self._pending_epochs = self._pending_epochs, {}
        number = self._batch
        self._batch += 1
        try:
            with metrics.COMMIT_SECONDS.time():
                await self._commit(batch, number, epochs, on_durable or _nothing)
        except BaseException as e:
            self._forget(number)  # nothing of this batch exists: the overlays must not say otherwise
            if isinstance(e, StaleEpoch):
                e.epochs = epochs
            raise
        metrics.COMMIT_BATCH.observe(len(batch))
        self._durable = number
        self._expire()

    async def _commit(
        self, batch: list[Statement], number: int, epochs: dict[str, int], on_durable: Callable[[], None]
    ) -> None:
        """One transaction; call `on_durable()` on the loop thread the moment it is committed."""
        raise NotImplementedError

    def _forget(self, number: int) -> None:
        """Drop the overlay rows of batch `number`, which was refused (never committed)."""
        _drop(self._msg_by_key, number)
        _drop(self._msg_by_id, number)
        _drop(self._msg_run, number)
        _drop(self._runs, number)
        _drop(self._replies, number)
        _drop(self._reply_keys, number)
        _drop(self._finals, number)
        _drop(self._session_rows, number)

    def _expire(self) -> None:
        upto = min([self._durable, *self._reads])
        _expire(self._msg_by_key, upto)
        _expire(self._msg_by_id, upto)
        _expire(self._msg_run, upto)
        _expire(self._runs, upto)
        _expire(self._replies, upto)
        _expire(self._reply_keys, upto)
        _expire(self._finals, upto)
        _expire(self._session_rows, upto)

    def _read_started(self) -> int:
        start = self._durable
        self._reads[start] = self._reads.get(start, 0) + 1
        return start

    def _read_done(self, start: int) -> None:
        self._reads[start] -= 1
        if not self._reads[start]:
            del self._reads[start]

    # --- writes (queued; durable after flush) -------------------------------------------------

    def put_session(self, s: SessionRow) -> None:
        self._queue(
            UPSERT_SESSION,
            (s.session_key, s.channel, s.message_count, s.run_count, s.last_session_seq),
            s.session_key,
        )
        self._session_rows[s.session_key] = (self._batch, s)

    def session_durable(self, session_key: str) -> bool:
        """Whether the session's last write is durable and readable (so it may leave memory)."""
        return session_key not in self._session_rows

    def insert_message(self, m: MessageRow) -> None:
        self._queue(
            INSERT_MESSAGE,
            (
                m.message_id, m.session_key, m.idempotency_key, m.channel, m.sender, m.text, m.mode,
                m.disposition, m.run_id, m.interrupted_run_id, m.effective_mode, m.event_seq,
                m.receive_time, m.causation,
            ),
            m.session_key,
        )  # fmt: skip
        self._msg_by_key[(m.session_key, m.idempotency_key)] = (self._batch, m)
        self._msg_by_id[m.message_id] = (self._batch, m)

    def set_message_run(self, message_id: str, run_id: str) -> None:
        self._queue("UPDATE messages SET run_id = ? WHERE message_id = ?", (run_id, message_id))
        self._msg_run[message_id] = (self._batch, run_id)

    def put_run(self, r: RunRow) -> None:
        values = (
            r.run_id, r.session_key, r.channel, r.state, r.mode,
            json.dumps([i.to_json() for i in r.inputs]), json.dumps(r.steered),
            r.error_kind, r.error_message, r.output, r.final_reply_id, r.create_time, r.start_time,
            r.cancel_request_time, r.end_time, r.attempt, r.cancel_reason, r.causation,
        )  # fmt: skip
        self._queue(UPSERT_RUN, values, r.session_key)
        self._runs[r.run_id] = (self._batch, r)

    def append_event(
        self, global_seq: int, session_key: str, session_seq: int, type_: int, data: bytes
    ) -> None:
        self._queue(
            INSERT_EVENT,
            (global_seq, session_key, session_seq, type_, data),
            session_key,
        )

    def insert_reply(self, r: ReplyRow, *, final_known: bool = False) -> bool:
        """False when the reply is a second final for its run (refused). The caller says whether it
        knows of a final already (`final_known`, from the run row); the overlay covers finals not yet
        durable, and the database's unique index (one final per run) backs both up."""
        if r.kind == 1:
            if final_known or r.run_id in self._finals:
                return False
            self._finals[r.run_id] = (self._batch, True)
        if r.reply_id in self._replies:
            return False
        self._queue(
            INSERT_REPLY,
            (r.reply_id, r.cursor, r.kind, r.run_id, r.session_key, r.channel, r.idempotency_key,
             r.speech_state, r.data),
            r.session_key,
        )  # fmt: skip
        self._replies[r.reply_id] = (self._batch, r)
        if r.idempotency_key:
            self._reply_keys[(r.session_key, r.idempotency_key)] = (self._batch, r)
        return True

    def update_reply(self, r: ReplyRow) -> None:
        """Write back a reply read with `reply()` and changed (cursor, speech state, data)."""
        self._queue(
            UPDATE_REPLY,
            (r.cursor, r.speech_state, r.data, r.reply_id),
            r.session_key,
        )
        self._replies[r.reply_id] = (self._batch, r)
        if r.idempotency_key:
            self._reply_keys[(r.session_key, r.idempotency_key)] = (self._batch, r)

    def add_queue_entry(self, e: QueueEntryRow) -> None:
        self._queue(
            "INSERT INTO queue_entries (session_key, pos, kind, run_id, message_id) VALUES (?, ?, ?, ?, ?)",
            (e.session_key, e.pos, e.kind, e.run_id, e.message_id),
            e.session_key,
        )

    def remove_queue_entry(self, session_key: str, pos: float) -> None:
        self._queue(
            "DELETE FROM queue_entries WHERE session_key = ? AND pos = ?", (session_key, pos), session_key
        )

    # --- reads (asynchronous; before an operation, never inside one) -------------------------

    def _patched(self, m: MessageRow | None) -> MessageRow | None:
        if m is not None and m.message_id in self._msg_run:
            m.run_id = self._msg_run[m.message_id][1]
        return m

    async def session_channel(self, session_key: str) -> str | None:
        """The channel of a stored session (a session evicted from memory keeps its owner)."""
        row = await self.session(session_key)
        return row.channel if row is not None else None

    async def message_by_key(self, session_key: str, idempotency_key: str) -> MessageRow | None:
        queued = self._msg_by_key.get((session_key, idempotency_key))
        if queued is not None:
            return self._patched(queued[1])
        start = self._read_started()
        try:
            row = await self._read_message_by_key(session_key, idempotency_key)
        finally:
            self._read_done(start)
        queued = self._msg_by_key.get((session_key, idempotency_key))  # written while we read
        return self._patched(queued[1] if queued is not None else row)

    async def message(self, message_id: str) -> MessageRow | None:
        queued = self._msg_by_id.get(message_id)
        if queued is not None:
            return self._patched(queued[1])
        start = self._read_started()
        try:
            row = await self._read_message(message_id)
        finally:
            self._read_done(start)
        queued = self._msg_by_id.get(message_id)
        return self._patched(queued[1] if queued is not None else row)

    async def session(self, session_key: str) -> SessionRow | None:
        queued = self._session_rows.get(session_key)
        if queued is not None:
            return queued[1]
        start = self._read_started()
        try:
            row = await self._read_session(session_key)
        finally:
            self._read_done(start)
        queued = self._session_rows.get(session_key)
        return queued[1] if queued is not None else row

    async def run(self, run_id: str) -> RunRow | None:
        queued = self._runs.get(run_id)
        if queued is not None:
            return queued[1]
        start = self._read_started()
        try:
            row = await self._read_run(run_id)
        finally:
            self._read_done(start)
        queued = self._runs.get(run_id)
        return queued[1] if queued is not None else row

    async def reply(self, reply_id: str) -> ReplyRow | None:
        queued = self._replies.get(reply_id)
        if queued is not None:
            return queued[1]
        start = self._read_started()
        try:
            row = await self._read_reply(reply_id)
        finally:
            self._read_done(start)
        queued = self._replies.get(reply_id)
        return queued[1] if queued is not None else row

    async def reply_by_key(self, session_key: str, idempotency_key: str) -> ReplyRow | None:
        queued = self._reply_keys.get((session_key, idempotency_key))
        if queued is not None:
            return queued[1]
        start = self._read_started()
        try:
            row = await self._read_reply_by_key(session_key, idempotency_key)
        finally:
            self._read_done(start)
        queued = self._reply_keys.get((session_key, idempotency_key))
        return queued[1] if queued is not None else row

    # --- backend queries ---------------------------------------------------------------------

    async def _read_message_by_key(self, session_key: str, idempotency_key: str) -> MessageRow | None:
        raise NotImplementedError

    async def _read_message(self, message_id: str) -> MessageRow | None:
        raise NotImplementedError

    async def _read_run(self, run_id: str) -> RunRow | None:
        raise NotImplementedError

    async def _read_session(self, session_key: str) -> SessionRow | None:
        raise NotImplementedError

    async def _read_reply(self, reply_id: str) -> ReplyRow | None:
        raise NotImplementedError

    async def _read_reply_by_key(self, session_key: str, idempotency_key: str) -> ReplyRow | None:
        raise NotImplementedError

    async def max_global_seq(self) -> int:
        raise NotImplementedError

    async def max_reply_cursor(self) -> int:
        raise NotImplementedError

    async def sessions_per_channel(self) -> dict[str, int]:
        """How many sessions each channel has (the per-principal session cap starts from this)."""
        raise NotImplementedError

    async def busy_sessions(self) -> list[SessionRow]:
        """Sessions with a queued or active run or a queue entry (what start-up must hold in memory)."""
        raise NotImplementedError

    async def runs_in_states(self, states: tuple[int, ...], session_key: str | None = None) -> list[RunRow]:
        """Runs in these states (of one session when `session_key` is given), in creation order."""
        raise NotImplementedError

    async def list_runs(
        self, session_key: str, state: int, before_seq: int, limit: int
    ) -> list[tuple[int, RunRow]]:
        raise NotImplementedError

    async def queue_entries(self, session_key: str | None = None) -> list[QueueEntryRow]:
        raise NotImplementedError

    async def events_after(
        self, after_seq: int, session_key: str = "", limit: int = PAGE, upto: int = 1 << 62
    ) -> list[bytes]:
        raise NotImplementedError

    async def replies_after(self, after_cursor: int, limit: int = PAGE, upto: int = 1 << 62) -> list[bytes]:
        raise NotImplementedError

    async def pending_speech(self, session_key: str | None = None) -> list[ReplyRow]:
        raise NotImplementedError
