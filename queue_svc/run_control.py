"""Run control's domain: sessions, queue modes, runs, cancel, the reply outbox (DESIGN.md §4). No gRPC here.

Concurrency model: everything runs on one asyncio loop, and every domain operation is a synchronous
critical section (`with self._op() as op:`) that mutates memory and writes one SQLite transaction;
nothing awaits inside it, so operations never interleave. Events are published to live streams only
after their transaction committed, so a watcher never sees an event the store could lose.

Invariants the code keeps (and tests check):
- a session has at most one active run (started or cancel_requested);
- every run gets exactly one terminal event (guarded by `_terminal`);
- at most one final reply per run (the outbox's unique index; a refused second one is counted);
- a run whose cancel was acknowledged never delivers a final;
- every acknowledged message ends in a run's inputs, in a collect buffer, or in a MESSAGE_DROPPED event.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from flynn.v1 import common_pb2, config_pb2
from flynn.v1 import run_control_pb2 as pb
from google.protobuf import timestamp_pb2

from flynn_runtime import errors, targeting, tracing
from flynn_runtime.audit import AuditLog
from flynn_runtime.config_source import ConfigSource
from flynn_runtime.ids import new_id
from queue_svc import metrics, speech
from queue_svc.agents import (
    Agent,
    AgentHooks,
    AgentInput,
    AgentRun,
    Cancelled,
    Failure,
    Final,
    Outcome,
    RunSpec,
)
from queue_svc.fanout import Fanout
from queue_svc.run_trace import RunTracer
from queue_svc.store import InputRow, MessageRow, QueueEntryRow, QueueStore, ReplyRow, RunRow, SessionRow

log = logging.getLogger(__name__)

QUEUED, STARTED, CANCEL_REQUESTED = pb.RUN_STATE_QUEUED, pb.RUN_STATE_STARTED, pb.RUN_STATE_CANCEL_REQUESTED
CANCELLED, COMPLETED, ERROR = pb.RUN_STATE_CANCELLED, pb.RUN_STATE_COMPLETED, pb.RUN_STATE_ERROR
TERMINAL = (CANCELLED, COMPLETED, ERROR)
ACTIVE = (STARTED, CANCEL_REQUESTED)

COLLECT, FOLLOWUP = config_pb2.QUEUE_MODE_COLLECT, config_pb2.QUEUE_MODE_FOLLOWUP
INTERRUPT, STEER = config_pb2.QUEUE_MODE_INTERRUPT, config_pb2.QUEUE_MODE_STEER

STATE_NAMES = {
    0: "none", QUEUED: "queued", STARTED: "started", CANCEL_REQUESTED: "cancel_requested",
    CANCELLED: "cancelled", COMPLETED: "completed", ERROR: "error",
}  # fmt: skip
DISPOSITION_NAMES: dict[int, str] = {
    v: k.removeprefix("DISPOSITION_").lower() for k, v in pb.Disposition.items()
}
DELIVERY_NAMES = {
    pb.DELIVERY_MODE_TEXT: "text",
    pb.DELIVERY_MODE_AUDIO: "audio",
    pb.DELIVERY_MODE_TEXT_AFTER_FALLBACK: "text_after_fallback",
}


def _seconds(d: object, default: float) -> float:
    from google.protobuf import duration_pb2

    assert isinstance(d, duration_pb2.Duration)
    s = d.seconds + d.nanos / 1e9
    return s if s > 0 else default


def _ts(t: float) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(t * 1e9))
    return ts


def reply_id_for_run(run_id: str) -> str:
    """The final reply's id is a function of the run id: stable across attempts and restarts."""
    return "rpl_" + run_id.removeprefix("run_")


# --- inputs and results of operations --------------------------------------------------------


@dataclass(frozen=True)
class SubmitInput:
    session_key: str
    channel: str
    sender: str
    text: str
    idempotency_key: str
    mode_override: int = 0
    causation: common_pb2.Causation | None = None
    actor: str = "system"


@dataclass(frozen=True)
class SubmitResult:
    message_id: str
    disposition: int
    run_id: str
    effective_mode: pb.EffectiveMode
    original_disposition: int = 0
    interrupted_run_id: str = ""
    event_seq: int = 0


@dataclass(frozen=True)
class CancelResult:
    outcome: int
    run_id: str
    state: int
    dropped_messages: int = 0


# --- in-memory state ---------------------------------------------------------------------------


@dataclass
class _Entry:
    pos: float
    kind: str  # "run" | "collect"
    run_id: str = ""
    message: AgentInput | None = None
    receive_time: float = 0.0
    mode: int = 0


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


class _Op:
    def __init__(self) -> None:
        self.events: list[pb.RunEvent] = []
        self.replies: list[pb.Reply] = []
        self.sessions: dict[str, _Session] = {}
        self.runs: dict[str, _Live] = {}
        self.after: list[Callable[[], None]] = []


@dataclass
class _Batch:
    done: asyncio.Future[None]
    ops: list[_Op] = field(default_factory=list)


class AgentProvider:
    """Which agent runs a run, chosen per run from the live config (server.agent.address)."""

    def __init__(self, builtin: Agent, external: Callable[[str], Agent] | None = None) -> None:
        self._builtin = builtin
        self._external = external
        self._by_address: dict[str, Agent] = {}

    def for_config(self, cfg: config_pb2.FlynnConfig) -> Agent:
        address = cfg.server.agent.address
        if not address or self._external is None:
            return self._builtin
        if address not in self._by_address:
            self._by_address[address] = self._external(address)
        return self._by_address[address]

    async def close(self) -> None:
        await self._builtin.close()
        for a in self._by_address.values():
            await a.close()


class RunControl:
    def __init__(
        self,
        store: QueueStore,
        config: ConfigSource,
        agents: AgentProvider,
        synthesizer: speech.Synthesizer | None = None,
        audit: AuditLog | None = None,
        speech_concurrency: int = 32,
    ) -> None:
        self.store = store
        self.config = config
        self.agents = agents
        self.synthesizer = synthesizer
        self.audit = audit
        self.events: Fanout[pb.RunEvent] = Fanout()
        self.replies: Fanout[pb.Reply] = Fanout()
        self._sessions: dict[str, _Session] = {}
        self._channel_sessions: dict[str, int] = {}  # sessions per channel (per-principal session cap)
        self._runs: dict[str, _Live] = {}
        self._gseq = 0
        self._cursor = 0
        self._durable_gseq = 0
        self._durable_cursor = 0
        self._open = _Batch(asyncio.get_event_loop().create_future())
        self._inflight: _Batch | None = None
        self._flusher: asyncio.Task[None] | None = None
        self._stopping = False
        self._speech_tasks: set[asyncio.Task[None]] = set()
        self._speech_sem = asyncio.Semaphore(speech_concurrency)
        # Spans of run phases (queue_svc/run_trace.py); None when tracing is off (nothing to do).
        self._trace: RunTracer | None = RunTracer() if tracing.ENABLED else None

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Load state and recover from a crash (DESIGN.md §4 crash policy)."""
        self._gseq = self._durable_gseq = self.store.max_global_seq()
        self._cursor = self._durable_cursor = self.store.max_reply_cursor()
        metrics.QUEUE_DEPTH.set_function(lambda: sum(len(s.queue) for s in self._sessions.values()))
        metrics.RUNS_ACTIVE.set_function(lambda: sum(1 for s in self._sessions.values() if s.active))
        for srow in self.store.sessions():
            self._sessions[srow.session_key] = _Session(
                srow.session_key, srow.channel, srow.message_count, srow.run_count, srow.last_session_seq
            )
            self._channel_sessions[srow.channel] = self._channel_sessions.get(srow.channel, 0) + 1
        for row in self.store.runs_in_states((QUEUED, STARTED, CANCEL_REQUESTED)):
            self._runs[row.run_id] = _Live(row)
        for e in self.store.queue_entries():
            s = self._sessions[e.session_key]
            if e.kind == "run":
                live = self._runs.get(e.run_id)
                if live is None:
                    continue
                s.queue.append(
                    _Entry(e.pos, "run", e.run_id, receive_time=live.row.create_time, mode=live.row.mode)
                )
            else:
                m = self.store.message(e.message_id)
                if m is None:
                    continue
                s.queue.append(
                    _Entry(e.pos, "collect", message=AgentInput(m.message_id, m.sender, m.text),
                           receive_time=m.receive_time, mode=COLLECT)
                )  # fmt: skip
                s.last_collect = max(s.last_collect, m.receive_time)
        policy = self.config.config.server.queue.restart_policy
        crashed = [live for live in self._runs.values() if live.row.state in ACTIVE]
        with self._op() as op:
            for live in crashed:
                row = live.row
                s = self._sessions[row.session_key]
                if row.state == CANCEL_REQUESTED:
                    s.active = row.run_id
                    self._terminal(op, s, live, CANCELLED, reason="restart", actor="system")
                elif row.state == STARTED:
                    s.active = row.run_id
                    if policy == config_pb2.RESTART_POLICY_RERUN:
                        row.attempt += 1
                        row.output = ""  # the new attempt streams its own output
                        op.runs[row.run_id] = live
                        self._event(
                            op,
                            s,
                            pb.RUN_EVENT_TYPE_RUN_STARTED,
                            run=row,
                            state=STARTED,
                            reason="restart_rerun",
                        )
                        self._audit_transition(row, STARTED, STARTED, "restart_rerun", "system")
                        op.after.append(functools.partial(self._launch, live))
                    else:
                        self._terminal(op, s, live, ERROR, reason="restart", actor="system",
                                       error_kind="restart", error_message="run control restarted during the run")  # fmt: skip
            for s in self._sessions.values():
                self._advance(op, s)
            for r in self.store.pending_speech():
                reply = pb.Reply.FromString(r.data)
                s = self._sessions.get(reply.session_key) or self._session(
                    op, reply.session_key, reply.channel
                )
                self._publish_speech(
                    op, s, reply, speech.SpeechOutcome(None, "restart", "pending at restart")
                )
        await self.durable()

    async def stop(self) -> None:
        """Stop driving runs; active runs stay active in the store and the restart policy applies."""
        self._stopping = True
        tasks: list[asyncio.Task[None]] = []
        for live in self._runs.values():
            if live.force is not None:
                live.force.cancel()
            if live.driver is not None and not live.driver.done():
                live.driver.cancel()
                tasks.append(live.driver)
        for s in self._sessions.values():
            if s.timer is not None:
                s.timer.cancel()
        for t in self._speech_tasks:
            t.cancel()
        tasks.extend(self._speech_tasks)
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        await self.durable()
        await self.agents.close()
        if self._trace is not None:
            self._trace.close()

    # --- the operation scope -----------------------------------------------------------------

    @contextmanager
    def _op(self) -> Iterator[_Op]:
        """One atomic domain operation. Its writes join the batch being filled (group commit); its
        events, replies and follow-up actions run only once that batch is durable."""
        op = _Op()
        mark = self.store.mark()
        try:
            yield op
            for s in op.sessions.values():
                self.store.put_session(s.row())
            for live in op.runs.values():
                self.store.put_run(live.row)
        except BaseException:
            self.store.rollback_to(mark)
            raise
        self._open.ops.append(op)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.ensure_future(self._flush_loop())

    async def _flush_loop(self) -> None:
        """Commit batches back to back: while one is syncing, the next one fills."""
        while self._open.ops:
            batch, self._open = self._open, _Batch(asyncio.get_running_loop().create_future())
            self._inflight = batch
            gseq, cursor = self._gseq, self._cursor
            try:
                await self.store.flush()
            except Exception as e:
                log.critical("run-control commit failed; the operations of this batch are not acknowledged",
                             exc_info=True)  # fmt: skip
                batch.done.set_exception(e)
                batch.done.exception()  # marked retrieved; waiting callers still get it
                continue
            finally:
                self._inflight = None
            self._durable_gseq, self._durable_cursor = gseq, cursor
            batch.done.set_result(None)
            for op in batch.ops:
                for ev in op.events:
                    self.events.publish(ev)
                for reply in op.replies:
                    self.replies.publish(reply)
                    metrics.REPLIES_DELIVERED.labels(DELIVERY_NAMES.get(reply.delivery, "text")).inc()
            for op in batch.ops:
                for fn in op.after:
                    try:
                        fn()
                    except Exception:
                        log.exception("post-commit action failed")

    async def durable(self) -> None:
        """Wait until every operation done so far is on disk (acknowledge after this)."""
        if self._open.ops:
            await asyncio.shield(self._open.done)
        elif self._inflight is not None:
            await asyncio.shield(self._inflight.done)

    def _event(
        self,
        op: _Op,
        s: _Session,
        type_: int,
        *,
        run: RunRow | None = None,
        message_id: str = "",
        state: int = 0,
        reason: str = "",
        text: str = "",
        sender: str = "",
        error_kind: str = "",
        causation: bytes = b"",
    ) -> pb.RunEvent:
        self._gseq += 1
        s.last_seq += 1
        ev = pb.RunEvent(
            global_seq=self._gseq,
            session_seq=s.last_seq,
            event_id=f"evt_{self._gseq}",
            type=type_,  # type: ignore[arg-type]
            session_key=s.key,
            channel=s.channel,
            run_id=run.run_id if run else "",
            message_id=message_id,
            state=state,  # type: ignore[arg-type]
            error_kind=error_kind,
            reason=reason,
            text=text,
            sender=sender,
            time=_ts(time.time()),
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
        self, row: RunRow, old: int, new: int, reason: str, actor: str, **extra: str
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

    # --- config ------------------------------------------------------------------------------

    @property
    def _q(self) -> config_pb2.QueueConfig:
        return self.config.config.server.queue

    def _cap(self) -> int:
        return self._q.cap if self._q.cap > 0 else 20

    def _cancel_deadline(self) -> float:
        return _seconds(self._q.cancel_deadline, 2.0)

    def _quiet_window(self) -> float:
        return _seconds(self._q.quiet_window, 0.0)

    def effective_mode(self, session_key: str, channel: str, override: int = 0) -> pb.EffectiveMode:
        d = targeting.queue_mode(self.config.config, targeting.Target(session_key, channel), override)
        return pb.EffectiveMode(mode=d.value, source=d.source, config_revision=self.config.revision)  # type: ignore[arg-type]

    # --- sessions ----------------------------------------------------------------------------

    def _session(self, op: _Op, key: str, channel: str) -> _Session:
        s = self._sessions.get(key)
        if s is None:
            counted = self.store.session_channel(key) is not None  # back in memory, not new
            s = _Session(key, channel)
            self._sessions[key] = s
            op.sessions[key] = s
            if not counted:
                self._channel_sessions[channel] = self._channel_sessions.get(channel, 0) + 1
        return s

    def session_channel(self, key: str) -> str | None:
        """The channel a session belongs to (None for a session that does not exist yet)."""
        s = self._sessions.get(key)
        if s is not None:
            return s.channel
        return self.store.session_channel(key)

    def sessions_in_channels(self, channels: frozenset[str]) -> int:
        return sum(self._channel_sessions.get(c, 0) for c in channels)

    def _update_depth(self) -> None:
        """Gauges are computed at scrape time (set_function in start)."""

    # --- SubmitMessage -----------------------------------------------------------------------

    def submit(self, req: SubmitInput) -> SubmitResult:
        known = self.store.message_by_key(req.session_key, req.idempotency_key)
        if known is not None:
            return self._duplicate(known)
        eff = self.effective_mode(req.session_key, req.channel, req.mode_override)
        now = time.time()
        mid = new_id("msg")
        cz = _with_origin(req.causation).SerializeToString()
        with self._op() as op:
            s = self._session(op, req.session_key, req.channel)
            s.message_count += 1
            ev = self._event(
                op, s, pb.RUN_EVENT_TYPE_MESSAGE_RECEIVED, message_id=mid, text=req.text, sender=req.sender,
                causation=cz,
            )  # fmt: skip
            inp = AgentInput(mid, req.sender, req.text)
            disposition, run_id, interrupted = self._route(op, s, eff.mode, inp, now, cz, req.actor)
            self.store.insert_message(
                MessageRow(
                    mid,
                    req.session_key,
                    req.idempotency_key,
                    req.channel,
                    req.sender,
                    req.text,
                    eff.mode,
                    disposition,
                    run_id,
                    interrupted,
                    eff.SerializeToString(),
                    ev.global_seq,
                    now,
                    cz,
                )  # fmt: skip
            )
        metrics.MESSAGES.labels(DISPOSITION_NAMES[disposition]).inc()
        metrics.MESSAGES_BY_MODE.labels(metrics.QUEUE_MODE_NAMES.get(eff.mode, "unspecified")).inc()
        self._update_depth()
        return SubmitResult(mid, disposition, run_id, eff, 0, interrupted, ev.global_seq)

    def _duplicate(self, m: MessageRow) -> SubmitResult:
        metrics.MESSAGES.labels("duplicate").inc()
        return SubmitResult(
            message_id=m.message_id,
            disposition=pb.DISPOSITION_DUPLICATE,
            run_id=m.run_id,
            effective_mode=pb.EffectiveMode.FromString(m.effective_mode),
            original_disposition=m.disposition,
            interrupted_run_id=m.interrupted_run_id,
            event_seq=m.event_seq,
        )

    def _route(
        self, op: _Op, s: _Session, mode: int, inp: AgentInput, now: float, cz: bytes, actor: str
    ) -> tuple[int, str, str]:
        """Decide what happens to a new message; returns (disposition, run id, interrupted run id)."""
        active = self._runs.get(s.active) if s.active else None
        if active is None and not s.queue:
            live = self._new_run(op, s, mode, [inp], now, cz)
            self._start(op, s, live)
            return pb.DISPOSITION_STARTED, live.row.run_id, ""
        if (
            mode == STEER
            and active is not None
            and active.row.state == STARTED
            and active.agent_run is not None
        ):
            taken = active.agent_run.offer_steer([inp])
            if taken is True:
                self._steered(op, s, active, inp)
                return pb.DISPOSITION_STEERED, active.row.run_id, ""
            if taken is None:
                active.pending_steer[inp.message_id] = inp
                return pb.DISPOSITION_STEERED, active.row.run_id, ""
        if mode == STEER:
            # No active run that can take it (idle with a queue, cancelling, or a non-steerable agent).
            mode = FOLLOWUP
        if mode == INTERRUPT:
            # Earlier interrupters that have not started yet are superseded by this one.
            for e in [e for e in s.queue if e.kind == "run" and e.mode == INTERRUPT]:
                self._cancel_queued(op, s, e, reason="superseded", actor=actor)
            if not self._make_room(op, s, inp, now):
                return pb.DISPOSITION_DROPPED, "", ""
            interrupted = ""
            if active is not None:
                interrupted = active.row.run_id
                if active.row.state == STARTED:
                    self._request_cancel(op, s, active, reason="interrupt", actor=actor)
            live = self._new_run(op, s, INTERRUPT, [inp], now, cz)
            self._enqueue(
                op,
                s,
                _Entry(s.next_pos(front=True), "run", live.row.run_id, receive_time=now, mode=INTERRUPT),
            )
            self._advance(op, s)
            if interrupted:
                return pb.DISPOSITION_INTERRUPTED_PREVIOUS, live.row.run_id, interrupted
            started = s.active == live.row.run_id
            return (pb.DISPOSITION_STARTED if started else pb.DISPOSITION_QUEUED), live.row.run_id, ""
        if not self._make_room(op, s, inp, now):
            return pb.DISPOSITION_DROPPED, "", ""
        if mode == FOLLOWUP:
            live = self._new_run(op, s, FOLLOWUP, [inp], now, cz)
            self._enqueue(
                op, s, _Entry(s.next_pos(), "run", live.row.run_id, receive_time=now, mode=FOLLOWUP)
            )
            return pb.DISPOSITION_QUEUED, live.row.run_id, ""
        # collect
        self._enqueue(op, s, _Entry(s.next_pos(), "collect", message=inp, receive_time=now, mode=COLLECT))
        s.last_collect = now
        if not s.active:
            self._advance(op, s)
        return pb.DISPOSITION_COLLECTED, "", ""

    def _make_room(self, op: _Op, s: _Session, inp: AgentInput, now: float) -> bool:
        """Apply the cap and drop policy before queueing `inp`; False when `inp` itself is dropped."""
        if len(s.queue) < self._cap():
            return True
        if self._q.drop == config_pb2.DROP_POLICY_NEW:
            self._event(
                op, s, pb.RUN_EVENT_TYPE_MESSAGE_DROPPED, message_id=inp.message_id, reason="queue_full_new"
            )
            metrics.MESSAGES_DROPPED.labels("queue_full_new").inc()
            return False
        while len(s.queue) >= self._cap():
            oldest = min(s.queue, key=lambda e: e.receive_time)
            self._drop_entry(op, s, oldest, "queue_full_old", "system")
        return True

    def _enqueue(self, op: _Op, s: _Session, e: _Entry) -> None:
        if e.pos < (s.queue[0].pos if s.queue else 2.0):
            s.queue.insert(0, e)
        else:
            s.queue.append(e)
        self.store.add_queue_entry(
            QueueEntryRow(s.key, e.pos, e.kind, e.run_id, e.message.message_id if e.message else "")
        )

    def _dequeue(self, s: _Session, e: _Entry) -> None:
        s.queue.remove(e)
        self.store.remove_queue_entry(s.key, e.pos)

    def _drop_entry(self, op: _Op, s: _Session, e: _Entry, reason: str, actor: str) -> int:
        if e.kind == "collect":
            assert e.message is not None
            self._dequeue(s, e)
            self._event(
                op, s, pb.RUN_EVENT_TYPE_MESSAGE_DROPPED, message_id=e.message.message_id, reason=reason
            )
            metrics.MESSAGES_DROPPED.labels(reason).inc()
            return 1
        live = self._runs[e.run_id]
        for i in live.row.inputs:
            self._event(
                op, s, pb.RUN_EVENT_TYPE_MESSAGE_DROPPED, run=live.row, message_id=i.message_id, reason=reason
            )
            metrics.MESSAGES_DROPPED.labels(reason).inc()
        self._cancel_queued(op, s, e, reason, actor)
        return len(live.row.inputs)

    def _cancel_queued(self, op: _Op, s: _Session, e: _Entry, reason: str, actor: str) -> None:
        live = self._runs[e.run_id]
        self._dequeue(s, e)
        live.row.cancel_request_time = time.time()
        live.row.cancel_reason = reason
        self._transition(op, s, live, CANCEL_REQUESTED, pb.RUN_EVENT_TYPE_RUN_CANCEL_REQUESTED, reason, actor)
        self._terminal(op, s, live, CANCELLED, reason=reason, actor=actor)

    # --- runs --------------------------------------------------------------------------------

    def _new_run(
        self, op: _Op, s: _Session, mode: int, inputs: list[AgentInput], now: float, cz: bytes
    ) -> _Live:
        row = RunRow(
            run_id=new_id("run"),
            session_key=s.key,
            channel=s.channel,
            state=QUEUED,
            mode=mode,
            inputs=[InputRow(i.message_id, i.sender, i.text) for i in inputs],
            create_time=now,
            causation=cz,
        )
        live = _Live(row, submit_mono=time.perf_counter())
        self._runs[row.run_id] = live
        s.run_count += 1
        op.runs[row.run_id] = live
        self._event(op, s, pb.RUN_EVENT_TYPE_RUN_QUEUED, run=row, state=QUEUED)
        self._audit_transition(row, 0, QUEUED, "", "system", mode=config_pb2.QueueMode.Name(mode))  # type: ignore[arg-type]
        return live

    def _transition(
        self,
        op: _Op,
        s: _Session,
        live: _Live,
        new: int,
        ev_type: int,
        reason: str,
        actor: str,
        error_kind: str = "",
        text: str = "",
    ) -> None:
        old = live.row.state
        live.row.state = new
        op.runs[live.row.run_id] = live
        self._event(op, s, ev_type, run=live.row, state=new, reason=reason, error_kind=error_kind, text=text)
        self._audit_transition(live.row, old, new, reason, actor)

    def _start(self, op: _Op, s: _Session, live: _Live) -> None:
        live.row.start_time = time.time()
        s.active = live.row.run_id
        self._transition(op, s, live, STARTED, pb.RUN_EVENT_TYPE_RUN_STARTED, "", "system")
        op.after.append(lambda: self._launch(live))

    def _launch(self, live: _Live) -> None:
        if self._stopping or live.row.state not in ACTIVE:
            return
        cfg = self.config.config
        a = cfg.server.agent
        spec = RunSpec(
            run_id=live.row.run_id,
            session_key=live.row.session_key,
            channel=live.row.channel,
            inputs=tuple(AgentInput(i.message_id, i.sender, i.text) for i in live.row.inputs),
            attempt=live.row.attempt,
            deadline=time.time() + _seconds(a.run_timeout, 120.0),
        )
        hooks = AgentHooks(
            on_chunk=lambda text: self._on_chunk(live, text),
            on_steer_result=lambda ok, ids: self._on_steer_result(live, ok, ids),
        )
        try:
            traced = self._trace.running(live.row.run_id, live.row.causation) if self._trace else None
            with traced or contextlib.nullcontext():
                live.agent_run = self.agents.for_config(cfg).open(spec, hooks)
                live.driver = asyncio.ensure_future(self._drive(live, spec.deadline))
        except Exception as e:
            log.exception("agent failed to open a run", extra={"run_id": live.row.run_id})
            failure = Failure("agent", f"cannot open the run: {e}")
            live.driver = asyncio.ensure_future(self._finish_soon(live, failure))
            return
        if live.row.state == CANCEL_REQUESTED:
            self._signal_cancel(live)

    async def _finish_soon(self, live: _Live, outcome: Outcome) -> None:
        self._finish(live, outcome)

    async def _drive(self, live: _Live, deadline: float) -> None:
        assert live.agent_run is not None
        try:
            outcome: Outcome = await asyncio.wait_for(
                live.agent_run.result(), max(deadline - time.time(), 0.001)
            )
        except TimeoutError:
            outcome = Failure("timeout", "the run exceeded server.agent.run_timeout")
        except asyncio.CancelledError:
            if self._stopping or not live.forced:
                raise
            outcome = Cancelled(forced=True)
        except Exception as e:
            log.warning("agent failed", extra={"run_id": live.row.run_id, "error": repr(e)})
            outcome = Failure("agent", str(e) or repr(e))
        if not self._stopping:
            self._finish(live, outcome)

    def _on_chunk(self, live: _Live, text: str) -> None:
        if live.row.state not in ACTIVE or not text:
            return
        s = self._sessions[live.row.session_key]
        with self._op() as op:
            # The row's output column is written at the next state transition; until then the chunks
            # are durable as RUN_OUTPUT events (rewriting the growing row per chunk costs too much).
            live.row.output += text
            self._event(op, s, pb.RUN_EVENT_TYPE_RUN_OUTPUT, run=live.row, state=live.row.state, text=text)

    def _steered(self, op: _Op, s: _Session, live: _Live, inp: AgentInput) -> None:
        live.row.inputs.append(InputRow(inp.message_id, inp.sender, inp.text))
        live.row.steered.append(inp.text)
        op.runs[live.row.run_id] = live
        self._event(op, s, pb.RUN_EVENT_TYPE_MESSAGE_STEERED, run=live.row, message_id=inp.message_id,
                    state=live.row.state, text=inp.text, sender=inp.sender)  # fmt: skip

    def _on_steer_result(self, live: _Live, accepted: bool, ids: list[str]) -> None:
        taken = [live.pending_steer.pop(i) for i in ids if i in live.pending_steer]
        if not taken:
            return
        s = self._sessions[live.row.session_key]
        with self._op() as op:
            for inp in taken:
                if accepted and live.row.state in ACTIVE:
                    self._steered(op, s, live, inp)
                else:
                    self._steer_fallback(op, s, inp)
        self._update_depth()

    def _steer_fallback(self, op: _Op, s: _Session, inp: AgentInput) -> None:
        """A steer the agent could not take becomes a followup run (never lost)."""
        now = time.time()
        if not self._make_room(op, s, inp, now):
            self.store.set_message_run(inp.message_id, "")
            return
        live = self._new_run(op, s, FOLLOWUP, [inp], now, self._causation_of([inp.message_id]))
        self._enqueue(op, s, _Entry(s.next_pos(), "run", live.row.run_id, receive_time=now, mode=FOLLOWUP))
        self.store.set_message_run(inp.message_id, live.row.run_id)

    def _request_cancel(self, op: _Op, s: _Session, live: _Live, reason: str, actor: str) -> None:
        live.row.cancel_request_time = time.time()
        live.row.cancel_reason = reason
        live.cancel_mono = time.perf_counter()
        self._transition(op, s, live, CANCEL_REQUESTED, pb.RUN_EVENT_TYPE_RUN_CANCEL_REQUESTED, reason, actor)
        op.after.append(lambda: self._signal_cancel(live))

    def _signal_cancel(self, live: _Live) -> None:
        if live.agent_run is not None:
            try:
                live.agent_run.cancel(live.row.cancel_reason)
            except Exception:
                log.exception("agent cancel failed", extra={"run_id": live.row.run_id})
        if live.force is None and live.driver is not None:
            loop = asyncio.get_running_loop()
            live.force = loop.call_later(self._cancel_deadline(), self._force_cancel, live)

    def _force_cancel(self, live: _Live) -> None:
        if live.row.state != CANCEL_REQUESTED or live.driver is None or live.driver.done():
            return
        log.warning("forcing cancel after server.queue.cancel_deadline", extra={"run_id": live.row.run_id})
        live.forced = True
        live.driver.cancel()

    def _finish(self, live: _Live, outcome: Outcome) -> None:
        row = live.row
        if row.state in TERMINAL:
            return
        s = self._sessions[row.session_key]
        with self._op() as op:
            if row.state == CANCEL_REQUESTED:
                if isinstance(outcome, Final) and len(outcome.text) > len(row.output):
                    row.output = outcome.text  # kept as partial output; never delivered
                self._terminal(op, s, live, CANCELLED, reason="forced" if live.forced else row.cancel_reason,
                               actor="system")  # fmt: skip
            elif isinstance(outcome, Final):
                row.output = outcome.text
                self._write_final(op, s, live, outcome.text)
                self._terminal(op, s, live, COMPLETED, actor="system", text=outcome.text)
            elif isinstance(outcome, Cancelled):
                self._terminal(op, s, live, ERROR, reason="agent stopped without a cancel", actor="system",
                               error_kind="agent", error_message="the agent reported cancelled without a cancel")  # fmt: skip
            else:
                self._terminal(op, s, live, ERROR, reason=outcome.kind, actor="system",
                               error_kind=outcome.kind, error_message=outcome.message)  # fmt: skip
        self._update_depth()

    def _terminal(
        self,
        op: _Op,
        s: _Session,
        live: _Live,
        state: int,
        *,
        reason: str = "",
        actor: str,
        error_kind: str = "",
        error_message: str = "",
        text: str = "",
    ) -> None:
        """The one place a run ends: one terminal event, the session moves on."""
        row = live.row
        if row.state in TERMINAL:
            return
        row.end_time = time.time()
        if state == ERROR:
            row.error_kind, row.error_message = error_kind, error_message
        ev_type: int = {
            CANCELLED: pb.RUN_EVENT_TYPE_RUN_CANCELLED,
            COMPLETED: pb.RUN_EVENT_TYPE_RUN_COMPLETED,
            ERROR: pb.RUN_EVENT_TYPE_RUN_ERROR,
        }[state]  # type: ignore[index]
        self._transition(op, s, live, state, ev_type, reason, actor, error_kind=error_kind, text=text)
        if live.force is not None:
            live.force.cancel()
        if state == CANCELLED and live.cancel_mono is not None:
            metrics.CANCEL_TO_CANCELLED.observe(
                time.perf_counter() - live.cancel_mono,
                tracing.exemplar(tracing.traceparent_of(row.causation)),
            )
        if state == COMPLETED and live.submit_mono is not None:
            metrics.SUBMIT_TO_FINAL.observe(
                time.perf_counter() - live.submit_mono,
                tracing.exemplar(tracing.traceparent_of(row.causation)),
            )
        self._runs.pop(row.run_id, None)
        # Steer inputs still unanswered become followups: they are never lost.
        pending, live.pending_steer = list(live.pending_steer.values()), {}
        was_active = s.active == row.run_id
        if was_active:
            s.active = ""
        for inp in pending:
            self._steer_fallback(op, s, inp)
        if was_active:
            self._advance(op, s)

    def _advance(self, op: _Op, s: _Session) -> None:
        """Start the session's next run when it is idle: the head run, or the merged collect buffer."""
        if s.active or not s.queue or self._stopping:
            return
        head = s.queue[0]
        if head.kind == "run":
            self._dequeue(s, head)
            self._start(op, s, self._runs[head.run_id])
            return
        ready = s.last_collect + self._quiet_window()
        now = time.time()
        if now < ready:
            self._schedule_advance(s, ready - now)
            return
        batch: list[_Entry] = []
        for e in s.queue:
            if e.kind != "collect":
                break
            batch.append(e)
        inputs = [e.message for e in batch if e.message is not None]
        for e in batch:
            self._dequeue(s, e)
        live = self._new_run(op, s, COLLECT, inputs, now, self._causation_of([i.message_id for i in inputs]))
        for i in inputs:
            self.store.set_message_run(i.message_id, live.row.run_id)
        self._start(op, s, live)

    def _causation_of(self, message_ids: list[str]) -> bytes:
        """Causation of a run made of these messages: the first user message's (a user is in the
        loop), else the first message's (so a chain of reactions stays one chain for the guard)."""
        found: list[bytes] = []
        for mid in message_ids:
            m = self.store.message(mid)
            if m is None:
                continue
            cz = common_pb2.Causation.FromString(m.causation) if m.causation else common_pb2.Causation()
            if cz.origin in (common_pb2.ORIGIN_UNSPECIFIED, common_pb2.ORIGIN_USER):
                return m.causation
            found.append(m.causation)
        return found[0] if found else b""

    def _schedule_advance(self, s: _Session, delay: float) -> None:
        if s.timer is not None:
            s.timer.cancel()
        loop = asyncio.get_running_loop()
        s.timer = loop.call_later(delay, self._advance_later, s)

    def _advance_later(self, s: _Session) -> None:
        s.timer = None
        if s.active or not s.queue or self._stopping:
            return
        with self._op() as op:
            self._advance(op, s)
        self._update_depth()

    # --- the outbox and speech -----------------------------------------------------------------

    def _write_final(self, op: _Op, s: _Session, live: _Live, text: str) -> None:
        row = live.row
        reply_id = reply_id_for_run(row.run_id)
        cfg = self.config.config
        speak = targeting.tts_enabled(cfg, targeting.Target(s.key, s.channel)).value
        reply = pb.Reply(
            reply_id=reply_id, kind=pb.REPLY_KIND_FINAL, run_id=row.run_id, session_key=s.key, channel=s.channel,
            text=text, create_time=_ts(time.time()),
        )  # fmt: skip
        if row.causation:
            reply.causation.ParseFromString(row.causation)
        if speak:
            inserted = self.store.insert_reply(
                ReplyRow(
                    reply_id,
                    None,
                    reply.kind,
                    row.run_id,
                    s.key,
                    s.channel,
                    "",
                    "pending",
                    reply.SerializeToString(),
                )  # fmt: skip
            )
            if inserted:
                op.after.append(lambda: self._spawn_speech(reply))
        else:
            self._cursor += 1
            reply.cursor = self._cursor
            reply.delivery = pb.DELIVERY_MODE_TEXT
            inserted = self.store.insert_reply(
                ReplyRow(
                    reply_id,
                    reply.cursor,
                    reply.kind,
                    row.run_id,
                    s.key,
                    s.channel,
                    "",
                    "none",
                    reply.SerializeToString(),
                )  # fmt: skip
            )
            if inserted:
                op.replies.append(reply)
            else:
                self._cursor -= 1
        if not inserted:
            metrics.DUPLICATE_FINALS_SUPPRESSED.inc()
            log.warning("second final for a run suppressed", extra={"run_id": row.run_id})
        row.final_reply_id = reply_id

    def _spawn_speech(self, reply: pb.Reply, speak_request: speech.SpeechRequest | None = None) -> None:
        if self._stopping:
            return
        task = asyncio.ensure_future(self._speech_task(reply, speak_request))
        self._speech_tasks.add(task)
        task.add_done_callback(self._speech_tasks.discard)

    async def _speech_task(self, reply: pb.Reply, req: speech.SpeechRequest | None) -> None:
        async with self._speech_sem:
            request = req or speech.request_for(self.config.config, reply.text)
            if self._trace is None:
                outcome = await speech.speak(self.synthesizer, request)
            else:
                with self._trace.speech(reply):
                    outcome = await speech.speak(self.synthesizer, request)
                    self._trace.speech_outcome(outcome.fallback_reason, outcome.detail)
        if self._stopping:
            return
        s = self._sessions[reply.session_key]
        with self._op() as op:
            self._publish_speech(op, s, reply, outcome)

    def _publish_speech(self, op: _Op, s: _Session, reply: pb.Reply, outcome: speech.SpeechOutcome) -> None:
        row = self.store.reply(reply.reply_id)
        if row is None or row.speech_state != "pending":
            return
        self._cursor += 1
        reply.cursor = self._cursor
        if outcome.audio is not None:
            reply.delivery = pb.DELIVERY_MODE_AUDIO
            reply.audio.CopyFrom(outcome.audio)
        else:
            reply.delivery = pb.DELIVERY_MODE_TEXT_AFTER_FALLBACK
            reply.tts_fallback_reason = outcome.fallback_reason
            metrics.TTS_FALLBACKS.labels(outcome.fallback_reason).inc()
            log.warning(
                "tts fallback: reply sent as text (%s)",
                outcome.fallback_reason,
                extra={"reply_id": reply.reply_id, "run_id": reply.run_id, "reason": outcome.fallback_reason,
                       "detail": outcome.detail},
            )  # fmt: skip
            if self.audit is not None:
                self.audit.record(
                    "tts_fallback", actor="system", reply_id=reply.reply_id, run_id=reply.run_id or None,
                    session=reply.session_key, channel=reply.channel, reason=outcome.fallback_reason,
                    detail=outcome.detail,
                )  # fmt: skip
            self._event(op, s, pb.RUN_EVENT_TYPE_TTS_FALLBACK, message_id="", reason=outcome.fallback_reason,
                        text=reply.text, run=self._run_row_for_event(reply))  # fmt: skip
        self.store.update_reply(reply.reply_id, reply.cursor, "done", reply.SerializeToString())
        op.replies.append(reply)

    def _run_row_for_event(self, reply: pb.Reply) -> RunRow | None:
        if not reply.run_id:
            return None
        return RunRow(reply.run_id, reply.session_key, reply.channel, 0, 0, [])

    # --- PostReply -----------------------------------------------------------------------------

    def post_reply(self, reply: pb.Reply, idempotency_key: str, speak: bool) -> tuple[pb.Reply, bool]:
        known = self.store.reply_by_key(reply.session_key, idempotency_key)
        if known is not None:
            return pb.Reply.FromString(known.data), True
        reply.reply_id = new_id("rpl")
        reply.create_time.CopyFrom(_ts(time.time()))
        cfg = self.config.config
        want_speech = (
            speak and targeting.tts_enabled(cfg, targeting.Target(reply.session_key, reply.channel)).value
        )
        with self._op() as op:
            s = self._session(op, reply.session_key, reply.channel)
            if want_speech:
                self.store.insert_reply(
                    ReplyRow(
                        reply.reply_id,
                        None,
                        reply.kind,
                        "",
                        s.key,
                        s.channel,
                        idempotency_key,
                        "pending",
                        reply.SerializeToString(),
                    )  # fmt: skip
                )
                op.after.append(lambda: self._spawn_speech(reply))
            else:
                self._cursor += 1
                reply.cursor = self._cursor
                reply.delivery = pb.DELIVERY_MODE_TEXT
                self.store.insert_reply(
                    ReplyRow(
                        reply.reply_id,
                        reply.cursor,
                        reply.kind,
                        "",
                        s.key,
                        s.channel,
                        idempotency_key,
                        "none",
                        reply.SerializeToString(),
                    )  # fmt: skip
                )
                op.replies.append(reply)
        return reply, False

    # --- CancelRun -----------------------------------------------------------------------------

    def cancel(self, run_id: str, session_key: str, scope: int, reason: str, actor: str) -> CancelResult:
        reason = reason or "cancelled"
        if run_id:
            live = self._runs.get(run_id)
            row = live.row if live is not None else self.store.run(run_id)
            if row is None:
                raise errors.not_found("run", run_id)
            if session_key and row.session_key != session_key:
                # Do not reveal that the run exists elsewhere.
                raise errors.not_found("run", run_id, reason="RUN_NOT_IN_SESSION")
            s = self._sessions[row.session_key]
        else:
            found = self._sessions.get(session_key)
            if found is None:
                raise errors.not_found("session", session_key)
            s = found
            live = self._runs.get(s.active) if s.active else None
            row = live.row if live is not None else None
        dropped = 0
        with self._op() as op:
            if scope == pb.CANCEL_SCOPE_SESSION_AND_QUEUE:
                for e in list(s.queue):
                    if live is not None and e.run_id == live.row.run_id:
                        continue
                    dropped += self._drop_entry(op, s, e, reason, actor)
            if row is None:
                result = CancelResult(pb.CANCEL_OUTCOME_NO_ACTIVE_RUN, "", 0, dropped)
            elif row.state in TERMINAL:
                outcome = {
                    COMPLETED: pb.CANCEL_OUTCOME_ALREADY_COMPLETED,
                    CANCELLED: pb.CANCEL_OUTCOME_ALREADY_CANCELLED,
                    ERROR: pb.CANCEL_OUTCOME_ALREADY_ERROR,
                }[row.state]  # type: ignore[index]
                result = CancelResult(outcome, row.run_id, row.state, dropped)
            elif row.state == CANCEL_REQUESTED:
                result = CancelResult(
                    pb.CANCEL_OUTCOME_ALREADY_CANCEL_REQUESTED, row.run_id, row.state, dropped
                )
            elif row.state == QUEUED:
                assert live is not None
                entry = next((e for e in s.queue if e.run_id == row.run_id), None)
                if entry is not None:
                    self._cancel_queued(op, s, entry, reason, actor)
                result = CancelResult(pb.CANCEL_OUTCOME_CANCEL_REQUESTED, row.run_id, live.row.state, dropped)
            else:
                assert live is not None
                self._request_cancel(op, s, live, reason, actor)
                result = CancelResult(
                    pb.CANCEL_OUTCOME_CANCEL_REQUESTED, row.run_id, CANCEL_REQUESTED, dropped
                )
        self._update_depth()
        return result

    # --- reads ---------------------------------------------------------------------------------

    def get_run(self, run_id: str) -> RunRow:
        live = self._runs.get(run_id)
        if live is not None:
            return live.row
        row = self.store.run(run_id)
        if row is None:
            raise errors.not_found("run", run_id)
        return row

    def list_runs(
        self, session_key: str, state: int, page_size: int, before_seq: int
    ) -> tuple[list[RunRow], int]:
        rows = self.store.list_runs(session_key, state, before_seq, page_size + 1)
        more = len(rows) > page_size
        rows = rows[:page_size]
        out = [self._runs[r.run_id].row if r.run_id in self._runs else r for _, r in rows]
        return out, (rows[-1][0] if more and rows else 0)

    def get_session(self, session_key: str) -> pb.Session:
        s = self._sessions.get(session_key)
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
            out.active_run_state = self._runs[s.active].row.state  # type: ignore[assignment]
        for e in s.queue:
            if e.kind == "collect" and e.message is not None:
                m = e.message
            else:
                live = self._runs.get(e.run_id)
                if live is None or not live.row.inputs:
                    continue
                first = live.row.inputs[0]
                m = AgentInput(first.message_id, first.sender, first.text)
            out.queue.append(
                pb.QueuedMessage(
                    message_id=m.message_id,
                    text=m.text,
                    sender=m.sender,
                    mode=e.mode,  # type: ignore[arg-type]
                    receive_time=_ts(e.receive_time),
                )  # fmt: skip
            )
        return out

    def session_active_state(self, session_key: str) -> int:
        s = self._sessions.get(session_key)
        if s is None or not s.active or s.active not in self._runs:
            return 0
        return self._runs[s.active].row.state

    @property
    def global_seq(self) -> int:
        """Last durable global sequence number."""
        return self._durable_gseq

    @property
    def reply_cursor(self) -> int:
        """Last durable reply cursor."""
        return self._durable_cursor

    def events_after(self, after_seq: int, session_key: str = "") -> list[pb.RunEvent]:
        """Durable events only: a cursor never points past what a crash could take back."""
        rows = self.store.events_after(after_seq, session_key, upto=self._durable_gseq)
        return [pb.RunEvent.FromString(b) for b in rows]

    def replies_after(self, after_cursor: int) -> list[pb.Reply]:
        return [
            pb.Reply.FromString(b) for b in self.store.replies_after(after_cursor, upto=self._durable_cursor)
        ]


def _with_origin(causation: common_pb2.Causation | None) -> common_pb2.Causation:
    """A submitted message's causation with its origin said: a message without one was sent by a
    person through a channel (ORIGIN_USER), so its events and runs are labelled so, never UNSPECIFIED."""
    out = common_pb2.Causation()
    if causation is not None:
        out.CopyFrom(causation)
    if out.origin == common_pb2.ORIGIN_UNSPECIFIED:
        out.origin = common_pb2.ORIGIN_USER
    return out


def run_to_proto(row: RunRow) -> pb.Run:
    r = pb.Run(
        run_id=row.run_id,
        session_key=row.session_key,
        channel=row.channel,
        state=row.state,  # type: ignore[arg-type]
        message_ids=[i.message_id for i in row.inputs],
        mode=row.mode,  # type: ignore[arg-type]
        error_kind=row.error_kind,
        error_message=row.error_message,
        output=row.output,
        final_reply_id=row.final_reply_id,
        create_time=_ts(row.create_time),
        attempt=row.attempt,
        steered_texts=row.steered,
        cancel_reason=row.cancel_reason,
    )
    if row.start_time is not None:
        r.start_time.CopyFrom(_ts(row.start_time))
    if row.cancel_request_time is not None:
        r.cancel_request_time.CopyFrom(_ts(row.cancel_request_time))
    if row.end_time is not None:
        r.end_time.CopyFrom(_ts(row.end_time))
    return r
