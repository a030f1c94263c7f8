"""PostgreSQL killed under load (`pg_ctl stop -m immediate`) and restarted, with run control as a real
process: it goes NOT_SERVING, refuses new work with UNAVAILABLE naming the database, comes back to
SERVING by itself, and every acknowledged message is still there; no run gets two terminal events
and no run two finals."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import pytest
from flynn.v1 import run_control_pb2 as pb
from flynn.v1 import run_control_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from flynn_launcher.local_postgres import LocalPostgres
from tests.queue.test_fault import CONFIG
from tests.support.mesh import Tokens
from tests.support.queue import TERMINAL_EVENTS
from tests.support.queue_process import (
    Consumer,
    assert_still_acknowledged,
    sessions_idle,
    start_queue_process,
)

SESSIONS = 10


async def _health(ch: grpc.aio.Channel) -> int:
    stub = health_pb2_grpc.HealthStub(ch)
    try:
        resp = await stub.Check(health_pb2.HealthCheckRequest(service="flynn.v1.RunControl"), timeout=2)
    except grpc.aio.AioRpcError:
        return -1
    return int(resp.status)


async def _wait(cond: Callable[[], bool], within: float, what: str, seen: Callable[[], object] = str) -> None:
    """Wait until `cond()`; on timeout, fail naming `what` and what `seen()` shows then."""
    for _ in range(int(within / 0.02)):
        if cond():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}; {seen()}")


async def _until(ch: grpc.aio.Channel, status: int, within: float) -> None:
    for _ in range(int(within / 0.1)):
        if await _health(ch) == status:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"health never became {status}")


@pytest.mark.backends("postgresql")
async def test_postgres_killed_under_load_then_back(
    tmp_path: Path, tokens: Tokens, queue_backend: str, postgres: LocalPostgres
) -> None:
    proc = start_queue_process(tmp_path, tokens, CONFIG)
    md = tokens.md("operator")
    acked: dict[tuple[str, str], str] = {}
    refused: list[str] = []
    try:
        ch = grpc.aio.insecure_channel(proc.address)
        stub = pb_grpc.RunControlStub(ch)
        consumer = Consumer(stub, md)
        tasks = consumer.start()
        stop = asyncio.Event()

        async def load(i: int) -> None:
            n = 0
            while not stop.is_set() and n < 3000:  # bounded; the test stops it long before
                key = f"s{i}/m{n}"
                try:
                    resp = await stub.SubmitMessage(
                        pb.SubmitMessageRequest(session_key=f"s{i}", channel="t", text=f"m{n}", idempotency_key=key),
                        metadata=md, timeout=3,
                    )  # fmt: skip
                    acked[(f"s{i}", key)] = resp.message_id
                    n += 1
                except grpc.aio.AioRpcError as e:  # not acknowledged: the same key is retried
                    refused.append(f"{e.code().name} {e.details()}")
                    await asyncio.sleep(0.05)
                await asyncio.sleep(0.005)

        loaders = [asyncio.ensure_future(load(i)) for i in range(SESSIONS)]
        await _wait(lambda: len(acked) >= 100, 60, "100 acknowledged messages")
        await asyncio.to_thread(postgres.kill)
        await _until(ch, health_pb2.HealthCheckResponse.NOT_SERVING, within=10)
        await _wait(
            lambda: any("is unavailable" in r for r in refused),
            20,
            "UNAVAILABLE",
            lambda: f"last refusals {refused[-3:]}",
        )
        acked_during_outage = len(acked)
        await asyncio.to_thread(postgres.start)
        await _until(ch, health_pb2.HealthCheckResponse.SERVING, within=20)
        await _wait(lambda: len(acked) >= acked_during_outage + 100, 60, "load to go on after the outage")
        stop.set()
        await asyncio.gather(*loaders)

        # Every acknowledged message is there: its key answers DUPLICATE with the same id.
        await assert_still_acknowledged(stub, md, acked)
        await sessions_idle(
            stub, md, [f"s{i}" for i in range(SESSIONS)], polls=3000, every=0.02, call_timeout=5
        )
        await asyncio.sleep(0.5)
        for t in tasks:
            t.cancel()
        seqs = [e.global_seq for e in consumer.events]
        assert seqs == list(range(1, len(seqs) + 1))
        terminals = Counter(e.run_id for e in consumer.events if e.type in TERMINAL_EVENTS)
        assert terminals and max(terminals.values()) == 1
        finals = Counter(r.run_id for r in consumer.replies if r.kind == pb.REPLY_KIND_FINAL)
        assert finals and max(finals.values()) == 1
        assert len({r.reply_id for r in consumer.replies}) == len(consumer.replies)
        await ch.close()
    finally:
        proc.stop()
        if not postgres.running():
            postgres.start()


SLOW_AGENT = """
server:
  queue: {mode: followup, cap: 50, restart_policy: rerun}
  agent: {think_time: 4s, chunks: 1}
"""


@pytest.mark.backends("postgresql")
async def test_an_owner_that_cannot_renew_steps_down_and_its_run_is_rerun(
    tmp_path: Path, tokens: Tokens, queue_backend: str, postgres: LocalPostgres
) -> None:
    """The database stays away longer than 0.7 x the session lease: the owner's watchdog steps down
    (stops the agent call of the run in flight) before the lease can expire, so no other replica could
    adopt the session while that call still runs. Once the database is back the session is adopted
    again and the run recovered by its restart policy: a second attempt, one final."""
    proc = start_queue_process(tmp_path, tokens, SLOW_AGENT, extra=["--session-lease-seconds", "2"])
    md = tokens.md("operator")
    try:
        ch = grpc.aio.insecure_channel(proc.address)
        stub = pb_grpc.RunControlStub(ch)
        sent = await stub.SubmitMessage(
            pb.SubmitMessageRequest(session_key="w", channel="t", text="slow", idempotency_key="w/1"),
            metadata=md, timeout=10,
        )  # fmt: skip
        await asyncio.sleep(0.3)  # the agent call is running (it thinks for 4 s)
        await asyncio.to_thread(postgres.kill)
        stepped = "cannot renew session leases; stepping down"
        await _wait(lambda: stepped in proc.log_tail(400), 10, "the watchdog to step down", proc.log_tail)
        await asyncio.to_thread(postgres.start)
        run = pb.Run()
        for _ in range(300):  # bounded: 30 s for the adoption, the rerun (4 s) and its final
            try:
                run = (await stub.GetRun(pb.GetRunRequest(run_id=sent.run_id), metadata=md, timeout=3)).run
            except grpc.aio.AioRpcError:
                pass  # the database or the session is on its way back
            if run.state == pb.RUN_STATE_COMPLETED:
                break
            await asyncio.sleep(0.1)
        assert run.state == pb.RUN_STATE_COMPLETED, run
        assert run.attempt == 2, "the first attempt's agent call was stopped, the run rerun once"
        finals = [
            r async for r in _replies(stub, md) if r.run_id == sent.run_id and r.kind == pb.REPLY_KIND_FINAL
        ]
        assert len(finals) == 1
        await ch.close()
    finally:
        proc.stop()
        if not postgres.running():
            postgres.start()


async def _replies(stub: pb_grpc.RunControlStub, md: tuple[tuple[str, str], ...]) -> AsyncIterator[pb.Reply]:
    """Every reply from the start of the log to its head (the stream is read until it goes quiet)."""
    call = stub.StreamReplies(pb.StreamRepliesRequest(after_cursor=0), metadata=md)
    try:
        while True:
            try:
                msg = await asyncio.wait_for(call.read(), 2.0)
            except TimeoutError:
                return
            if msg is grpc.aio.EOF:
                return
            if msg.HasField("reply"):
                yield msg.reply
    finally:
        call.cancel()
