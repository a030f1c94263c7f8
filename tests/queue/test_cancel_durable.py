"""An acknowledged cancel is durable even when it was committed behind a large batch: run control (a
real process) under a submit storm, cancels eight at a time, SIGKILL while both are going on. After the
restart every run whose cancel was acknowledged ends CANCELLED (never ERROR by the restart policy, never
a final), and every run has exactly one terminal event."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import grpc
from flynn.v1 import run_control_pb2 as pb
from flynn.v1 import run_control_pb2_grpc as pb_grpc

from tests.support.mesh import ServiceProcess, Tokens
from tests.support.queue import TERMINAL_EVENTS
from tests.support.queue_process import start_queue_process

CONFIG = """
server:
  queue: {mode: followup, cap: 50, restart_policy: fail, cancel_deadline: 60s}
  agent: {think_time: 60s}
"""
CANCELLED_SESSIONS = 40
STORM_SESSIONS = 16


async def test_cancel_acked_during_a_submit_storm_survives_sigkill(tmp_path: Path, tokens: Tokens) -> None:
    proc = start_queue_process(tmp_path, tokens, CONFIG)
    md = tokens.md("operator")
    try:
        ch = grpc.aio.insecure_channel(proc.address)
        stub = pb_grpc.RunControlStub(ch)
        runs = [
            (
                await stub.SubmitMessage(
                    pb.SubmitMessageRequest(
                        session_key=f"c{i}", channel="t", text="work", idempotency_key="k"
                    ),
                    metadata=md,
                    timeout=10,
                )  # fmt: skip
            ).run_id
            for i in range(CANCELLED_SESSIONS)
        ]
        stop = asyncio.Event()

        async def storm(i: int) -> None:
            # Many writes per batch: each submit queues a run (the session's first one is running).
            for n in range(45):
                if stop.is_set():
                    return
                try:
                    await stub.SubmitMessage(
                        pb.SubmitMessageRequest(session_key=f"s{i}", channel="t", text=f"m{n}", idempotency_key=f"m{n}"),
                        metadata=md, timeout=5,
                    )  # fmt: skip
                except grpc.aio.AioRpcError:
                    return  # the process died under this call

        acked: list[str] = []
        todo = list(runs)

        async def canceller() -> None:
            while todo and not stop.is_set():
                run_id = todo.pop()
                try:
                    r = await stub.CancelRun(
                        pb.CancelRunRequest(run_id=run_id, reason="stop"), metadata=md, timeout=5
                    )
                except grpc.aio.AioRpcError:
                    return
                assert r.outcome == pb.CANCEL_OUTCOME_CANCEL_REQUESTED
                acked.append(run_id)

        storms = [asyncio.ensure_future(storm(i)) for i in range(STORM_SESSIONS)]
        await asyncio.sleep(0.05)  # the storm is on: batches are large and back to back
        cancellers = [asyncio.ensure_future(canceller()) for _ in range(8)]
        for _ in range(1000):
            if len(acked) >= CANCELLED_SESSIONS // 2:
                break
            await asyncio.sleep(0.002)
        proc.kill9()  # cancels and submits in flight
        stop.set()
        await asyncio.gather(*storms, *cancellers)
        await ch.close()
        assert acked, "no cancel was acknowledged before the kill"

        proc.start()
        await _check_after_restart(proc, md, runs, acked)
    finally:
        proc.stop()


async def _check_after_restart(
    proc: ServiceProcess, md: tuple[tuple[str, str], ...], runs: list[str], acked: list[str]
) -> None:
    """Every acknowledged cancel ended its run CANCELLED; every run has exactly one terminal event."""
    ch = grpc.aio.insecure_channel(proc.address)
    stub = pb_grpc.RunControlStub(ch)
    for run_id in acked:
        got = (await stub.GetRun(pb.GetRunRequest(run_id=run_id), metadata=md, timeout=5)).run
        assert got.state == pb.RUN_STATE_CANCELLED, (run_id, pb.RunState.Name(got.state))
        assert got.cancel_reason == "stop" and got.final_reply_id == ""
    # Every run of the cancelled sessions ended exactly once (acknowledged or not).
    terminals: Counter[str] = Counter()
    seen = 0
    async for resp in stub.WatchRunEvents(
        pb.WatchRunEventsRequest(exclude_output=True), metadata=md, timeout=5
    ):
        seen = resp.event.global_seq
        if resp.event.type in TERMINAL_EVENTS:
            terminals[resp.event.run_id] += 1
        if all(terminals[r] >= 1 for r in runs):
            break
    assert seen > 0
    assert all(terminals[r] == 1 for r in runs), {r: terminals[r] for r in runs if terminals[r] != 1}
    await ch.close()
