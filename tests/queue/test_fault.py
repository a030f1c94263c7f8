"""Fault test with a real process: SIGKILL queue_svc mid-load, restart it, and check nothing was lost or doubled."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from pathlib import Path

import grpc
from flynn.v1 import run_control_pb2 as pb
from flynn.v1 import run_control_pb2_grpc as pb_grpc

from tests.support.mesh import Tokens
from tests.support.queue import TERMINAL_EVENTS
from tests.support.queue_process import (
    Consumer,
    Metadata,
    all_runs,
    assert_still_acknowledged,
    sessions_idle,
    start_queue_process,
)

CONFIG = """
server:
  queue: {mode: collect, cap: 50, restart_policy: rerun}
  agent: {think_time: 30ms, chunks: 3, chunk_interval: 20ms}
"""
SESSIONS = 20


async def _catch_up_and_stop(
    consumer: Consumer, tasks: list[asyncio.Task[None]], stub: pb_grpc.RunControlStub, md: Metadata
) -> None:
    """Let the consumer catch up with the head (a terminal event last, 10 s at most), then stop it."""
    for _ in range(500):
        runs_head = (await stub.ListRuns(pb.ListRunsRequest(page_size=1), metadata=md)).runs
        if consumer.events and consumer.events[-1].type in TERMINAL_EVENTS and runs_head:
            break
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.3)
    for t in tasks:
        t.cancel()


async def test_sigkill_mid_load_loses_nothing_and_doubles_nothing(tmp_path: Path, tokens: Tokens) -> None:
    proc = start_queue_process(tmp_path, tokens, CONFIG)
    md = tokens.md("operator")
    acked: dict[tuple[str, str], str] = {}  # (session, key) -> message id
    try:
        ch = grpc.aio.insecure_channel(proc.address)
        stub = pb_grpc.RunControlStub(ch)
        consumer = Consumer(stub, md)
        tasks = consumer.start()
        stop = asyncio.Event()

        async def load(i: int) -> None:
            n = 0
            while not stop.is_set() and n < 200:
                key = f"s{i}/m{n}"
                try:
                    resp = await stub.SubmitMessage(
                        pb.SubmitMessageRequest(session_key=f"s{i}", channel="t", text=f"m{n}", idempotency_key=key),
                        metadata=md, timeout=5,
                    )  # fmt: skip
                    acked[(f"s{i}", key)] = resp.message_id
                except grpc.aio.AioRpcError:
                    return  # the process died under this call: not acknowledged
                n += 1
                await asyncio.sleep(0.005 * (i % 4))

        loaders = [asyncio.ensure_future(load(i)) for i in range(SESSIONS)]
        while len(acked) < 300:  # noqa: ASYNC110 - polling a counter the loaders fill
            await asyncio.sleep(0.01)
        proc.kill9()  # mid-load: submits, runs, chunks and finals are all in flight
        stop.set()
        await asyncio.gather(*loaders, *tasks)
        await ch.close()
        before_kill = len(acked)
        cursor_at_kill = consumer.cursor
        assert before_kill >= 300 and cursor_at_kill > 0

        proc.start()
        ch = grpc.aio.insecure_channel(proc.address)
        stub = pb_grpc.RunControlStub(ch)
        consumer.stub = stub
        tasks = consumer.start()
        # Every acknowledged message is still there: its key answers DUPLICATE with the same id.
        await assert_still_acknowledged(stub, md, acked)

        keys = [f"s{i}" for i in range(SESSIONS)]
        assert await sessions_idle(stub, md, keys, polls=3000, every=0.02, call_timeout=5), (
            "sessions did not settle"
        )
        await _catch_up_and_stop(consumer, tasks, stub, md)

        # The event stream resumed from the consumer's cursor without a gap (asserted per event too).
        seqs = [e.global_seq for e in consumer.events]
        assert seqs == list(range(1, len(seqs) + 1)) and seqs[-1] > cursor_at_kill

        # Every run: exactly one terminal event; at most one final (exactly one when completed).
        runs = await all_runs(stub, md)
        consumer.assert_one_terminal_each(runs)
        finals: dict[str, set[str]] = defaultdict(set)
        for r in consumer.replies:
            if r.kind == pb.REPLY_KIND_FINAL:
                finals[r.run_id].add(r.reply_id)
        assert all(len(ids) == 1 for ids in finals.values()), "a run got two different finals"
        replay = []
        async for resp in stub.StreamReplies(pb.StreamRepliesRequest(), metadata=md, timeout=2):
            replay.append(resp.reply)
            if len(replay) >= len({r.reply_id for r in consumer.replies}):
                break
        assert len(replay) == len({r.reply_id for r in replay}), "the outbox holds a reply twice"
        completed = {r.run_id for r in runs if r.state == pb.RUN_STATE_COMPLETED}
        assert {r.run_id for r in replay} == completed
        # Every acknowledged message is in a run or was dropped with a reason.
        consumer.assert_nothing_lost(acked, runs)
        # The crash left runs mid-flight; the rerun policy gave them a second attempt.
        assert any(r.attempt == 2 for r in runs) or any(e.reason == "restart" for e in consumer.events)
        await ch.close()
    finally:
        proc.stop()
