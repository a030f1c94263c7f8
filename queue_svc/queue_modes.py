"""The queue modes of run control: where a new message goes, and the session's queue it waits in.

`QueueModes.route` decides a submitted message's fate from the session's state and its effective
mode: it starts a run on an idle session, steers the active run, interrupts it (cancel requested,
the interrupter queued at the front), queues a followup run, or joins the collect buffer; a full
queue applies the drop policy first (drop the new message, or the oldest entries). The other
methods keep the queue: every entry an operation adds or removes goes through `enqueue`/`dequeue`,
which keep memory, the store's queue rows and the depth counter in step (loading a session, and a
replica stepping down from one, move entries into or out of memory only: ledger.py, replica.py).
A queued run leaves the queue only by starting (RunControl._advance) or by `cancel_queued` (one
CANCEL_REQUESTED, then one CANCELLED).

Like the rest of run control, every method here runs inside an operation (`op`) and never awaits;
the run life cycle itself (new runs, start, cancel, the one terminal event) stays in run_control.py.
Invariant kept here: a dropped message always gets a MESSAGE_DROPPED event (never silently lost).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from flynn.v1 import config_pb2
from flynn.v1 import run_control_pb2 as pb

from queue_svc import metrics
from queue_svc.agents import AgentInput
from queue_svc.group_commit import Op
from queue_svc.ledger import (
    CANCEL_REQUESTED,
    CANCELLED,
    COLLECT,
    FOLLOWUP,
    INTERRUPT,
    STARTED,
    STEER,
    _Entry,
    _Live,
    _Session,
)
from queue_svc.store import Disposition, QueueEntryRow, QueueMode

if TYPE_CHECKING:
    from queue_svc.run_control import RunControl


class QueueModes:
    """Routes submitted messages by queue mode and keeps each session's queue of one RunControl."""

    def __init__(self, rc: RunControl) -> None:
        self.rc = rc

    def route(
        self, op: Op, s: _Session, mode: QueueMode, inp: AgentInput, now: float, cz: bytes, actor: str
    ) -> tuple[Disposition, str, str]:
        """Decide what happens to a new message; returns (disposition, run id, interrupted run id)."""
        rc = self.rc
        active = rc._runs.get(s.active) if s.active else None
        if active is None and not s.queue:
            live = rc._new_run(op, s, mode, [inp], now, cz)
            rc._start(op, s, live)
            return pb.DISPOSITION_STARTED, live.row.run_id, ""
        if (
            mode == STEER
            and active is not None
            and active.row.state == STARTED
            and active.agent_run is not None
        ):
            taken = active.agent_run.offer_steer([inp])
            if taken is True:
                rc._steered(op, s, active, inp)
                return pb.DISPOSITION_STEERED, active.row.run_id, ""
            if taken is None:
                active.pending_steer[inp.message_id] = inp
                return pb.DISPOSITION_STEERED, active.row.run_id, ""
        if mode == STEER:
            # No active run that can take it (idle with a queue, cancelling, or a non-steerable agent).
            mode = FOLLOWUP
        if mode == INTERRUPT:
            return self._interrupt(op, s, active, inp, now, cz, actor)
        if not self.make_room(op, s, inp, now):
            return pb.DISPOSITION_DROPPED, "", ""
        if mode == FOLLOWUP:
            live = rc._new_run(op, s, FOLLOWUP, [inp], now, cz)
            self.enqueue(op, s, _Entry(s.next_pos(), "run", live.row.run_id, receive_time=now, mode=FOLLOWUP))
            return pb.DISPOSITION_QUEUED, live.row.run_id, ""
        # collect
        self.enqueue(op, s, _Entry(s.next_pos(), "collect", message=inp, receive_time=now, mode=COLLECT))
        s.last_collect = now
        if not s.active:
            rc._advance(op, s)
        return pb.DISPOSITION_COLLECTED, "", ""

    def _interrupt(
        self, op: Op, s: _Session, active: _Live | None, inp: AgentInput, now: float, cz: bytes, actor: str
    ) -> tuple[Disposition, str, str]:
        """INTERRUPT: cancel the active run and queue the new one at the front."""
        rc = self.rc
        # Earlier interrupters that have not started yet are superseded by this one.
        for e in [e for e in s.queue if e.kind == "run" and e.mode == INTERRUPT]:
            self.cancel_queued(op, s, e, reason="superseded", actor=actor)
        if not self.make_room(op, s, inp, now):
            return pb.DISPOSITION_DROPPED, "", ""
        interrupted = ""
        if active is not None:
            interrupted = active.row.run_id
            if active.row.state == STARTED:
                rc._request_cancel(op, s, active, reason="interrupt", actor=actor)
        live = rc._new_run(op, s, INTERRUPT, [inp], now, cz)
        self.enqueue(
            op, s, _Entry(s.next_pos(front=True), "run", live.row.run_id, receive_time=now, mode=INTERRUPT)
        )
        rc._advance(op, s)
        if interrupted:
            return pb.DISPOSITION_INTERRUPTED_PREVIOUS, live.row.run_id, interrupted
        started = s.active == live.row.run_id
        return (pb.DISPOSITION_STARTED if started else pb.DISPOSITION_QUEUED), live.row.run_id, ""

    def make_room(self, op: Op, s: _Session, inp: AgentInput, now: float) -> bool:
        """Apply the cap and drop policy before queueing `inp`; False when `inp` itself is dropped."""
        rc = self.rc
        if len(s.queue) < rc._cap():
            return True
        if rc._q.drop == config_pb2.DROP_POLICY_NEW:
            rc._event(
                op, s, pb.RUN_EVENT_TYPE_MESSAGE_DROPPED, message_id=inp.message_id, reason="queue_full_new"
            )
            metrics.MESSAGES_DROPPED.labels("queue_full_new").inc()
            return False
        while len(s.queue) >= rc._cap():
            oldest = min(s.queue, key=lambda e: e.receive_time)
            self.drop_entry(op, s, oldest, "queue_full_old", "system")
        return True

    def enqueue(self, op: Op, s: _Session, e: _Entry) -> None:
        """Add `e` to the session's queue (at the front when its position says so) and to the store."""
        if e.pos < (s.queue[0].pos if s.queue else 2.0):
            s.queue.insert(0, e)
        else:
            s.queue.append(e)
        self.rc._depth += 1
        self.rc.store.add_queue_entry(
            QueueEntryRow(s.key, e.pos, e.kind, e.run_id, e.message.message_id if e.message else "")
        )

    def dequeue(self, s: _Session, e: _Entry) -> None:
        """Take `e` out of the session's queue and the store."""
        s.queue.remove(e)
        self.rc._depth -= 1
        self.rc.store.remove_queue_entry(s.key, e.pos)

    def drop_entry(self, op: Op, s: _Session, e: _Entry, reason: str, actor: str) -> int:
        """Drop a queue entry with a MESSAGE_DROPPED event per message; returns how many messages."""
        rc = self.rc
        if e.kind == "collect":
            assert e.message is not None
            self.dequeue(s, e)
            rc._event(
                op, s, pb.RUN_EVENT_TYPE_MESSAGE_DROPPED, message_id=e.message.message_id, reason=reason
            )
            metrics.MESSAGES_DROPPED.labels(reason).inc()
            return 1
        live = rc._runs[e.run_id]
        for i in live.row.inputs:
            rc._event(
                op, s, pb.RUN_EVENT_TYPE_MESSAGE_DROPPED, run=live.row, message_id=i.message_id, reason=reason
            )
            metrics.MESSAGES_DROPPED.labels(reason).inc()
        self.cancel_queued(op, s, e, reason, actor)
        return len(live.row.inputs)

    def cancel_queued(self, op: Op, s: _Session, e: _Entry, reason: str, actor: str) -> None:
        """A queued run leaves the queue cancelled (it never started, so no agent is told)."""
        rc = self.rc
        live = rc._runs[e.run_id]
        self.dequeue(s, e)
        live.row.cancel_request_time = time.time()
        live.row.cancel_reason = reason
        rc._transition(op, s, live, CANCEL_REQUESTED, pb.RUN_EVENT_TYPE_RUN_CANCEL_REQUESTED, reason, actor)
        rc._terminal(op, s, live, CANCELLED, reason=reason, actor=actor)
