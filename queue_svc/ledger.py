"""Run control's ledger: the in-memory state of sessions and live runs, event writing, and the reads.

The ledger is what every operation of run control (run_control.py) and of the outbox (outbox.py)
writes through: `_event` hands out the global and per-session sequence numbers and queues the event
row; `_op` is the group-commit scope (group_commit.py). Reads answer from memory for live runs and
sessions and from the store otherwise, and never show past the durable sequence numbers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from flynn.v1 import config_pb2
from flynn.v1 import run_control_pb2 as pb

from flynn_runtime import errors, targeting, tracing
from flynn_runtime.audit import AuditLog
from flynn_runtime.config_source import ConfigSource
from flynn_runtime.enum_names import short_names
from flynn_runtime.timestamps import duration_seconds, timestamp
from queue_svc import metrics
from queue_svc.agents import AgentInput
from queue_svc.fanout import Fanout
from queue_svc.group_commit import GroupCommit, Op
from queue_svc.run_trace import RunTracer
from queue_svc.store import QueueMode, QueueStore, RunRow, RunState, SessionRow

if TYPE_CHECKING:
    from queue_svc.agents import AgentRun

log = logging.getLogger(__name__)

QUEUED, STARTED, CANCEL_REQUESTED = pb.RUN_STATE_QUEUED, pb.RUN_STATE_STARTED, pb.RUN_STATE_CANCEL_REQUESTED
CANCELLED, COMPLETED, ERROR = pb.RUN_STATE_CANCELLED, pb.RUN_STATE_COMPLETED, pb.RUN_STATE_ERROR
TERMINAL = (CANCELLED, COMPLETED, ERROR)
ACTIVE = (STARTED, CANCEL_REQUESTED)

COLLECT, FOLLOWUP = config_pb2.QUEUE_MODE_COLLECT, config_pb2.QUEUE_MODE_FOLLOWUP
INTERRUPT, STEER = config_pb2.QUEUE_MODE_INTERRUPT, config_pb2.QUEUE_MODE_STEER

STATE_NAMES = {**short_names(pb.RunState), 0: "none"}


# --- in-memory state ---------------------------------------------------------------------------


@dataclass
class _Entry:
    pos: float
    kind: str  # "run" | "collect"
    run_id: str = ""
    message: AgentInput | None = None
    receive_time: float = 0.0
    mode: QueueMode = config_pb2.QUEUE_MODE_UNSPECIFIED


@dataclass
class _Session:
    key: str
    channel: str
    message_count: int = 0
    run_count: int = 0
    last_seq: int = 0
    active: str = ""
    queue: list[_Entry] = field(default_factory=list)
    last_collect: float = 0.0
    timer: asyncio.TimerHandle | None = None
    touched: float = 0.0  # time.monotonic() of the last operation on it (idle eviction)

    def row(self) -> SessionRow:
        return SessionRow(self.key, self.channel, self.message_count, self.run_count, self.last_seq)

    def next_pos(self, front: bool = False) -> float:
        if not self.queue:
            return 1.0
        return self.queue[0].pos - 1.0 if front else self.queue[-1].pos + 1.0


@dataclass
class _Live:
    row: RunRow
    agent_run: AgentRun | None = None
    driver: asyncio.Task[None] | None = None
    force: asyncio.TimerHandle | None = None
    forced: bool = False
    pending_steer: dict[str, AgentInput] = field(default_factory=dict)
    cancel_mono: float | None = None
    submit_mono: float | None = None


class Ledger:
    """Sessions and live runs in memory, the group commit that makes their changes durable, the reads."""

    def __init__(self, store: QueueStore, config: ConfigSource, audit: AuditLog | None) -> None:
        self.store = store
        self.config = config
        self.audit = audit
        self.events: Fanout[pb.RunEvent] = Fanout()
        self.replies: Fanout[pb.Reply] = Fanout()
        self.commit = GroupCommit(store, self.events, self.replies)
        #: Sessions in memory: every busy one (an active run, a queue, a timer), and idle ones until
        #: they are evicted (`evict_idle`); the rest are loaded on demand (`_load_session`).
        self._sessions: dict[str, _Session] = {}
        self._runs: dict[str, _Live] = {}
        self._stopping = False
        self._pins: dict[str, int] = {}  # sessions an operation is being prepared for
        self._depth = 0  # queue entries over all sessions (flynn_queue_depth, without visiting them)
        #: Sessions per channel, stored ones included (the per-principal session cap counts them).
        self._channel_sessions: dict[str, int] = {}
        #: Spans of run phases (queue_svc/run_trace.py); None when tracing is off (nothing to do).
        self._trace: RunTracer | None = RunTracer() if tracing.ENABLED else None

    async def _own(self, key: str) -> None:
        """Make sure this replica owns the session (several replicas: replica.py); else nothing."""

    def owns(self, key: str) -> bool:
        return True

    async def _evicted(self, keys: list[str]) -> None:
        """Sessions that left memory (several replicas release their leases: replica.py)."""

    def _op(self, lazy: bool = False) -> AbstractContextManager[Op]:
        return self.commit.op(lazy)

    async def durable(self) -> None:
        """Wait until every operation done so far is durable (acknowledge after this).

        While the writer waits for the database, a caller with writes still pending is refused at
        once with UNAVAILABLE instead of waiting out its deadline: its writes stay queued and are
        committed when the database is back, where a retry with the same idempotency key finds them
        (a duplicate submit of a message not yet durable is answered only once it is)."""
        if self.commit.pending:
            self.store.check_writable()
        await self.commit.durable()

    async def settle(self, within: float) -> None:
        """Wait for the last batch, at most `within` seconds: with the database away it may never
        commit (nothing of it was acknowledged), and stopping must not hang on it."""
        try:
            await asyncio.wait_for(self.durable(), within)
        except Exception:
            log.warning("stopping with the last batch not committed", exc_info=True)

    def _session(self, op: Op, key: str, channel: str) -> _Session:
        """The session in memory, or a new one. Callers load it first (`_load_session`, under `_pin`):
        a session missing here after that does not exist in the store either."""
        s = self._sessions.get(key)
        if s is None:
            s = _Session(key, channel, touched=time.monotonic())
            self._sessions[key] = s
            op.sessions[key] = s
            self._channel_sessions[channel] = self._channel_sessions.get(channel, 0) + 1
        return s

    async def session_channel(self, key: str) -> str | None:
        """The channel a session belongs to (None for a session that does not exist yet); a session
        evicted from memory keeps its owner."""
        s = self._sessions.get(key)
        if s is not None:
            return s.channel
        return await self.store.session_channel(key)

    def sessions_in_channels(self, channels: frozenset[str]) -> int:
        """Sessions (in memory or stored) of these channels."""
        return sum(self._channel_sessions.get(c, 0) for c in channels)

    @contextmanager
    def _pin(self, key: str) -> Iterator[None]:
        """Keep the session in memory while an operation on it is prepared (awaits) and done."""
        self._pins[key] = self._pins.get(key, 0) + 1
        try:
            yield
        finally:
            self._pins[key] -= 1
            if not self._pins[key]:
                del self._pins[key]

    async def _load_session(self, key: str) -> _Session | None:
        """The session, read from the store when it is not in memory (None: there is no such session).
        The read happens before any operation, never inside one."""
        s = self._sessions.get(key)
        if s is None:
            row = await self.store.session(key)
            s = self._sessions.get(key)  # loaded by another caller meanwhile
            if s is None and row is not None:
                s = self._session_from(row)
        return s

    def _session_from(self, row: SessionRow) -> _Session:
        s = _Session(row.session_key, row.channel, row.message_count, row.run_count, row.last_session_seq)
        s.touched = time.monotonic()
        self._sessions[row.session_key] = s
        return s

    async def _evict_loop(self, idle_seconds: float) -> None:
        """Idle sessions leave memory (their rows stay in the store; an operation loads them back)."""
        while not self._stopping:
            await asyncio.sleep(min(idle_seconds, 30.0))
            evicted = self.evict_idle(idle_seconds)
            if evicted:
                log.debug(
                    "idle sessions evicted", extra={"count": len(evicted), "resident": len(self._sessions)}
                )
                await self._evicted(evicted)

    def evict_idle(self, idle_seconds: float) -> list[str]:
        """Drop from memory the sessions idle for `idle_seconds` whose state is durable: no active run,
        no queue, no timer, no operation being prepared. Their rows stay in the store. Returns their keys."""
        cutoff = time.monotonic() - idle_seconds
        idle = [
            k for k, s in self._sessions.items()
            if not s.active and not s.queue and s.timer is None and s.touched <= cutoff
            and k not in self._pins and self.store.session_durable(k)
        ]  # fmt: skip
        for k in idle:
            del self._sessions[k]
        return idle

    def _event(
        self,
        op: Op,
        s: _Session,
        type_: pb.RunEventType.ValueType,
        *,
        run: RunRow | None = None,
        message_id: str = "",
        state: RunState = pb.RUN_STATE_UNSPECIFIED,
        reason: str = "",
        text: str = "",
        sender: str = "",
        error_kind: str = "",
        causation: bytes = b"",
    ) -> pb.RunEvent:
        self.commit.gseq += 1
        s.last_seq += 1
        s.touched = time.monotonic()
        ev = pb.RunEvent(
            global_seq=self.commit.gseq,
            session_seq=s.last_seq,
            event_id=f"evt_{self.commit.gseq}",
            type=type_,
            session_key=s.key,
            channel=s.channel,
            run_id=run.run_id if run else "",
            message_id=message_id,
            state=state,
            error_kind=error_kind,
            reason=reason,
            text=text,
            sender=sender,
            time=timestamp(time.time()),
        )
        cz = causation or (run.causation if run else b"")
        if cz:
            ev.causation.ParseFromString(cz)
        self.store.append_event(ev.global_seq, s.key, ev.session_seq, type_, ev.SerializeToString())
        op.events.append(ev)
        if self._trace is not None:  # the one tracing hook: a span per run phase
            self._trace.event(ev, run)
        op.sessions[s.key] = s
        return ev

    def _audit_transition(
        self, row: RunRow, old: RunState, new: RunState, reason: str, actor: str, **extra: str
    ) -> None:
        metrics.RUNS.labels(STATE_NAMES[new]).inc()
        if self.audit is not None:
            self.audit.record(
                "runState",
                actor=actor,
                run_id=row.run_id,
                session=row.session_key,
                channel=row.channel,
                **{"from": STATE_NAMES[old], "to": STATE_NAMES[new]},
                reason=reason or None,
                attempt=row.attempt,
                **extra,
            )

    async def _load(self) -> None:
        """The busy sessions, live runs and their queues, from the store (at start-up); idle sessions
        stay in the store until an operation needs them."""
        self._channel_sessions = await self.store.sessions_per_channel()
        for srow in await self.store.busy_sessions():
            self._session_from(srow)
        for row in await self.store.runs_in_states((QUEUED, STARTED, CANCEL_REQUESTED)):
            self._runs[row.run_id] = _Live(row)
        for e in await self.store.queue_entries():
            s = self._sessions[e.session_key]
            if e.kind == "run":
                live = self._runs.get(e.run_id)
                if live is None:
                    continue
                s.queue.append(
                    _Entry(e.pos, "run", e.run_id, receive_time=live.row.create_time, mode=live.row.mode)
                )
                self._depth += 1
            else:
                m = await self.store.message(e.message_id)
                if m is None:
                    continue
                s.queue.append(
                    _Entry(e.pos, "collect", message=AgentInput(m.message_id, m.sender, m.text, m.causation),
                           receive_time=m.receive_time, mode=COLLECT)
                )  # fmt: skip
                s.last_collect = max(s.last_collect, m.receive_time)
                self._depth += 1

    # --- config ------------------------------------------------------------------------------

    @property
    def _q(self) -> config_pb2.QueueConfig:
        return self.config.config.server.queue

    def _cap(self) -> int:
        return self._q.cap if self._q.cap > 0 else 20

    def _cancel_deadline(self) -> float:
        return duration_seconds(self._q.cancel_deadline, 2.0)

    def _quiet_window(self) -> float:
        return duration_seconds(self._q.quiet_window, 0.0)

    def effective_mode(
        self, session_key: str, channel: str, override: QueueMode = config_pb2.QUEUE_MODE_UNSPECIFIED
    ) -> pb.EffectiveMode:
        d = targeting.queue_mode(self.config.config, targeting.Target(session_key, channel), override)
        return pb.EffectiveMode(mode=d.value, source=d.source, config_revision=self.config.revision)

    # --- reads ---------------------------------------------------------------------------------

    async def get_run(self, run_id: str) -> RunRow:
        live = self._runs.get(run_id)
        if live is not None:
            return live.row
        row = await self.store.run(run_id)
        if row is None:
            raise errors.not_found("run", run_id)
        if row.state in ACTIVE and not self.owns(row.session_key):
            # Its streamed output lives with the session's owner (several replicas): ask there.
            await self._own(row.session_key)
            live = self._runs.get(run_id)
            return live.row if live is not None else row
        return row

    async def list_runs(
        self, session_key: str, state: int, page_size: int, before_seq: int
    ) -> tuple[list[RunRow], int]:
        rows = await self.store.list_runs(session_key, state, before_seq, page_size + 1)
        more = len(rows) > page_size
        rows = rows[:page_size]
        out = [self._runs[r.run_id].row if r.run_id in self._runs else r for _, r in rows]
        return out, (rows[-1][0] if more and rows else 0)

    async def get_session(self, session_key: str) -> pb.Session:
        await self._own(session_key)
        s = await self._load_session(session_key)
        if s is None:
            raise errors.not_found("session", session_key)
        out = pb.Session(
            session_key=s.key,
            channel=s.channel,
            active_run_id=s.active,
            message_count=s.message_count,
            run_count=s.run_count,
            last_session_seq=s.last_seq,
            effective_mode=self.effective_mode(s.key, s.channel),
        )
        if s.active and s.active in self._runs:
            out.active_run_state = self._runs[s.active].row.state
        for e in s.queue:
            queued = self._queued_message(e)
            if queued is not None:
                out.queue.append(queued)
        return out

    def _queued_message(self, e: _Entry) -> pb.QueuedMessage | None:
        if e.kind == "collect" and e.message is not None:
            m = e.message
        else:
            live = self._runs.get(e.run_id)
            if live is None or not live.row.inputs:
                return None
            first = live.row.inputs[0]
            m = AgentInput(first.message_id, first.sender, first.text)
        return pb.QueuedMessage(
            message_id=m.message_id, text=m.text, sender=m.sender, mode=e.mode,
            receive_time=timestamp(e.receive_time),
        )  # fmt: skip

    def session_active_state(self, session_key: str) -> int:
        s = self._sessions.get(session_key)
        if s is None or not s.active or s.active not in self._runs:
            return 0
        return self._runs[s.active].row.state

    @property
    def global_seq(self) -> int:
        """Last durable global sequence number."""
        return self.commit.durable_gseq

    @property
    def reply_cursor(self) -> int:
        """Last durable reply cursor."""
        return self.commit.durable_cursor

    async def events_head(self) -> int:
        """Where a `from_now` event stream starts: the durable end of the log (with several replicas, the
        database's: this replica's tailer may be behind when nothing here streams events)."""
        if self.commit.publish_locally:
            return self.commit.durable_gseq
        return max(self.commit.durable_gseq, await self.store.max_global_seq())

    async def replies_head(self) -> int:
        """Where a `from_now` reply stream starts (see events_head)."""
        if self.commit.publish_locally:
            return self.commit.durable_cursor
        return max(self.commit.durable_cursor, await self.store.max_reply_cursor())

    async def events_after(self, after_seq: int, session_key: str = "") -> list[pb.RunEvent]:
        """Durable events only: a cursor never points past what a crash could take back. (With several
        replicas, everything in the database is committed, by every replica: no bound.)"""
        upto = self.commit.durable_gseq if self.commit.publish_locally else 1 << 62
        rows = await self.store.events_after(after_seq, session_key, upto=upto)
        return [pb.RunEvent.FromString(b) for b in rows]

    async def replies_after(self, after_cursor: int) -> list[pb.Reply]:
        upto = self.commit.durable_cursor if self.commit.publish_locally else 1 << 62
        rows = await self.store.replies_after(after_cursor, upto=upto)
        return [pb.Reply.FromString(b) for b in rows]
