"""Reactions against the real run-control service (queue_svc): a real reactions process SIGKILLed
mid-stream while it consumes a real queue process's run events; and the recursion guard through
the real SubmitMessage -> MESSAGE_RECEIVED path."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import grpc
from flynn.v1 import reactions_pb2, reactions_pb2_grpc, run_control_pb2, run_control_pb2_grpc

from tests.support.mesh import ServiceProcess, Tokens

QUEUE_CONFIG = """
server:
  queue: {mode: followup, cap: 1000}
  agent: {think_time: 0s, chunks: 1, chunk_interval: 0s}
"""

RULES = """
automation:
  reactions:
    - id: ack-all
      enabled: true
      trigger: {event: message_received}
      priority: 10
      actions:
        - ack: {emoji: "👀"}
    - id: done-note
      enabled: true
      trigger: {event: run_completed}
      actions:
        - reply: {text: "run {run_id} done"}
    - id: echo
      enabled: true
      trigger: {event: message_received, keywords: [echo]}
      actions:
        - submit: {text: "echo again"}
"""


def _replies(
    stub: run_control_pb2_grpc.RunControlStub, md: tuple[tuple[str, str], ...]
) -> list[run_control_pb2.Reply]:
    out: list[run_control_pb2.Reply] = []
    call = stub.StreamReplies(run_control_pb2.StreamRepliesRequest(after_cursor=0), metadata=md, timeout=1.5)
    try:
        for r in call:
            out.append(r.reply)
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
            raise
    return out


def _wait(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.2)
    assert predicate(), what  # type: ignore[operator]


def test_real_queue_sigkill_mid_stream_and_recursion_guard(tmp_path: Path, tokens: Tokens) -> None:
    (tmp_path / "queue.yaml").write_text(QUEUE_CONFIG)
    (tmp_path / "rules.yaml").write_text(RULES)
    queue = ServiceProcess(
        "queue",
        "queue_svc.main",
        tmp_path / "queue",
        tokens,
        addresses={"config": "127.0.0.1:1", "voice": ""},
        extra=["--queue-config-file", str(tmp_path / "queue.yaml")],
    )
    reactions = ServiceProcess(
        "reactions",
        "reactions_svc.main",
        tmp_path / "reactions",
        tokens,
        extra=["--rules-file", str(tmp_path / "rules.yaml"), "--consume", "run"],
    )
    md = tokens.md("operator")
    try:
        queue.start()
        reactions.addresses = {"queue": queue.address, "config": "127.0.0.1:1", "nodes": "127.0.0.1:1"}
        reactions.start()
        with grpc.insecure_channel(queue.address) as ch:
            rc = run_control_pb2_grpc.RunControlStub(ch)
            message_ids: list[str] = []

            def submit(i: int, text: str) -> None:
                resp = rc.SubmitMessage(
                    run_control_pb2.SubmitMessageRequest(
                        session_key=f"cli:s{i % 5}",
                        channel="cli",
                        sender="ann",
                        text=text,
                        idempotency_key=f"m{i}",
                    ),
                    metadata=md,
                    timeout=10,
                )
                message_ids.append(resp.message_id)

            first, second = 120, 30
            for i in range(first):
                submit(i, f"hello {i}")

            def acked_so_far() -> int:
                with grpc.insecure_channel(reactions.address) as rch:
                    stats = reactions_pb2_grpc.ReactionsStub(rch).GetRuleStats(
                        reactions_pb2.GetRuleStatsRequest(rule_id="ack-all"), metadata=md, timeout=5
                    )
                return int(stats.rules[0].matches) if stats.rules else 0

            _wait(lambda: acked_so_far() >= 10, 60, "reactions never acked")
            reactions.kill9()
            at_kill = sum(1 for r in _replies(rc, md) if r.kind == run_control_pb2.REPLY_KIND_ACK)
            assert at_kill < first, "killed too late to be mid-stream"
            for i in range(first, first + second):
                submit(i, f"hello {i}")
            submit(first + second, "please echo")
            reactions.start()
            total = first + second + 1

            def settled() -> bool:
                rs = _replies(rc, md)
                kinds = Counter(r.kind for r in rs)
                # Every message a person sent acked, every one of their runs noted; the message the echo
                # rule submitted (and its run) carry reaction causation and trigger nothing.
                return (
                    kinds[run_control_pb2.REPLY_KIND_ACK] >= total
                    and kinds[run_control_pb2.REPLY_KIND_REACTION] >= total
                )

            _wait(settled, 120, "reactions did not catch up")
            time.sleep(1.0)  # anything duplicated late would show now
            rs = _replies(rc, md)
            acked = Counter(r.reply_to_message_id for r in rs if r.kind == run_control_pb2.REPLY_KIND_ACK)
            notes = Counter(r.text for r in rs if r.kind == run_control_pb2.REPLY_KIND_REACTION)
            # No event missed, no action duplicated: every message acked exactly once, every run noted once.
            assert set(acked) == set(message_ids) and all(n == 1 for n in acked.values())
            assert len(notes) == total and all(n == 1 for n in notes.values())

            runs = rc.ListRuns(run_control_pb2.ListRunsRequest(page_size=500), metadata=md, timeout=10).runs
            assert len(runs) == total + 1  # the echo rule submitted exactly one message

        with grpc.insecure_channel(reactions.address) as rch:
            rx = reactions_pb2_grpc.ReactionsStub(rch)
            echo = rx.ListTraces(
                reactions_pb2.ListTracesRequest(rule_id="echo"), metadata=md, timeout=10
            ).traces
            fired = [t for t in echo if t.matched]
            guarded = [t for t in echo if t.skip_reason == reactions_pb2.SKIP_REASON_RECURSION_GUARD]
            assert len(fired) == 1 and len(guarded) == 1
            assert "does not allow reaction origin" in guarded[0].detail
            stats = rx.GetRuleStats(reactions_pb2.GetRuleStatsRequest(), metadata=md, timeout=10)
            # Each event evaluated (and counted) exactly once across the kill.
            matches = {s.rule_id: s.matches for s in stats.rules}
            assert matches == {"ack-all": total, "done-note": total, "echo": 1}
            guards = {
                s.rule_id: {x.reason: x.count for x in s.skips}.get(
                    reactions_pb2.SKIP_REASON_RECURSION_GUARD, 0
                )
                for s in stats.rules
            }
            assert guards == {"ack-all": 1, "done-note": 1, "echo": 1}
        assert reactions.terminate() == 0
    finally:
        reactions.stop()
        queue.stop()
