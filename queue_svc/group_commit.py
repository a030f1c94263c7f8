"""Group commit for run control: the operation scope, the flush loop and the durable sequence numbers.

Every domain operation is a synchronous critical section (`with commit.op() as op:`) that mutates
memory and queues its writes in the store; nothing awaits inside it, so operations never interleave.
The writes of every operation done while a commit is in flight form the next batch, committed as one
transaction (one fsync, or one round trip) as soon as the previous one is durable. Only then are the
batch's events and replies published and its `op.after` actions run (launch an agent run, tell the
agent about a cancel, start speech): a watcher never sees, and an agent never acts on, anything a
crash could take back.

Latency of an acknowledgement (a cancel's above all): a caller waits for the batch its operation
joined; when a batch is already in flight that is the rest of that one plus its own. The callers of a
batch are woken in the very loop callback that learns the commit is done (the store's `on_durable`,
store.py `in_thread`), each through a future of its own: not one loop turn later when the flush task
resumes, and not through a shared future behind `asyncio.shield` (two more turns). Publishing the
batch and its follow-up actions happen in the flush task's next turn, as before.

Streamed output is committed lazily. An operation that only appends a RUN_OUTPUT chunk (`op(lazy=True)`)
nobody waits for: a batch holding only such operations lingers up to `LINGER_SECONDS` after its first
one before it is committed, unless an operation somebody waits for joins it (or `durable()` is called),
which commits it at once. So runs streaming cost about one commit per linger per replica instead of one
per chunk, and an acknowledgement (a cancel's above all) finds the writer, and with several replicas
the database's counter row that orders every replica's commits (store_pg.TAKE_NUMBERS), free far more
often. Chunks are still published only once durable; they reach watchers at most a linger later.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Protocol

from flynn.v1 import run_control_pb2 as pb

from flynn_runtime import errors
from flynn_runtime.enum_names import short_names
from flynn_runtime.errors import FlynnError
from flynn_runtime.leases import StaleEpoch
from queue_svc import metrics
from queue_svc.fanout import Fanout
from queue_svc.store import RunRow, SessionRow

log = logging.getLogger(__name__)

DELIVERY_NAMES = short_names(pb.DeliveryMode, with_zero=False)
#: How long a batch of lazy operations only (streamed output chunks) may wait for company.
LINGER_SECONDS = 0.025


class BatchStore(Protocol):
    """What group commit needs of a store: queued writes that `flush()` makes durable at once."""

    offsets: tuple[int, int]

    def mark(self) -> int: ...
    def rollback_to(self, mark: int) -> None: ...
    def put_session(self, s: SessionRow) -> None: ...
    def put_run(self, r: RunRow) -> None: ...
    async def flush(self, on_durable: Callable[[], None] | None = None) -> None: ...


class HasSessionRow(Protocol):
    def row(self) -> SessionRow: ...


class Op:
    """What one operation did: written at its end (sessions, runs), published and run after commit."""

    def __init__(self) -> None:
        self.events: list[pb.RunEvent] = []
        self.replies: list[pb.Reply] = []
        self.sessions: dict[str, HasSessionRow] = {}
        self.runs: dict[str, RunRow] = {}
        self.after: list[Callable[[], None]] = []


class _Batch:
    """The operations committed together, and the callers waiting for them (a future each, so a
    cancelled caller cancels only its own wait)."""

    __slots__ = ("ops", "waiters", "acked", "error", "opened", "urgent")

    def __init__(self) -> None:
        self.ops: list[Op] = []
        self.opened = 0.0  # time.perf_counter() of its first operation
        #: time.perf_counter() of its first operation that is not lazy (0.0: lazy ones only so far),
        #: or of the first `durable()` call that waits for it.
        self.urgent = 0.0
        self.waiters: list[asyncio.Future[None]] = []
        self.acked = False
        self.error: BaseException | None = None

    async def wait(self) -> None:
        if self.error is not None:
            raise self.error
        if self.acked:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiters.append(fut)
        await fut

    def settle(self, error: BaseException | None = None) -> None:
        """Wake every waiter: durable (error None) or refused/failed."""
        if error is None:
            self.acked = True
        else:
            self.error = error
        waiters, self.waiters = self.waiters, []
        for fut in waiters:
            if not fut.done():
                if error is None:
                    fut.set_result(None)
                else:
                    fut.set_exception(error)


class GroupCommit:
    """The batch being filled, the batch being committed, and the sequence numbers made durable.

    `gseq` (run events) and `cursor` (replies) are handed out inside operations; `durable_gseq` and
    `durable_cursor` follow them once the batch that used them is committed, so a reader never gets
    a cursor past what a crash could take back.
    """

    def __init__(self, store: BatchStore, events: Fanout[pb.RunEvent], replies: Fanout[pb.Reply]) -> None:
        self.store = store
        self.events = events
        self.replies = replies
        self.gseq = self.durable_gseq = 0
        self.cursor = self.durable_cursor = 0
        self._open = _Batch()
        self._inflight: _Batch | None = None
        self._flusher: asyncio.Task[None] | None = None
        #: Set when the lingering open batch must be committed now (see LINGER_SECONDS).
        self._hurry = asyncio.Event()
        #: Several replicas (store_pg.py): the database numbers events and replies, and a tailer
        #: (tail.py) publishes every replica's commits in the database's order; this process hands its
        #: own batch to the tailer (`on_commit`), which publishes it only in that order.
        self.publish_locally = True
        self.on_commit: Callable[[list[pb.RunEvent], list[pb.Reply]], None] | None = None
        #: A batch refused because its owner epoch is stale (run control steps down from its sessions).
        self.on_refused: Callable[[StaleEpoch, set[str]], None] | None = None

    def resume(self, gseq: int, cursor: int) -> None:
        """Continue the sequences from what the store holds (at start-up)."""
        self.gseq = self.durable_gseq = gseq
        self.cursor = self.durable_cursor = cursor

    @contextmanager
    def op(self, lazy: bool = False) -> Iterator[Op]:
        """One atomic domain operation. Its writes join the batch being filled (group commit); its
        events, replies and follow-up actions run only once that batch is durable. `lazy`: nobody
        waits for it (a streamed output chunk), so its batch may linger (LINGER_SECONDS)."""
        op = Op()
        mark = self.store.mark()
        try:
            yield op
            for s in op.sessions.values():
                self.store.put_session(s.row())
            for row in op.runs.values():
                self.store.put_run(row)
        except BaseException:
            self.store.rollback_to(mark)
            raise
        now = time.perf_counter()
        if not self._open.ops:
            self._open.opened = now
        self._open.ops.append(op)
        if not lazy:
            self._hurry_open(now)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.ensure_future(self._flush_loop())

    def _hurry_open(self, now: float) -> None:
        """Somebody waits for the open batch: commit it as soon as the writer is free."""
        if not self._open.urgent:
            self._open.urgent = now
            self._hurry.set()

    async def _linger(self) -> None:
        """A batch of lazy operations only waits for company, at most LINGER_SECONDS after its first."""
        left = self._open.opened + LINGER_SECONDS - time.perf_counter()
        if self._open.urgent or left <= 0:
            return
        self._hurry.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(left):
                await self._hurry.wait()

    async def _flush_loop(self) -> None:
        """Commit batches back to back: while one is syncing, the next one fills."""
        while self._open.ops:
            await self._linger()
            batch, self._open = self._open, _Batch()
            self._inflight = batch
            gseq, cursor = self.gseq, self.cursor
            if batch.urgent:
                metrics.BATCH_WAIT.observe(time.perf_counter() - batch.urgent)
            try:
                await self.store.flush(on_durable=functools.partial(self._acknowledge, batch, gseq, cursor))
            except Exception as e:
                if isinstance(e, StaleEpoch):
                    sessions = {k for op in batch.ops for k in op.sessions} | {
                        r.session_key for op in batch.ops for r in op.runs.values()
                    }
                    log.warning("a batch was refused: stale owner epoch", extra={"stale": list(e.names)[:20]})
                    if self.on_refused is not None:
                        self.on_refused(e, sessions)
                    e = _refused()
                else:
                    log.critical("run-control commit failed; the operations of this batch are not acknowledged",
                                 exc_info=True)  # fmt: skip
                batch.settle(e)
                continue
            finally:
                self._inflight = None
            if not batch.acked:  # nothing to write (the store answered without a commit)
                self._acknowledge(batch, gseq, cursor)
            if self.publish_locally:
                self._publish(batch)
            else:
                if self.on_commit is not None:
                    events = [ev for op in batch.ops for ev in op.events]
                    replies = [r for op in batch.ops for r in op.replies]
                    self.on_commit(events, replies)
                self._after(batch)

    def _acknowledge(self, batch: _Batch, gseq: int, cursor: int) -> None:
        """The batch is durable: give it its final numbers and wake its callers (called by the store in
        the loop callback that learns of the commit, before the flush task resumes)."""
        g_off, c_off = self.store.offsets
        if g_off or c_off:
            _renumber(batch, g_off, c_off)
        if self.publish_locally:
            self.durable_gseq, self.durable_cursor = gseq, cursor
        else:
            last_event = next((op.events[-1] for op in reversed(batch.ops) if op.events), None)
            last_reply = next((op.replies[-1] for op in reversed(batch.ops) if op.replies), None)
            self.advance(
                last_event.global_seq if last_event is not None else 0,
                last_reply.cursor if last_reply is not None else 0,
            )
        batch.settle()

    def _publish(self, batch: _Batch) -> None:
        for op in batch.ops:
            for ev in op.events:
                self.events.publish(ev)
            for reply in op.replies:
                self.replies.publish(reply)
        self._after(batch)

    def _after(self, batch: _Batch) -> None:
        for op in batch.ops:
            for reply in op.replies:
                metrics.REPLIES_DELIVERED.labels(DELIVERY_NAMES.get(reply.delivery, "text")).inc()
        for op in batch.ops:
            for fn in op.after:
                try:
                    fn()
                except Exception:
                    log.exception("post-commit action failed")

    def advance(self, gseq: int, cursor: int) -> None:
        """Several replicas: the highest numbers known committed (by this replica or the tailer)."""
        self.durable_gseq = max(self.durable_gseq, gseq)
        self.durable_cursor = max(self.durable_cursor, cursor)

    @property
    def pending(self) -> bool:
        """Operations are waiting to be made durable (open or in flight)."""
        return bool(self._open.ops) or self._inflight is not None

    async def durable(self) -> None:
        """Wait until every operation done so far is durable (acknowledge after this)."""
        if self._open.ops:
            self._hurry_open(time.perf_counter())
            await self._open.wait()
        elif self._inflight is not None:
            await self._inflight.wait()


def _renumber(batch: _Batch, g_off: int, c_off: int) -> None:
    """Give the batch's events and replies (as callers hold them) the numbers the database gave them."""
    for op in batch.ops:
        if g_off:
            for ev in op.events:
                ev.global_seq += g_off
                ev.event_id = f"evt_{ev.global_seq}"
        if c_off:
            for reply in op.replies:
                reply.cursor += c_off


def _refused() -> FlynnError:
    """What callers of a refused batch get: retry (the session is served by its new owner)."""
    return errors.unavailable(
        "this run-control replica no longer owns the session (another replica took it over); retry",
        reason="SESSION_OWNER_MOVED",
        retry_after=0.1,
    )
