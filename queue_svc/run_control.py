"""Run control's domain: sessions, queue modes, runs, cancel (DESIGN.md §4). No gRPC here.

Concurrency model: everything runs on one asyncio loop, and every domain operation is a synchronous
critical section (`with self._op() as op:`) that mutates memory and queues its writes in the store;
nothing awaits inside it, so operations never interleave. The writes are made durable by group commit
(group_commit.py); events and replies are published only after their transaction committed, so a
watcher never sees an event the store could lose. The pieces:

- ledger.py: the in-memory sessions and live runs, event writing, and the reads;
- group_commit.py: the operation scope, the flush loop, the durable sequence numbers;
- queue_modes.py: where a submitted message goes (steer, interrupt, followup, collect), the
  sessions' queues and the drop policy;
- outbox.py: finals and posted replies, and their delivery as text or speech;
- agent_driver.py: the agent side of a started run (launch, stream, cancel signal, forced cancel);
- this module: what the operations do (submit, cancel, the life of a run and its one terminal event).

Invariants the code keeps (and tests check):
- a session has at most one active run (started or cancel_requested);
- every run gets exactly one terminal event (guarded by `_terminal`);
- at most one final reply per run (the outbox's unique index; a refused second one is counted);
- a run whose cancel was acknowledged never delivers a final;
- every acknowledged message ends in a run's inputs, in a collect buffer, or in a MESSAGE_DROPPED event.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from dataclasses import dataclass

from flynn.v1 import common_pb2, config_pb2
from flynn.v1 import run_control_pb2 as pb

from flynn_runtime import errors, tracing
from flynn_runtime.audit import AuditLog
from flynn_runtime.config_source import ConfigSource
from flynn_runtime.enum_names import short_names
from flynn_runtime.ids import new_id
from flynn_runtime.timestamps import timestamp
from queue_svc import metrics, speech
from queue_svc.agent_driver import AgentDriver, AgentProvider
from queue_svc.agents import (
    AgentInput,
    Cancelled,
    Final,
    Outcome,
)
from queue_svc.group_commit import Op
from queue_svc.ledger import (
    ACTIVE,
    CANCEL_REQUESTED,
    CANCELLED,
    COLLECT,
    COMPLETED,
    ERROR,
    FOLLOWUP,
    QUEUED,
    STARTED,
    TERMINAL,
    Ledger,
    _Entry,
    _Live,
    _Session,
)
from queue_svc.outbox import Outbox, reply_id_for_run
from queue_svc.ownership import Ownership
from queue_svc.queue_modes import QueueModes
from queue_svc.replica import Replica
from queue_svc.store import (
    Disposition,
    InputRow,
    MessageRow,
    QueueMode,
    QueueStore,
    RunRow,
    RunState,
)

__all__ = [
    "AgentProvider",
    "CancelInput",
    "RunControl",
    "SubmitInput",
    "reply_id_for_run",
    "run_to_proto",
]

log = logging.getLogger(__name__)

_ALREADY: dict[RunState, pb.CancelOutcome.ValueType] = {
    COMPLETED: pb.CANCEL_OUTCOME_ALREADY_COMPLETED,
    CANCELLED: pb.CANCEL_OUTCOME_ALREADY_CANCELLED,
    ERROR: pb.CANCEL_OUTCOME_ALREADY_ERROR,
}
DISPOSITION_NAMES: dict[int, str] = short_names(pb.Disposition)


# --- inputs and results of operations --------------------------------------------------------


@dataclass(frozen=True)
class SubmitInput:
    session_key: str
    channel: str
    sender: str
    text: str
    idempotency_key: str
    mode_override: QueueMode = config_pb2.QUEUE_MODE_UNSPECIFIED
    causation: common_pb2.Causation | None = None
    actor: str = "system"


@dataclass(frozen=True)
class SubmitResult:
    message_id: str
    disposition: Disposition
    run_id: str
    effective_mode: pb.EffectiveMode
    original_disposition: Disposition = pb.DISPOSITION_UNSPECIFIED
    interrupted_run_id: str = ""
    event_seq: int = 0
    #: The MESSAGE_RECEIVED event: its global_seq is final once the operation is durable (with
    #: several replicas the database numbers it at commit).
    event: pb.RunEvent | None = None

    @property
    def durable_event_seq(self) -> int:
        return self.event.global_seq if self.event is not None else self.event_seq


@dataclass(frozen=True)
class CancelResult:
    outcome: pb.CancelOutcome.ValueType
    run_id: str
    state: RunState
    dropped_messages: int = 0


@dataclass(frozen=True)
class CancelInput:
    run_id: str
    session_key: str
    scope: int
    reason: str = ""
    actor: str = "system"


class RunControl(Ledger):
    """The operations of run control on one session ledger: SubmitMessage, CancelRun, PostReply, and
    the life of each run (queued → started → cancel_requested → cancelled | completed | error).

    Each public operation runs as one critical section and returns at once; the caller acknowledges
    after `await durable()`. What an operation must do *outside* the store is deferred to `op.after`,
    run by group commit once the batch is durable: launching the agent for a started run, telling
    the agent about a cancel (`AgentDriver.signal_cancel`: the hop between "cancel acknowledged" and
    "agent told"), and starting speech for a reply (outbox.py). So an agent never acts on a state a
    crash could take back, and a cancel reaches the agent one commit after it was requested, not
    inside the CancelRun call. Where a submitted message goes is decided by `self.modes`
    (queue_modes.py), which calls back into the run life cycle here (new run, start, cancel, end).
    """

    def __init__(
        self,
        store: QueueStore,
        config: ConfigSource,
        agents: AgentProvider,
        synthesizer: speech.Synthesizer | None = None,
        audit: AuditLog | None = None,
        speech_concurrency: int = 32,
        session_idle_seconds: float = 60.0,
        ownership: Ownership | None = None,
    ) -> None:
        super().__init__(store, config, audit)
        self.agents = agents
        self.outbox = Outbox(self, synthesizer, speech_concurrency)
        self.driver = AgentDriver(self, agents)
        self.modes = QueueModes(self)
        self.session_idle_seconds = session_idle_seconds
        self._evictor: asyncio.Task[None] | None = None
        #: With PostgreSQL: one of N replicas owning sessions by lease (replica.py).
        self.replica = Replica(self, ownership) if ownership is not None else None

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Load state and recover from a crash (DESIGN.md §4 crash policy)."""
        if self.replica is not None:
            await self.replica.start()
            # Idle sessions leave memory on PostgreSQL too (their leases are released: replica.py).
            self._evictor = asyncio.ensure_future(self._evict_loop(self.session_idle_seconds))
            return
        self.commit.resume(await self.store.max_global_seq(), await self.store.max_reply_cursor())
        # Scrapes read counters and live runs, never every session.
        metrics.QUEUE_DEPTH.set_function(lambda: self._depth)
        metrics.RUNS_ACTIVE.set_function(lambda: sum(1 for r in self._runs.values() if r.row.state in ACTIVE))
        await self._load()
        pending_speech = await self.store.pending_speech()
        for r in pending_speech:
            await self._load_session(r.session_key)
        crashed = [live for live in self._runs.values() if live.row.state in ACTIVE]
        with self._op() as op:
            for live in crashed:
                self._recover_run(op, live)
            for s in self._sessions.values():
                self._advance(op, s)
            self.outbox.recover(op, pending_speech)
        await self.durable()
        self._evictor = asyncio.ensure_future(self._evict_loop(self.session_idle_seconds))

    async def _own(self, key: str) -> None:
        if self.replica is not None:
            await self.replica.own(key)

    def owns(self, key: str) -> bool:
        return self.replica is None or self.replica.owns(key)

    def forget_owner(self, key: str) -> None:
        """The owner remembered for `key` did not serve a forwarded call: look it up afresh next time."""
        if self.replica is not None:
            self.replica.ownership.drop_hint(key)

    async def _evicted(self, keys: list[str]) -> None:
        if self.replica is not None:
            await self.replica.release(keys)

    def _recover_run(self, op: Op, live: _Live) -> None:
        """A run that was active when the process died: the restart policy decides."""
        row = live.row
        s = self._sessions[row.session_key]
        s.active = row.run_id
        if row.state == CANCEL_REQUESTED:
            self._terminal(op, s, live, CANCELLED, reason="restart", actor="system")
        elif self.config.config.server.queue.restart_policy == config_pb2.RESTART_POLICY_RERUN:
            row.attempt += 1
            row.output = ""  # the new attempt streams its own output
            op.runs[row.run_id] = row
            self._event(op, s, pb.RUN_EVENT_TYPE_RUN_STARTED, run=row, state=STARTED, reason="restart_rerun")
            self._audit_transition(row, STARTED, STARTED, "restart_rerun", "system")
            op.after.append(functools.partial(self.driver.launch, live))
        else:
            self._terminal(op, s, live, ERROR, reason="restart", actor="system",
                           error_kind="restart", error_message="run control restarted during the run")  # fmt: skip

    async def stop(self) -> None:
        """Stop driving runs; active runs stay active in the store and the restart policy applies."""
        self._stopping = True
        if self._evictor is not None:
            self._evictor.cancel()
        tasks = self.driver.stop(list(self._runs.values()))
        for s in self._sessions.values():
            if s.timer is not None:
                s.timer.cancel()
        tasks.extend(self.outbox.stop())
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        await self.settle(10.0)
        if self.replica is not None:
            await self.replica.stop()  # the survivors adopt our sessions now
        await self.agents.close()
        if self._trace is not None:
            self._trace.close()

    # --- SubmitMessage -----------------------------------------------------------------------

    async def submit(self, req: SubmitInput) -> SubmitResult:
        with self._pin(req.session_key):
            await self._own(req.session_key)
            await self._load_session(req.session_key)
            return await self._submit(req)

    async def _submit(self, req: SubmitInput) -> SubmitResult:
        known = await self.store.message_by_key(req.session_key, req.idempotency_key)
        if known is not None:
            return self._duplicate(known)
        eff = self.effective_mode(req.session_key, req.channel, req.mode_override)
        now = time.time()
        mid = new_id("msg")
        cz = _with_origin(req.causation).SerializeToString()
        self.store.check_writable()
        with self._op() as op:
            s = self._session(op, req.session_key, req.channel)
            s.message_count += 1
            ev = self._event(
                op, s, pb.RUN_EVENT_TYPE_MESSAGE_RECEIVED, message_id=mid, text=req.text, sender=req.sender,
                causation=cz,
            )  # fmt: skip
            inp = AgentInput(mid, req.sender, req.text, cz)
            disposition, run_id, interrupted = self.modes.route(op, s, eff.mode, inp, now, cz, req.actor)
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
        return SubmitResult(
            mid, disposition, run_id, eff, pb.DISPOSITION_UNSPECIFIED, interrupted, ev.global_seq, ev
        )

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

    # --- runs --------------------------------------------------------------------------------

    def _new_run(
        self, op: Op, s: _Session, mode: QueueMode, inputs: list[AgentInput], now: float, cz: bytes
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
        op.runs[row.run_id] = row
        self._event(op, s, pb.RUN_EVENT_TYPE_RUN_QUEUED, run=row, state=QUEUED)
        self._audit_transition(
            row, pb.RUN_STATE_UNSPECIFIED, QUEUED, "", "system", mode=config_pb2.QueueMode.Name(mode)
        )
        return live

    def _transition(
        self,
        op: Op,
        s: _Session,
        live: _Live,
        new: RunState,
        ev_type: pb.RunEventType.ValueType,
        reason: str,
        actor: str,
        error_kind: str = "",
        text: str = "",
    ) -> None:
        old = live.row.state
        live.row.state = new
        op.runs[live.row.run_id] = live.row
        self._event(op, s, ev_type, run=live.row, state=new, reason=reason, error_kind=error_kind, text=text)
        self._audit_transition(live.row, old, new, reason, actor)

    def _start(self, op: Op, s: _Session, live: _Live) -> None:
        live.row.start_time = time.time()
        s.active = live.row.run_id
        self._transition(op, s, live, STARTED, pb.RUN_EVENT_TYPE_RUN_STARTED, "", "system")
        op.after.append(lambda: self.driver.launch(live))

    def _steered(self, op: Op, s: _Session, live: _Live, inp: AgentInput) -> None:
        live.row.inputs.append(InputRow(inp.message_id, inp.sender, inp.text))
        live.row.steered.append(inp.text)
        op.runs[live.row.run_id] = live.row
        self._event(op, s, pb.RUN_EVENT_TYPE_MESSAGE_STEERED, run=live.row, message_id=inp.message_id,
                    state=live.row.state, text=inp.text, sender=inp.sender)  # fmt: skip

    def _steer_fallback(self, op: Op, s: _Session, inp: AgentInput) -> None:
        """A steer the agent could not take becomes a followup run (never lost)."""
        now = time.time()
        if not self.modes.make_room(op, s, inp, now):
            self.store.set_message_run(inp.message_id, "")
            return
        live = self._new_run(op, s, FOLLOWUP, [inp], now, self._causation_of([inp]))
        self.modes.enqueue(
            op, s, _Entry(s.next_pos(), "run", live.row.run_id, receive_time=now, mode=FOLLOWUP)
        )
        self.store.set_message_run(inp.message_id, live.row.run_id)

    def _request_cancel(self, op: Op, s: _Session, live: _Live, reason: str, actor: str) -> None:
        live.row.cancel_request_time = time.time()
        live.row.cancel_reason = reason
        live.cancel_mono = time.perf_counter()
        self._transition(op, s, live, CANCEL_REQUESTED, pb.RUN_EVENT_TYPE_RUN_CANCEL_REQUESTED, reason, actor)
        op.after.append(lambda: self.driver.signal_cancel(live))

    def _finish(self, live: _Live, outcome: Outcome) -> None:
        row = live.row
        if row.state in TERMINAL or self._runs.get(row.run_id) is not live:
            return  # ended, or this replica stepped down from its session
        s = self._sessions[row.session_key]
        with self._op() as op:
            if row.state == CANCEL_REQUESTED:
                if isinstance(outcome, Final) and len(outcome.text) > len(row.output):
                    row.output = outcome.text  # kept as partial output; never delivered
                self._terminal(op, s, live, CANCELLED, reason="forced" if live.forced else row.cancel_reason,
                               actor="system")  # fmt: skip
            elif isinstance(outcome, Final):
                row.output = outcome.text
                self.outbox.write_final(op, s, live, outcome.text)
                self._terminal(op, s, live, COMPLETED, actor="system", text=outcome.text)
            elif isinstance(outcome, Cancelled):
                self._terminal(op, s, live, ERROR, reason="agent stopped without a cancel", actor="system",
                               error_kind="agent", error_message="the agent reported cancelled without a cancel")  # fmt: skip
            else:
                self._terminal(op, s, live, ERROR, reason=outcome.kind, actor="system",
                               error_kind=outcome.kind, error_message=outcome.message)  # fmt: skip

    def _terminal(
        self,
        op: Op,
        s: _Session,
        live: _Live,
        state: RunState,
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
        ev_type = {
            CANCELLED: pb.RUN_EVENT_TYPE_RUN_CANCELLED,
            COMPLETED: pb.RUN_EVENT_TYPE_RUN_COMPLETED,
            ERROR: pb.RUN_EVENT_TYPE_RUN_ERROR,
        }[state]
        self._transition(op, s, live, state, ev_type, reason, actor, error_kind=error_kind, text=text)
        if live.force is not None:
            live.force.cancel()
        if state == CANCELLED and live.cancel_mono is not None:
            metrics.CANCEL_TO_CANCELLED.observe(
                time.perf_counter() - live.cancel_mono,
                tracing.exemplar(tracing.traceparent_of(row.causation)),
            )
        if state == COMPLETED and live.submit_mono is not None:
            took = time.perf_counter() - live.submit_mono
            causation = row.causation
            metrics.SUBMIT_TO_FINAL.observe(
                took,
                metrics.SUBMIT_TO_FINAL_EXEMPLARS.exemplar(
                    took, lambda: tracing.exemplar(tracing.traceparent_of(causation))
                ),
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

    def _advance(self, op: Op, s: _Session) -> None:
        """Start the session's next run when it is idle: the head run, or the merged collect buffer."""
        if s.active or not s.queue or self._stopping:
            return
        head = s.queue[0]
        if head.kind == "run":
            self.modes.dequeue(s, head)
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
            self.modes.dequeue(s, e)
        live = self._new_run(op, s, COLLECT, inputs, now, self._causation_of(inputs))
        for i in inputs:
            self.store.set_message_run(i.message_id, live.row.run_id)
        self._start(op, s, live)

    @staticmethod
    def _causation_of(inputs: list[AgentInput]) -> bytes:
        """Causation of a run made of these messages: the first user message's (a user is in the
        loop), else the first message's (so a chain of reactions stays one chain for the guard)."""
        for inp in inputs:
            cz = common_pb2.Causation.FromString(inp.causation) if inp.causation else common_pb2.Causation()
            if cz.origin in (common_pb2.ORIGIN_UNSPECIFIED, common_pb2.ORIGIN_USER):
                return inp.causation
        return inputs[0].causation if inputs else b""

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

    async def post_reply(self, reply: pb.Reply, idempotency_key: str, speak: bool) -> tuple[pb.Reply, bool]:
        """PostReply (outbox.py)."""
        return await self.outbox.post_reply(reply, idempotency_key, speak)

    # --- CancelRun -----------------------------------------------------------------------------

    async def cancel(self, req: CancelInput) -> CancelResult:
        """CancelRun: the target run (or the session's active one) moves to cancel_requested; the
        agent is told after the commit (`op.after`), and the run ends cancelled when it stops."""
        s, live, row = await self._cancel_target(req)
        reason = req.reason or "cancelled"
        dropped = 0
        self.store.check_writable()
        with self._op() as op:
            if req.scope == pb.CANCEL_SCOPE_SESSION_AND_QUEUE:
                for e in list(s.queue):
                    if live is not None and e.run_id == live.row.run_id:
                        continue
                    dropped += self.modes.drop_entry(op, s, e, reason, req.actor)
            if row is None:
                return CancelResult(pb.CANCEL_OUTCOME_NO_ACTIVE_RUN, "", pb.RUN_STATE_UNSPECIFIED, dropped)
            if row.state in TERMINAL:
                return CancelResult(_ALREADY[row.state], row.run_id, row.state, dropped)
            if row.state == CANCEL_REQUESTED:
                return CancelResult(
                    pb.CANCEL_OUTCOME_ALREADY_CANCEL_REQUESTED, row.run_id, row.state, dropped
                )
            assert live is not None
            if row.state == QUEUED:
                entry = next((e for e in s.queue if e.run_id == row.run_id), None)
                if entry is not None:
                    self.modes.cancel_queued(op, s, entry, reason, req.actor)
                return CancelResult(pb.CANCEL_OUTCOME_CANCEL_REQUESTED, row.run_id, live.row.state, dropped)
            self._request_cancel(op, s, live, reason, req.actor)
            return CancelResult(pb.CANCEL_OUTCOME_CANCEL_REQUESTED, row.run_id, CANCEL_REQUESTED, dropped)

    async def _cancel_target(self, req: CancelInput) -> tuple[_Session, _Live | None, RunRow | None]:
        """(session, live run, run row) a cancel is about; NOT_FOUND names what is missing."""
        if req.run_id:
            live = self._runs.get(req.run_id)
            row = live.row if live is not None else await self.store.run(req.run_id)
            if row is None:
                raise errors.not_found("run", req.run_id)
            if req.session_key and row.session_key != req.session_key:
                # Do not reveal that the run exists elsewhere.
                raise errors.not_found("run", req.run_id, reason="RUN_NOT_IN_SESSION")
            if live is None and self.replica is not None:
                await self._own(row.session_key)
                live = self._runs.get(req.run_id)
                row = live.row if live is not None else await self.store.run(req.run_id)
                assert row is not None
            s = await self._load_session(row.session_key)
            assert s is not None, "a run's session is in the store"
            return s, live, row
        await self._own(req.session_key)
        s = await self._load_session(req.session_key)
        if s is None:
            raise errors.not_found("session", req.session_key)
        live = self._runs.get(s.active) if s.active else None
        return s, live, (live.row if live is not None else None)


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
        state=row.state,
        message_ids=[i.message_id for i in row.inputs],
        mode=row.mode,
        error_kind=row.error_kind,
        error_message=row.error_message,
        output=row.output,
        final_reply_id=row.final_reply_id,
        create_time=timestamp(row.create_time),
        attempt=row.attempt,
        steered_texts=row.steered,
        cancel_reason=row.cancel_reason,
    )
    if row.start_time is not None:
        r.start_time.CopyFrom(timestamp(row.start_time))
    if row.cancel_request_time is not None:
        r.cancel_request_time.CopyFrom(timestamp(row.cancel_request_time))
    if row.end_time is not None:
        r.end_time.CopyFrom(timestamp(row.end_time))
    return r
