"""Test support for reactions: rule builders and a recording RunControl server.

`RecordingRunControl` is a real gRPC server (threaded, so it keeps serving while a test blocks on
process starts) that implements RunControl.WatchRunEvents / SubmitMessage / PostReply the way run
control does: events with gap-free global_seq, replay after a cursor, then live; SubmitMessage and
PostReply deduplicate by idempotency key. It records every call, so a test can tell a duplicated
action (a second effect) from a harmless replayed call (same key, deduplicated).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
from flynn.v1 import (
    common_pb2,
    config_pb2,
    reactions_pb2,
    reactions_pb2_grpc,
    run_control_pb2,
    run_control_pb2_grpc,
)
from google.protobuf import duration_pb2

from flynn_runtime import config_yaml

Metadata = tuple[tuple[str, str], ...]

#: Rules of the reactions fault tests: an ack and an echo ("got <text>") for every message received.
ACK_AND_ECHO_RULES = """
automation:
  reactions:
    - id: ack-all
      enabled: true
      trigger: {event: message_received}
      priority: 10
      actions:
        - ack: {emoji: "👀"}
    - id: echo
      enabled: true
      trigger: {event: message_received}
      actions:
        - reply: {text: "got {text}"}
"""


def rules_from_yaml(text: str) -> list[config_pb2.ReactionRule]:
    cfg = config_yaml.yaml_to_config(text)
    return list(cfg.automation.reactions)


def rule(
    rule_id: str,
    event: config_pb2.ReactionEventType.ValueType = config_pb2.REACTION_EVENT_TYPE_MESSAGE_RECEIVED,
    *,
    priority: int = 0,
    keywords: tuple[str, ...] = (),
    regex: str = "",
    exclusive: bool = False,
    cooldown_s: float = 0,
    cooldown_key: config_pb2.CooldownKey.ValueType = config_pb2.COOLDOWN_KEY_UNSPECIFIED,
    max_fires: int = 0,
    window_s: float = 0,
    allow_reaction_origin: bool = False,
    max_depth: int = 0,
    enabled: bool = True,
    actions: list[config_pb2.ReactionAction] | None = None,
    **trigger: Any,
) -> config_pb2.ReactionRule:
    r = config_pb2.ReactionRule(
        id=rule_id,
        enabled=enabled,
        priority=priority,
        exclusive=exclusive,
        cooldown_key=cooldown_key,
        allow_reaction_origin=allow_reaction_origin,
        max_depth=max_depth,
        trigger=config_pb2.ReactionTrigger(event=event, keywords=list(keywords), regex=regex, **trigger),
        actions=actions
        or [config_pb2.ReactionAction(reply=config_pb2.ReplyAction(text=f"{rule_id} saw {{text}}"))],
    )
    if cooldown_s:
        r.cooldown.CopyFrom(duration_pb2.Duration(seconds=int(cooldown_s), nanos=int((cooldown_s % 1) * 1e9)))
    if max_fires:
        r.fire_cap.max_fires = max_fires
        r.fire_cap.window.CopyFrom(duration_pb2.Duration(seconds=int(window_s)))
    return r


def submit_action(text: str, session_key: str = "") -> config_pb2.ReactionAction:
    return config_pb2.ReactionAction(
        submit=config_pb2.SubmitMessageAction(text=text, session_key=session_key)
    )


def ack_action(emoji: str = "👀") -> config_pb2.ReactionAction:
    return config_pb2.ReactionAction(ack=config_pb2.AckReactionAction(emoji=emoji))


@dataclass
class Recorded:
    post_reply_calls: list[run_control_pb2.PostReplyRequest] = field(default_factory=list)
    submit_calls: list[run_control_pb2.SubmitMessageRequest] = field(default_factory=list)
    replies: dict[str, run_control_pb2.Reply] = field(default_factory=dict)  # by idempotency key
    messages: dict[str, tuple[str, int]] = field(default_factory=dict)  # key -> (message id, event seq)


class RecordingRunControl(run_control_pb2_grpc.RunControlServicer):  # type: ignore[misc]
    def __init__(self) -> None:
        self.events: list[run_control_pb2.RunEvent] = []
        self.rec = Recorded()
        self.cond = threading.Condition()
        self.watch_calls = 0
        self.closed = False

    # -- test-side helpers --------------------------------------------------------------------

    def publish(self, **fields: Any) -> run_control_pb2.RunEvent:
        with self.cond:
            seq = len(self.events) + 1
            ev = run_control_pb2.RunEvent(global_seq=seq, session_seq=seq, event_id=f"evt_{seq}", **fields)
            ev.time.GetCurrentTime()
            self.events.append(ev)
            self.cond.notify_all()
            return ev

    def message(
        self,
        session_key: str,
        text: str,
        sender: str = "alice",
        channel: str = "cli",
        causation: common_pb2.Causation | None = None,
    ) -> run_control_pb2.RunEvent:
        with self.cond:
            mid = f"msg_{len(self.events) + 1}"
        return self.publish(
            type=run_control_pb2.RUN_EVENT_TYPE_MESSAGE_RECEIVED,
            session_key=session_key,
            channel=channel,
            sender=sender,
            text=text,
            message_id=mid,
            causation=causation or common_pb2.Causation(origin=common_pb2.ORIGIN_USER),
        )

    def wait_for(self, predicate: Any, timeout: float = 20.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.cond:
                if predicate():
                    return True
            time.sleep(0.02)
        with self.cond:
            return bool(predicate())

    # -- RunControl ---------------------------------------------------------------------------

    def WatchRunEvents(
        self, request: run_control_pb2.WatchRunEventsRequest, context: grpc.ServicerContext
    ) -> Iterator[run_control_pb2.WatchRunEventsResponse]:
        with self.cond:
            self.watch_calls += 1
        pos = request.after_seq
        while context.is_active() and not self.closed:
            with self.cond:
                batch = self.events[pos:]
                if not batch:
                    self.cond.wait(timeout=0.2)
                    continue
            for ev in batch:
                pos = ev.global_seq
                if request.exclude_output and ev.type == run_control_pb2.RUN_EVENT_TYPE_RUN_OUTPUT:
                    continue
                yield run_control_pb2.WatchRunEventsResponse(event=ev)

    def PostReply(
        self, request: run_control_pb2.PostReplyRequest, context: grpc.ServicerContext
    ) -> run_control_pb2.PostReplyResponse:
        with self.cond:
            self.rec.post_reply_calls.append(request)
            old = self.rec.replies.get(request.idempotency_key)
            if old is not None:
                return run_control_pb2.PostReplyResponse(reply=old, duplicate=True)
            reply = run_control_pb2.Reply(
                reply_id=f"rpl_{len(self.rec.replies) + 1}",
                cursor=len(self.rec.replies) + 1,
                kind=request.kind,
                session_key=request.session_key,
                channel=request.channel,
                text=request.text,
                reply_to_message_id=request.reply_to_message_id,
                emoji=request.emoji,
                causation=request.causation,
            )
            self.rec.replies[request.idempotency_key] = reply
            return run_control_pb2.PostReplyResponse(reply=reply)

    def SubmitMessage(
        self, request: run_control_pb2.SubmitMessageRequest, context: grpc.ServicerContext
    ) -> run_control_pb2.SubmitMessageResponse:
        with self.cond:
            self.rec.submit_calls.append(request)
            old = self.rec.messages.get(request.idempotency_key)
            if old is not None:
                return run_control_pb2.SubmitMessageResponse(
                    message_id=old[0], disposition=run_control_pb2.DISPOSITION_DUPLICATE, event_seq=old[1]
                )
        ev = self.message(
            request.session_key,
            request.text,
            sender=request.sender,
            channel=request.channel,
            causation=request.causation,
        )
        with self.cond:
            self.rec.messages[request.idempotency_key] = (ev.message_id, ev.global_seq)
        return run_control_pb2.SubmitMessageResponse(
            message_id=ev.message_id, disposition=run_control_pb2.DISPOSITION_STARTED, event_seq=ev.global_seq
        )


class RunControlServer:
    """RecordingRunControl on a threaded grpc server bound to a free loopback port."""

    def __init__(self) -> None:
        self.servicer = RecordingRunControl()  # type: ignore[abstract]
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
        run_control_pb2_grpc.add_RunControlServicer_to_server(self.servicer, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> RunControlServer:
        self.server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.servicer.closed = True
        with self.servicer.cond:
            self.servicer.cond.notify_all()
        self.server.stop(grace=0.5).wait(5)


def replies_once_per_message(svc: RecordingRunControl, total: int) -> list[run_control_pb2.Reply]:
    """Assert that run control got one ack and one reaction reply per message of the `total` sent, and
    nothing twice; returns those replies."""
    with svc.cond:
        replies = list(svc.rec.replies.values())
    per = Counter((r.kind, r.reply_to_message_id or r.text) for r in replies)
    assert len(replies) == 2 * total and all(n == 1 for n in per.values()), (len(replies), total)
    acked = {r.reply_to_message_id for r in replies if r.kind == run_control_pb2.REPLY_KIND_ACK}
    assert acked == {e.message_id for e in svc.events}
    return replies


def echoed_once_across_a_kill(svc: RecordingRunControl, total: int) -> None:
    """Assert what the ack-all + echo rules leave after a replica was killed mid-stream: one ack and one
    "got message <i>" reply per message of the `total` sent, and at most 4 PostReply calls repeated
    (the ones in flight at the kill, same idempotency key, deduplicated by run control)."""
    replies = replies_once_per_message(svc, total)
    with svc.cond:
        calls = len(svc.rec.post_reply_calls)
    texts = {r.text for r in replies if r.kind == run_control_pb2.REPLY_KIND_REACTION}
    assert texts == {f"got message {i}" for i in range(total)}
    print(f"PostReply calls {calls}, distinct replies {len(replies)}")
    assert calls - len(replies) <= 4


def wait_rule_matches(address: str, md: Metadata, want: dict[str, int]) -> None:
    """Assert that the reactions service at `address` counts `want` matches per rule: every event
    evaluated once. The last outcome commits just after its reply was posted, so this polls (5 s at most)."""
    with grpc.insecure_channel(address) as ch:
        stub = reactions_pb2_grpc.ReactionsStub(ch)
        for _ in range(50):
            stats = stub.GetRuleStats(reactions_pb2.GetRuleStatsRequest(), metadata=md, timeout=10)
            if {s.rule_id: s.matches for s in stats.rules} == want:
                return
            time.sleep(0.1)
    assert {s.rule_id: s.matches for s in stats.rules} == want
