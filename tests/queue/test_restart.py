"""Restarts of an in-process server on the same data dir: idempotency, restart policy, no second final."""

from __future__ import annotations

from pathlib import Path

from flynn.v1 import run_control_pb2 as pb

from tests.support.mesh import Tokens
from tests.support.queue import TERMINAL_EVENTS, queue_service, wait_for

LONG = "agent: {think_time: 30s}"


async def test_idempotency_key_survives_restart(tmp_path: Path, tokens: Tokens) -> None:
    async with queue_service(tmp_path, tokens) as q:
        a = await q.submit("s", "hello", key="tg-42")
        await q.wait_run(a.run_id)
    async with queue_service(tmp_path, tokens) as q:
        dup = await q.submit("s", "hello again?", key="tg-42")
        assert dup.disposition == pb.DISPOSITION_DUPLICATE
        assert (dup.message_id, dup.run_id, dup.event_seq) == (a.message_id, a.run_id, a.event_seq)
        assert dup.original_disposition == pb.DISPOSITION_STARTED
        # Keys are scoped to the session: the same key elsewhere is another message.
        other = await q.submit("t", "hello", key="tg-42")
        assert other.disposition == pb.DISPOSITION_STARTED
        await q.wait_run(other.run_id)
        assert len(q.replies()) == 2


async def test_restart_policy_fail_ends_active_run_and_runs_queue(tmp_path: Path, tokens: Tokens) -> None:
    cfg = f"server: {{queue: {{mode: followup, restart_policy: fail}}, {LONG}}}"
    async with queue_service(tmp_path, tokens, cfg) as q:
        a = await q.submit("s", "a")
        b = await q.submit("s", "b")
    quick = "server: {queue: {mode: followup, restart_policy: fail}}"
    async with queue_service(tmp_path, tokens, quick) as q:
        ra = await q.wait_run(a.run_id)
        assert ra.state == pb.RUN_STATE_ERROR and ra.error_kind == "restart"
        rb = await q.wait_run(b.run_id)
        assert rb.state == pb.RUN_STATE_COMPLETED and rb.output == "echo: b"
        terminals = [e.run_id for e in q.events("s") if e.type in TERMINAL_EVENTS]
        assert sorted(terminals) == sorted([a.run_id, b.run_id])
        assert [r.run_id for r in q.replies()] == [b.run_id]


async def test_restart_policy_rerun_makes_a_second_attempt(tmp_path: Path, tokens: Tokens) -> None:
    async with queue_service(tmp_path, tokens, f"server: {{queue: {{restart_policy: rerun}}, {LONG}}}") as q:
        a = await q.submit("s", "a")
    async with queue_service(tmp_path, tokens, "server: {queue: {restart_policy: rerun}}") as q:
        ra = await q.wait_run(a.run_id)
        assert ra.state == pb.RUN_STATE_COMPLETED and ra.attempt == 2 and ra.output == "echo: a"
        kinds = [
            (pb.RunEventType.Name(e.type), e.reason)
            for e in q.events("s", exclude_output=True)
            if e.run_id == a.run_id
        ]
        assert kinds == [
            ("RUN_EVENT_TYPE_RUN_QUEUED", ""), ("RUN_EVENT_TYPE_RUN_STARTED", ""),
            ("RUN_EVENT_TYPE_RUN_STARTED", "restart_rerun"), ("RUN_EVENT_TYPE_RUN_COMPLETED", ""),
        ]  # fmt: skip
        assert [r.run_id for r in q.replies()] == [a.run_id]
    # A third start changes nothing: the completed run is not rerun and its final not repeated.
    async with queue_service(tmp_path, tokens, "server: {queue: {restart_policy: rerun}}") as q:
        assert [r.run_id for r in q.replies()] == [a.run_id]
        assert (await q.get_run(a.run_id)).attempt == 2


async def test_cancel_requested_at_restart_ends_cancelled(tmp_path: Path, tokens: Tokens) -> None:
    cfg = "server: {queue: {cancel_deadline: 60s}, agent: {address: '127.0.0.1:1'}}"
    async with queue_service(tmp_path, tokens, "server: {agent: {think_time: 30s}}") as q:
        a = await q.submit("s", "a")
        await q.set_config(cfg)  # the next runs would go to an agent that is not there; this one is running
        r = await q.cancel(run_id=a.run_id)
        assert r.outcome == pb.CANCEL_OUTCOME_CANCEL_REQUESTED
        # Stop before the agent notices: the durable cancel_requested decides at restart.
        q.server.app.rc._stopping = True  # type: ignore[attr-defined]
    async with queue_service(tmp_path, tokens) as q:
        ra = await wait_for(lambda: q.get_run(a.run_id), lambda r: r.state == pb.RUN_STATE_CANCELLED)
        assert ra.final_reply_id == "" and q.replies() == []
