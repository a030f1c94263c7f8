"""Spans of run phases, made from run events (one hook: RunControl._event calls `event`).

Only built when tracing is on (RunControl holds None otherwise). The run's trace context is the
traceparent in its causation (stamped on each message by SubmitMessage, persisted with the message
and the run), so a phase recorded after a queue wait or a restart joins the message's trace.

Spans (docs/operations/OBSERVABILITY.md, "Traces"), all children of the run's context unless said:

    flynn.run.queued            run queued -> started (or cancelled while queued); recorded at its end
    flynn.run.collected         collect window: first message of the buffer -> the run merging them; links to each
    flynn.run.merged            a steer message merged into the running run; links to the message
    flynn.run.running           started -> terminal; open while the run runs (the agent call is its child)
    flynn.run.cancel_requested  the cancel; links to the span that asked for it (CancelRun, an interrupt)
    flynn.run.cancelled         cancel requested -> cancelled
    flynn.run.final             the final reply written (completed): an event of flynn.run.running
    flynn.message.dropped       a message dropped (cap, cancel of its queue); child of the message
    flynn.reply.tts_fallback    the reply went out as text because speech failed
    flynn.reply.speech          synthesis of a spoken reply (the Voice/Synthesize call is its child)
    flynn.reply.delivered       a reply sent on a stream opened directly (flynn_runtime/delivery_trace.py)
"""

from __future__ import annotations

import contextlib
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import Any

from flynn.v1 import config_pb2
from flynn.v1 import run_control_pb2 as pb

from flynn_runtime import tracing
from flynn_runtime.enum_names import short_name, short_names
from flynn_runtime.timestamps import seconds_of
from queue_svc.store import RunRow

QUEUED_MIN_SECONDS = 0.001  # below this a run started in the operation that made it: no queued span
MAX_REMEMBERED = 100_000  # traceparents of messages not yet in a run (collect buffers, pending steers)

_MODES: dict[int, str] = short_names(config_pb2.QueueMode)
_STATES: dict[int, str] = short_names(pb.RunState)


# What the running span carries from its start (not set again when it ends).
_RUNNING_HAS = frozenset({"flynn.run.id", "flynn.session"})


def _base(ev: pb.RunEvent) -> dict[str, Any]:
    """What every phase span carries (kept small: each attribute is encoded and exported)."""
    a: dict[str, Any] = {"flynn.run.id": ev.run_id} if ev.run_id else {"flynn.session": ev.session_key}
    if ev.message_id:
        a["flynn.message.id"] = ev.message_id
    if ev.reason:
        a["flynn.reason"] = ev.reason
    return a


def _run(attrs: dict[str, Any], ev: pb.RunEvent, row: RunRow | None) -> dict[str, Any]:
    """`attrs` plus what describes the run (the running and collected spans)."""
    out = dict(attrs, **{"flynn.session": ev.session_key})
    if row is not None and row.inputs:
        if len(row.inputs) == 1:  # a plain string: a list attribute costs several times more to record
            out["flynn.message.id"] = row.inputs[0].message_id
        else:
            out["flynn.run.message_ids"] = [i.message_id for i in row.inputs]
        out["flynn.queue.mode"] = _MODES.get(row.mode, str(row.mode))
        if row.attempt > 1:
            out["flynn.run.attempt"] = row.attempt
    return out


def _queued(attrs: dict[str, Any], row: RunRow) -> dict[str, Any]:
    return dict(attrs, **{"flynn.queue.mode": _MODES.get(row.mode, str(row.mode))})


class RunTracer:
    def __init__(self) -> None:
        self._running: dict[str, Any] = {}  # run id -> open flynn.run.running span
        # message id -> (traceparent, received at): messages not in a run yet
        self._messages: OrderedDict[str, tuple[str, float]] = OrderedDict()

    def _remember(self, message_id: str, traceparent: str, received: float) -> None:
        self._messages[message_id] = (traceparent, received)
        while len(self._messages) > MAX_REMEMBERED:
            self._messages.popitem(last=False)

    def _instant(self, name: str, parent: Any, attrs: dict[str, Any], links: list[Any] | None = None) -> None:
        tracing.end_span(tracing.start_span(name, parent=parent, attributes=attrs, links=links or ()))

    def _parent(self, run_id: str, traceparent: str) -> Any:
        """Inside the running span while there is one, else the run's own context."""
        running = self._running.get(run_id)
        if running is not None:
            from opentelemetry import trace

            return trace.set_span_in_context(running)
        return traceparent or None

    def event(self, ev: pb.RunEvent, row: RunRow | None) -> None:
        """Record the phase `ev` marks. Called inside the operation, before its commit."""
        t = ev.type
        tp = ev.causation.traceparent
        if t == pb.RUN_EVENT_TYPE_RUN_OUTPUT or not tracing.sampled(tp):
            return  # no trace to join (accepted while tracing was off), or not sampled: nothing recorded
        if t == pb.RUN_EVENT_TYPE_MESSAGE_RECEIVED:
            self._remember(ev.message_id, tp, seconds_of(ev.time))
            return
        now = time.time()
        attrs = _base(ev)
        if t == pb.RUN_EVENT_TYPE_RUN_QUEUED and row is not None:
            remembered = [(i.message_id, *self._messages.pop(i.message_id, ("", now))) for i in row.inputs]
            if row.mode == config_pb2.QUEUE_MODE_COLLECT:
                # The collect window: from the first message of the buffer to the run that merges them.
                links = [
                    link
                    for mid, mtp, _ in remembered
                    for link in tracing.link_to(mtp, **{"flynn.message.id": mid})
                ]
                attrs = _run(attrs, ev, row)
                attrs["flynn.run.collected"] = len(row.inputs)
                first = min((received for _, _, received in remembered), default=now)
                self._phase("flynn.run.collected", tp, attrs, first, now, links)
        elif t == pb.RUN_EVENT_TYPE_RUN_STARTED and row is not None:
            waited = (row.start_time or now) - row.create_time
            if (
                ev.reason != "restart_rerun" and waited >= QUEUED_MIN_SECONDS
            ):  # a run started at once was never queued
                self._phase("flynn.run.queued", tp, _queued(attrs, row), row.create_time, now)
            attrs = _run(attrs, ev, row)
            if ev.reason == "restart_rerun":
                attrs["flynn.run.restarted"] = True
            old = self._running.pop(ev.run_id, None)
            if old is not None:
                tracing.end_span(old)
            self._running[ev.run_id] = tracing.start_span(
                "flynn.run.running", parent=tp, attributes=attrs, start_time=row.start_time
            )
        elif t == pb.RUN_EVENT_TYPE_MESSAGE_STEERED:
            mtp = self._messages.pop(ev.message_id, ("", now))[0]
            attrs.update(tracing.content("flynn.message.text", ev.text))
            self._instant("flynn.run.merged", self._parent(ev.run_id, tp), attrs,
                          tracing.link_to(mtp, **{"flynn.message.id": ev.message_id}))  # fmt: skip
        elif t == pb.RUN_EVENT_TYPE_MESSAGE_DROPPED:
            mtp = self._messages.pop(ev.message_id, ("", now))[0] or tp
            self._instant("flynn.message.dropped", mtp, attrs)
        elif t == pb.RUN_EVENT_TYPE_RUN_CANCEL_REQUESTED:
            # The span asking for the cancel (CancelRun's, an interrupting message's) is current here.
            links = tracing.link_current(**{"flynn.link": "cancel_caller"})
            self._instant("flynn.run.cancel_requested", self._parent(ev.run_id, tp), attrs, links)
        elif t in (
            pb.RUN_EVENT_TYPE_RUN_CANCELLED,
            pb.RUN_EVENT_TYPE_RUN_COMPLETED,
            pb.RUN_EVENT_TYPE_RUN_ERROR,
        ):
            self._terminal(ev, row, tp, attrs, now)

    def _phase(
        self,
        name: str,
        tp: str,
        attrs: dict[str, Any],
        start: float | None,
        end: float,
        links: list[Any] | None = None,
    ) -> None:
        s = tracing.start_span(name, parent=tp, attributes=attrs, links=links or (), start_time=start or end)
        tracing.end_span(s, end_time=end)

    def _terminal(
        self, ev: pb.RunEvent, row: RunRow | None, tp: str, attrs: dict[str, Any], now: float
    ) -> None:
        state = _STATES.get(ev.state) or short_name(pb.RunState, ev.state)
        attrs["flynn.run.state"] = state
        if row is not None and row.start_time is None:  # ended while queued
            self._phase("flynn.run.queued", tp, _queued(attrs, row), row.create_time, now)
        if ev.type == pb.RUN_EVENT_TYPE_RUN_CANCELLED:
            start = row.cancel_request_time if row is not None else None
            s = tracing.start_span(
                "flynn.run.cancelled", parent=self._parent(ev.run_id, tp), attributes=attrs,
                start_time=start or now,
            )  # fmt: skip
            tracing.end_span(s, end_time=now)
        running = self._running.pop(ev.run_id, None)
        ending: dict[str, Any] = {}  # what the running span's end adds (it has the run's ids already)
        if running is not None:
            ending = {k: v for k, v in attrs.items() if k not in _RUNNING_HAS}
        elif row is not None and row.start_time is not None:
            # Started before a restart (its open span died with the process): record the phase now.
            attrs = _run(attrs, ev, row)
            attrs["flynn.run.recorded_after_restart"] = True
            running = tracing.start_span(
                "flynn.run.running", parent=tp, attributes=attrs, start_time=row.start_time
            )
        if ev.type == pb.RUN_EVENT_TYPE_RUN_COMPLETED:
            # The final reply is written as the run ends: an event of the running span (an instant span
            # of its own, ending with it, would cost a whole span's recording and export per message).
            final: dict[str, Any] = (
                {"flynn.reply.id": row.final_reply_id} if row and row.final_reply_id else {}
            )
            final.update(tracing.content("flynn.reply.text", ev.text))
            if running is not None:
                running.add_event("flynn.run.final", final, timestamp=int(now * 1e9))
            else:  # no row to recreate the running span from: the phase as an instant span
                self._instant("flynn.run.final", tp, dict(attrs, **final))
        if running is not None:
            if ending:
                running.set_attributes(ending)
            error = f"{ev.error_kind}: {ev.reason}" if ev.type == pb.RUN_EVENT_TYPE_RUN_ERROR else ""
            tracing.end_span(running, end_time=now, error=error)

    def running(self, run_id: str, causation: bytes) -> AbstractContextManager[None]:
        """For opening the agent run (which inherits it): the running span, or when the run is not
        recorded (unsampled), its context as it came, so the agent's call carries its sampling decision."""
        span = self._running.get(run_id)
        if span is not None:
            return tracing.activated(span)
        return tracing.joined(tracing.traceparent_of(causation))

    @contextlib.contextmanager
    def speech(self, reply: pb.Reply) -> Iterator[None]:
        """A span around the synthesis of a reply (the Voice/Synthesize call is its child)."""
        tp = reply.causation.traceparent
        if not tracing.sampled(tp):
            with tracing.joined(tp):
                yield
            return
        attrs = {"flynn.reply.id": reply.reply_id}
        if reply.run_id:
            attrs["flynn.run.id"] = reply.run_id
        with tracing.span("flynn.reply.speech", parent=tp, attributes=attrs):
            yield

    def speech_outcome(self, fallback_reason: str, detail: str) -> None:
        """Inside `speech`: a failed synthesis adds flynn.reply.tts_fallback (the reply goes out as text)."""
        if fallback_reason:
            attrs = {"flynn.tts.fallback_reason": fallback_reason, "flynn.tts.detail": detail[:256]}
            tracing.end_span(tracing.start_span("flynn.reply.tts_fallback", attributes=attrs))

    def close(self) -> None:
        """End the spans of runs still running (the process stops; a restart records the rest)."""
        for s in self._running.values():
            s.set_attribute("flynn.run.interrupted_by_stop", True)
            tracing.end_span(s)
        self._running.clear()
