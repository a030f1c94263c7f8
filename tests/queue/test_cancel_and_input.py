"""CancelRun outcomes and bad input through the real server: INVALID_ARGUMENT naming the field, NOT_FOUND, never INTERNAL."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import grpc
import pytest
from flynn.v1 import run_control_pb2 as pb
from google.rpc import error_details_pb2, status_pb2
from prometheus_client import REGISTRY

from tests.support.mesh import Tokens, grpcurl
from tests.support.queue import QueueHarness, queue_service, wait_for

STREAM = "agent: {think_time: 0s, chunks: 10, chunk_interval: 100ms}"


def violations(err: grpc.aio.AioRpcError) -> list[str]:
    for k, v in err.trailing_metadata() or ():
        if k == "grpc-status-details-bin":
            st = status_pb2.Status.FromString(v)
            for d in st.details:
                if d.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                    br = error_details_pb2.BadRequest()
                    d.Unpack(br)
                    return [fv.field for fv in br.field_violations]
    return []


async def started(q: QueueHarness, text: str, session: str = "s") -> pb.SubmitMessageResponse:
    a = await q.submit(session, text)

    async def outs() -> int:
        return sum(1 for e in q.events() if e.run_id == a.run_id and e.type == pb.RUN_EVENT_TYPE_RUN_OUTPUT)

    await wait_for(outs, lambda n: n >= 1)
    return a


async def test_cancel_outcomes(tmp_path: Path, tokens: Tokens) -> None:
    acks_before = REGISTRY.get_sample_value("flynn_cancel_to_ack_seconds_count") or 0.0
    settled_before = REGISTRY.get_sample_value("flynn_cancel_to_cancelled_seconds_count") or 0.0
    async with queue_service(tmp_path, tokens, f"server: {{queue: {{mode: followup}}, {STREAM}}}") as q:
        a = await started(q, "a")
        b = await q.submit("s", "b")
        c = await q.submit("s", "c")
        r = await q.cancel(run_id=a.run_id, reason="stop")
        assert (r.outcome, r.run_id, r.state) == (
            pb.CANCEL_OUTCOME_CANCEL_REQUESTED,
            a.run_id,
            pb.RUN_STATE_CANCEL_REQUESTED,
        )
        again = await q.cancel(run_id=a.run_id)
        assert again.outcome in (
            pb.CANCEL_OUTCOME_ALREADY_CANCEL_REQUESTED,
            pb.CANCEL_OUTCOME_ALREADY_CANCELLED,
        )
        ra = await q.wait_run(a.run_id)
        assert ra.state == pb.RUN_STATE_CANCELLED and ra.output and ra.final_reply_id == ""
        assert ra.cancel_request_time.ToNanoseconds() > 0
        assert (await q.cancel(run_id=a.run_id)).outcome == pb.CANCEL_OUTCOME_ALREADY_CANCELLED
        # A queued run cancelled by id never starts.
        rc = await q.cancel(run_id=c.run_id)
        assert (rc.outcome, rc.state) == (pb.CANCEL_OUTCOME_CANCEL_REQUESTED, pb.RUN_STATE_CANCELLED)
        # Session scope: the active run (b, which started after a settled).
        await wait_for(lambda: q.get_run(b.run_id), lambda r: r.state == pb.RUN_STATE_STARTED)
        rs = await q.cancel(session_key="s")
        assert (rs.outcome, rs.run_id) == (pb.CANCEL_OUTCOME_CANCEL_REQUESTED, b.run_id)
        await q.wait_run(b.run_id)
        assert (await q.cancel(session_key="s")).outcome == pb.CANCEL_OUTCOME_NO_ACTIVE_RUN
        d = await q.submit("s", "d")
        await q.wait_run(d.run_id)
        assert (await q.cancel(run_id=d.run_id)).outcome == pb.CANCEL_OUTCOME_ALREADY_COMPLETED
        assert [x.run_id for x in q.replies()] == [d.run_id]
        assert (REGISTRY.get_sample_value("flynn_cancel_to_ack_seconds_count") or 0) >= acks_before + 3
        assert (
            REGISTRY.get_sample_value("flynn_cancel_to_cancelled_seconds_count") or 0
        ) >= settled_before + 2
        kinds = [(pb.RunEventType.Name(e.type), e.reason) for e in q.events("s") if e.run_id == c.run_id]
        assert kinds == [
            ("RUN_EVENT_TYPE_RUN_QUEUED", ""), ("RUN_EVENT_TYPE_RUN_CANCEL_REQUESTED", "cancelled"),
            ("RUN_EVENT_TYPE_RUN_CANCELLED", "cancelled"),
        ]  # fmt: skip


async def test_cancel_session_and_queue_drops_with_reason(tmp_path: Path, tokens: Tokens) -> None:
    async with queue_service(tmp_path, tokens, f"server: {{queue: {{mode: collect}}, {STREAM}}}") as q:
        a = await started(q, "a")
        msgs = [await q.submit("s", t) for t in ("b", "c", "d")]
        await q.set_config(f"server: {{queue: {{mode: followup}}, {STREAM}}}")
        e = await q.submit("s", "e")
        r = await q.cancel(session_key="s", scope=pb.CANCEL_SCOPE_SESSION_AND_QUEUE, reason="/stop")
        assert (r.outcome, r.run_id, r.dropped_messages) == (pb.CANCEL_OUTCOME_CANCEL_REQUESTED, a.run_id, 4)
        await q.wait_idle("s")
        drops = [
            (x.message_id, x.reason) for x in q.events("s") if x.type == pb.RUN_EVENT_TYPE_MESSAGE_DROPPED
        ]
        assert drops == [(m.message_id, "/stop") for m in (*msgs, e)]
        assert (await q.get_run(e.run_id)).state == pb.RUN_STATE_CANCELLED
        assert q.replies() == []


async def test_not_found_cases(tmp_path: Path, tokens: Tokens) -> None:
    async with queue_service(tmp_path, tokens) as q:
        a = await q.submit("s", "a")
        await q.submit("t", "x")
        missing = "run_01HZZZZZZZZZZZZZZZZZZZZZZZ"
        for call in (
            q.cancel(run_id=missing),
            q.get_run(missing),
            q.cancel(run_id=a.run_id, session_key="t"),  # a run paired with a session it does not belong to
            q.cancel(session_key="never-seen"),
            q.stub.GetSession(pb.GetSessionRequest(session_key="never-seen"), metadata=q.md),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                await call
            assert ei.value.code() == grpc.StatusCode.NOT_FOUND, ei.value.details()


BAD_SUBMITS = [
    ({"session_key": ""}, "session_key"),
    ({"session_key": "k" * 257}, "session_key"),
    ({"channel": ""}, "channel"),
    ({"channel": "c" * 65}, "channel"),
    ({"idempotency_key": ""}, "idempotency_key"),
    ({"idempotency_key": "i" * 257}, "idempotency_key"),
    ({"text": "x" * (32 * 1024 + 1)}, "text"),
    ({"text": ""}, "text"),
    ({"text": "a\x00b"}, "text"),
    ({"mode_override": 99}, "mode_override"),
    ({"sender": "s" * 300}, "sender"),
]


async def test_bad_input_names_the_field(tmp_path: Path, tokens: Tokens) -> None:
    async with queue_service(tmp_path, tokens) as q:
        for change, field in BAD_SUBMITS:
            req = dict(session_key="s", channel="c", text="t", idempotency_key="k", sender="u")
            req.update(change)  # type: ignore[arg-type]
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                await q.stub.SubmitMessage(pb.SubmitMessageRequest(**req), metadata=q.md)  # type: ignore[arg-type]
            assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (change, ei.value.details())
            assert field in violations(ei.value), (change, violations(ei.value))
        bad_cancels = [
            (pb.CancelRunRequest(run_id="nope"), "run_id"),
            (pb.CancelRunRequest(run_id="run_123"), "run_id"),
            (pb.CancelRunRequest(run_id="msg_01HZZZZZZZZZZZZZZZZZZZZZZZ"), "run_id"),
            (pb.CancelRunRequest(), "session_key"),
            (pb.CancelRunRequest(scope=pb.CANCEL_SCOPE_RUN, session_key="s"), "run_id"),
            (pb.CancelRunRequest(session_key="s", scope=42), "scope"),  # type: ignore[arg-type]
        ]
        for req, field in bad_cancels:
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                await q.stub.CancelRun(req, metadata=q.md)
            assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert field in violations(ei.value), (req, violations(ei.value))
        other = [
            (q.stub.GetRun(pb.GetRunRequest(run_id=""), metadata=q.md), "run_id"),
            (
                q.stub.GetRun(pb.GetRunRequest(run_id="run_lowercase0000000000000000"), metadata=q.md),
                "run_id",
            ),
            (q.stub.ListRuns(pb.ListRunsRequest(page_size=501), metadata=q.md), "page_size"),
            (q.stub.ListRuns(pb.ListRunsRequest(page_token="%%%"), metadata=q.md), "page_token"),
            (q.stub.GetSession(pb.GetSessionRequest(session_key=""), metadata=q.md), "session_key"),
            (
                q.stub.PostReply(
                    pb.PostReplyRequest(
                        kind=pb.REPLY_KIND_FINAL, session_key="s", channel="c", text="t", idempotency_key="k"
                    ),
                    metadata=q.md,
                ),
                "kind",
            ),
            (
                q.stub.PostReply(
                    pb.PostReplyRequest(kind=pb.REPLY_KIND_NOTICE, session_key="s", channel="c", text="t"),
                    metadata=q.md,
                ),
                "idempotency_key",
            ),
            (
                q.stub.PostReply(
                    pb.PostReplyRequest(
                        kind=pb.REPLY_KIND_ACK, session_key="s", channel="c", idempotency_key="k"
                    ),
                    metadata=q.md,
                ),
                "emoji",
            ),
        ]
        for call, field in other:
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                await call
            assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert field in violations(ei.value)
        for stream_req in (
            pb.WatchRunEventsRequest(after_seq=-1),
            pb.WatchRunEventsRequest(session_key="k" * 300),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                async for _ in q.stub.WatchRunEvents(stream_req, metadata=q.md):
                    pass
            assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_bad_input_with_real_grpcurl(tmp_path: Path, tokens: Tokens) -> None:
    async with queue_service(tmp_path, tokens) as q:
        addr = q.server.address
        res = await asyncio.to_thread(grpcurl, addr, "flynn.v1.RunControl/SubmitMessage", token=tokens.operator,
                      data=json.dumps({"sessionKey": "", "channel": "c", "text": "t", "idempotencyKey": "k"}))  # fmt: skip
        assert res.returncode != 0 and "InvalidArgument" in res.stderr and "session_key" in res.stderr
        res = await asyncio.to_thread(
            grpcurl,
            addr,
            "flynn.v1.RunControl/CancelRun",
            token=tokens.operator,
            data='{"runId": "run_nope"}',
        )
        assert "InvalidArgument" in res.stderr and "run_id" in res.stderr
        ok = await asyncio.to_thread(grpcurl, addr, "flynn.v1.RunControl/SubmitMessage", token=tokens.operator,
                     data=json.dumps({"sessionKey": "s", "channel": "c", "text": "hi", "idempotencyKey": "k1"}))  # fmt: skip
        assert ok.returncode == 0, ok.stderr
        assert json.loads(ok.stdout)["disposition"] == "DISPOSITION_STARTED"


async def test_post_reply_is_idempotent(tmp_path: Path, tokens: Tokens) -> None:
    async with queue_service(tmp_path, tokens) as q:
        req = pb.PostReplyRequest(
            kind=pb.REPLY_KIND_NOTICE, session_key="s", channel="c", text="hi", idempotency_key="n1"
        )
        a = await q.stub.PostReply(req, metadata=q.md)
        b = await q.stub.PostReply(req, metadata=q.md)
        assert not a.duplicate and b.duplicate and a.reply.reply_id == b.reply.reply_id
        assert a.reply.delivery == pb.DELIVERY_MODE_TEXT and a.reply.cursor == 1
        ack = pb.PostReplyRequest(kind=pb.REPLY_KIND_ACK, session_key="s", channel="c", reply_to_message_id="msg_x",
                                  emoji="👍", idempotency_key="a1")  # fmt: skip
        c = await q.stub.PostReply(ack, metadata=q.md)
        assert [r.reply_id for r in q.replies()] == [a.reply.reply_id, c.reply.reply_id]
