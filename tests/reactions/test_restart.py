"""Restart mid-stream: a real reactions process, SIGKILLed while it consumes run events from a real
RunControl server (the recording test server of tests/support/reactions.py), resumes from its cursor:
no event missed, no action duplicated."""

from __future__ import annotations

from pathlib import Path

import grpc
from flynn.v1 import reactions_pb2, reactions_pb2_grpc

from tests.support.mesh import ServiceProcess, Tokens
from tests.support.reactions import (
    ACK_AND_ECHO_RULES as RULES,
)
from tests.support.reactions import (
    RunControlServer,
    echoed_once_across_a_kill,
    wait_rule_matches,
)


def test_sigkill_mid_stream_misses_nothing_and_duplicates_nothing(
    tmp_path: Path, tokens: Tokens, database_url: str
) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    first_batch, second_batch = 300, 100
    with RunControlServer() as rc:
        svc = rc.servicer
        proc = ServiceProcess(
            "reactions",
            "reactions_svc.main",
            tmp_path / "data",
            tokens,
            addresses={"queue": rc.address, "config": "127.0.0.1:1", "nodes": "127.0.0.1:1"},
            extra=["--rules-file", str(rules), "--consume", "run"]
            + (["--database-url", database_url] if database_url else []),
        )
        try:
            proc.start()
            for i in range(first_batch):
                svc.message(f"s{i % 7}", f"message {i}")
            # Kill while it is in the middle of the stream.
            assert svc.wait_for(lambda: len(svc.rec.replies) >= 120, timeout=60), proc.log_tail()
            proc.kill9()
            with svc.cond:
                replies_at_kill = len(svc.rec.replies)
            assert replies_at_kill < 2 * first_batch, "killed too late to be mid-stream"
            print(f"replies at kill: {replies_at_kill}")
            for i in range(first_batch, first_batch + second_batch):
                svc.message(f"s{i % 7}", f"message {i}")
            proc.start()
            total = first_batch + second_batch
            assert svc.wait_for(lambda: len(svc.rec.replies) >= 2 * total, timeout=90), proc.log_tail()

            # One ack and one reply per message: nothing missed, nothing acted twice.
            echoed_once_across_a_kill(svc, total)

            # Every event was evaluated (and counted) exactly once, across the kill.
            wait_rule_matches(proc.address, tokens.md("operator"), {"ack-all": total, "echo": total})
            with grpc.insecure_channel(proc.address) as ch:
                stub = reactions_pb2_grpc.ReactionsStub(ch)
                last = stub.ListTraces(
                    reactions_pb2.ListTracesRequest(event_id=f"run:{total}"),
                    metadata=tokens.md("operator"),
                    timeout=10,
                )
                assert [t.matched for t in last.traces] == [True, True]
            assert svc.watch_calls >= 2
            assert proc.terminate() == 0
        finally:
            proc.stop()
