"""Streams that start "from now" on a replica that streams nothing (queue_svc/tail.py, ledger.events_head).

A replica whose fan-outs have no subscriber does not read the others' commits on their wake-ups (its
numbers move to the head on the 1 s poll only), so `from_now` asks the database for the head: a stream
opened on replica B right after replica A committed starts exactly at A's last event and reply, and
then gets everything committed after it, in order, without a gap.

Two real replica processes on one real PostgreSQL, called directly so each call reaches the replica the
test names.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import psycopg
from flynn.v1 import run_control_pb2 as pb
from flynn.v1 import run_control_pb2_grpc as pb_grpc

from tests.support.mesh import Tokens
from tests.support.replicas import QueueReplicas

CONFIG = "server: {queue: {mode: followup}, agent: {think_time: 0s, chunks: 3, chunk_interval: 10ms}}\n"


def _heads(url: str) -> tuple[int, int]:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT (SELECT COALESCE(MAX(global_seq), 0) FROM flynn_queue.events), "
            "(SELECT COALESCE(MAX(cursor), 0) FROM flynn_queue.replies)"
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


async def _final(stub: pb_grpc.RunControlStub, md: tuple[tuple[str, str], ...], run_id: str) -> None:
    for _ in range(200):
        got = await stub.GetRun(pb.GetRunRequest(run_id=run_id), metadata=md, timeout=10)
        if got.run.state == pb.RUN_STATE_COMPLETED:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"run {run_id} did not complete")


async def test_from_now_on_a_replica_that_streams_nothing_starts_at_the_database_head(
    tmp_path: Path, tokens: Tokens, postgres_url: str
) -> None:
    mesh = QueueReplicas(tmp_path, tokens, postgres_url, replicas=2, config_yaml=CONFIG).start()
    md = tokens.md("operator")
    cha, chb = (grpc.aio.insecure_channel(mesh.queue[i].address) for i in range(2))
    try:
        a, b = pb_grpc.RunControlStub(cha), pb_grpc.RunControlStub(chb)
        for i in range(3):  # A owns the session and commits events and replies; B only hears of them
            run = await a.SubmitMessage(
                pb.SubmitMessageRequest(session_key="s", channel="t", text=f"m{i}", idempotency_key=f"k{i}"),
                metadata=md, timeout=10,
            )  # fmt: skip
            await _final(a, md, run.run_id)
        g_head, c_head = _heads(postgres_url)
        assert g_head > 0 and c_head > 0

        events = b.WatchRunEvents(pb.WatchRunEventsRequest(from_now=True), metadata=md)
        replies = b.StreamReplies(pb.StreamRepliesRequest(from_now=True), metadata=md)
        first_event, first_reply = await asyncio.wait_for(asyncio.gather(events.read(), replies.read()), 10)
        assert first_event.start_after_seq == g_head
        assert first_reply.start_after_cursor == c_head

        run = await a.SubmitMessage(
            pb.SubmitMessageRequest(session_key="s", channel="t", text="after", idempotency_key="k-after"),
            metadata=md, timeout=10,
        )  # fmt: skip
        await _final(a, md, run.run_id)
        seen: list[int] = []
        while True:
            resp = await asyncio.wait_for(events.read(), 10)
            seen.append(resp.event.global_seq)
            if resp.event.type == pb.RUN_EVENT_TYPE_RUN_COMPLETED and resp.event.run_id == run.run_id:
                break
        assert seen == list(range(g_head + 1, g_head + 1 + len(seen)))  # from the head on, no gap
        reply = await asyncio.wait_for(replies.read(), 10)
        assert reply.reply.cursor == c_head + 1 and reply.reply.run_id == run.run_id
        events.cancel()
        replies.cancel()
    finally:
        await cha.close(None)
        await chb.close(None)
        mesh.stop()
