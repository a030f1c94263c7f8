"""Run control with 3 replica processes on one real PostgreSQL, behind the gateway: ownership by lease,
forwarding to the owner, failover after SIGKILL, and a paused owner fenced by its epoch."""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections import Counter
from pathlib import Path

import grpc
import psycopg
from flynn.v1 import run_control_pb2 as pb
from flynn.v1 import run_control_pb2_grpc as pb_grpc

from tests.replicas.conftest import StartReplicas
from tests.support.mesh import Tokens
from tests.support.queue import TERMINAL_EVENTS
from tests.support.queue_process import Consumer, all_runs, sessions_idle
from tests.support.replicas import QueueReplicas

CONFIG = """
server:
  queue: {mode: followup, cap: 100, restart_policy: rerun}
  agent: {think_time: 50ms, chunks: 3, chunk_interval: 30ms}
"""
SESSIONS = 50
LEASE = 2.0
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED)


async def _submit(
    stub: pb_grpc.RunControlStub, md: tuple[tuple[str, str], ...], session: str, key: str, text: str
) -> pb.SubmitMessageResponse:
    """Retry with the same idempotency key until acknowledged (bounded): what a client does."""
    deadline = time.monotonic() + 30
    while True:
        try:
            return await stub.SubmitMessage(
                pb.SubmitMessageRequest(session_key=session, channel="t", text=text, idempotency_key=key),
                metadata=md, timeout=10,
            )  # fmt: skip
        except grpc.aio.AioRpcError as e:
            if e.code() not in RETRYABLE or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as r:
        return str(r.read().decode())


async def _until_logged(log: Path, text: str, failure: str) -> None:
    """Wait (5 s at most) until the process log `log` holds `text`; else fail with `failure`."""
    for _ in range(100):
        if text in await asyncio.to_thread(log.read_text):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(failure)


async def _wait_owned_again(mesh: QueueReplicas, lost: set[str], dead: int, within: float) -> float:
    """Seconds until every session the dead replica held has a live owner among the survivors."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < within:
        leases = mesh.leases()
        if all(k in leases and leases[k][0] != mesh.holder(dead) and leases[k][1] > 0 for k in lost):
            return time.monotonic() - t0
        await asyncio.sleep(0.05)
    leases = mesh.leases()
    missing = [k for k in lost if k not in leases or leases[k][0] == mesh.holder(dead)]
    raise AssertionError(f"{len(missing)} sessions not owned again within {within} s: {missing[:5]}")


def _heads_of_one_writer(postgres_url: str) -> tuple[int, int]:
    """(last event number, last reply cursor) in the database, after checking that no two writers
    wrote the same session sequence number."""
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        head = conn.execute("SELECT COALESCE(MAX(global_seq), 0) FROM flynn_queue.events").fetchone()
        reply_head = conn.execute("SELECT COALESCE(MAX(cursor), 0) FROM flynn_queue.replies").fetchone()
        dup_seq = conn.execute(
            "SELECT session_key, session_seq FROM flynn_queue.events GROUP BY 1, 2 HAVING count(*) > 1"
        ).fetchall()
    assert head is not None and reply_head is not None
    assert not dup_seq, f"two writers wrote the same session sequence number: {dup_seq[:5]}"
    return int(head[0]), int(reply_head[0])


async def test_three_replicas_sigkill_the_busiest_twice(
    start_replicas: StartReplicas, tokens: Tokens, postgres_url: str
) -> None:
    mesh = start_replicas(replicas=3, config_yaml=CONFIG, lease_seconds=LEASE)
    md = tokens.md("operator")
    acked: dict[tuple[str, str], str] = {}
    assert mesh.gateway is not None
    ch = grpc.aio.insecure_channel(mesh.gateway.address)
    stub = pb_grpc.RunControlStub(ch)
    consumer = Consumer(stub, md, reconnect=True)
    streams = consumer.start()
    stop = asyncio.Event()
    sem = asyncio.Semaphore(16)  # bounded load: at most 16 calls in flight

    async def load(i: int) -> None:
        n = 0
        while not stop.is_set() and n < 60:
            key = f"s{i}/m{n}"
            async with sem:
                resp = await _submit(stub, md, f"s{i}", key, f"m{n}")
            acked[(f"s{i}", key)] = resp.message_id
            n += 1
            await asyncio.sleep(0.02 + 0.01 * (i % 5))

    loaders = [asyncio.ensure_future(load(i)) for i in range(SESSIONS)]
    while len(acked) < 400:  # noqa: ASYNC110 - polling a counter the loaders fill
        await asyncio.sleep(0.02)
    owners = mesh.owners()
    assert len([i for i, n in owners.items() if n > 0]) >= 2, owners  # the sessions are spread
    for _kill in range(2):
        victim = mesh.busiest()
        lost = {k for k, (h, _) in mesh.leases().items() if h == mesh.holder(victim)}
        mesh.kill(victim)
        took = await _wait_owned_again(mesh, lost, victim, within=LEASE + 2.0)
        print(f"killed replica {victim} owning {len(lost)} sessions: all owned again after {took:.2f} s")
        target = len(acked) + 150
        while len(acked) < target and not all(t.done() for t in loaders):  # noqa: ASYNC110
            await asyncio.sleep(0.02)
    stop.set()
    await asyncio.gather(*loaders)

    # Every acknowledged message is still known by its key (DUPLICATE, same id), via the survivor.
    for (session, key), mid in list(acked.items())[:: max(1, len(acked) // 200)]:
        resp = await _submit(stub, md, session, key, "again")
        assert resp.disposition == pb.DISPOSITION_DUPLICATE and resp.message_id == mid, key

    keys = [f"s{i}" for i in range(SESSIONS)]
    assert await sessions_idle(stub, md, keys, polls=600, every=0.1, call_timeout=10), (
        "sessions did not settle"
    )

    head, reply_head = _heads_of_one_writer(postgres_url)
    for _ in range(600):
        if consumer.cursor >= head and consumer.reply_cursor >= reply_head:
            break
        await asyncio.sleep(0.05)
    for t in streams:
        t.cancel()
    await asyncio.gather(*streams, return_exceptions=True)

    # Streams: from 1 to the head without a gap or a repeat, across both failovers.
    assert [e.global_seq for e in consumer.events] == list(range(1, head + 1))
    assert [r.cursor for r in consumer.replies] == list(range(1, reply_head + 1))

    runs = await all_runs(stub, md)
    consumer.assert_one_terminal_each(runs)
    finals = Counter(r.run_id for r in consumer.replies if r.kind == pb.REPLY_KIND_FINAL)
    assert all(n == 1 for n in finals.values()), "a run got two finals"
    assert set(finals) == {r.run_id for r in runs if r.state == pb.RUN_STATE_COMPLETED}
    # Every acknowledged message became exactly one run, or an event says why not.
    in_runs = Counter(m for r in runs for m in r.message_ids)
    assert all(n == 1 for n in in_runs.values()), "a message is in two runs"
    consumer.assert_nothing_lost(acked, runs)
    # The kills left runs mid-flight: the new owners recovered them with the restart policy.
    assert any(r.attempt >= 2 for r in runs) or any(e.reason.startswith("restart") for e in consumer.events)
    await ch.close()


async def test_a_paused_owner_is_fenced_and_steps_down(
    start_replicas: StartReplicas, tokens: Tokens, postgres_url: str
) -> None:
    """SIGSTOP the owner of a session with a run streaming output for longer than the lease, let the
    other replica take the session over, SIGCONT: the old owner's writes are refused by the epoch, it
    steps down, and the session has one writer in the database."""
    cfg = (
        "server: {queue: {mode: followup, restart_policy: rerun}, agent: {chunks: 40, chunk_interval: 50ms}}"
    )
    mesh = start_replicas(replicas=2, config_yaml=cfg, lease_seconds=1.5)
    md = tokens.md("operator")
    assert mesh.gateway is not None
    ch = grpc.aio.insecure_channel(mesh.gateway.address)
    stub = pb_grpc.RunControlStub(ch)
    first = await _submit(stub, md, "p", "p/1", "long run")
    owner = mesh.index_of(mesh.leases()["p"][0])
    other = 1 - owner
    await asyncio.sleep(0.3)  # output is streaming on the owner
    mesh.pause(owner)
    try:
        await _wait_owned_again(mesh, {"p"}, owner, within=1.5 + 2.0)
        # The session is served by the new owner while the old one is frozen.
        second = await _submit(stub, md, "p", "p/2", "after the takeover")
        assert second.disposition in (pb.DISPOSITION_QUEUED, pb.DISPOSITION_STARTED)
    finally:
        mesh.resume(owner)
    log = mesh.queue[owner].log_path
    assert log is not None
    await _until_logged(log, "stepped down from sessions", "the paused owner did not step down")
    # Its output chunks kept coming after SIGCONT: their batch was refused by the epoch.
    await _until_logged(
        log,
        "a batch was refused: stale owner epoch",
        "the paused owner's writes were not refused by the epoch",
    )
    assert mesh.leases()["p"][0] == mesh.holder(other)
    for _ in range(300):
        r1 = (await stub.GetRun(pb.GetRunRequest(run_id=first.run_id), metadata=md)).run
        r2 = (await stub.GetRun(pb.GetRunRequest(run_id=second.run_id), metadata=md)).run
        if r1.state in (pb.RUN_STATE_COMPLETED, pb.RUN_STATE_ERROR) and r2.state == pb.RUN_STATE_COMPLETED:
            break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError("runs did not finish")
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        seqs = [r[0] for r in conn.execute(
            "SELECT session_seq FROM flynn_queue.events WHERE session_key = 'p' ORDER BY global_seq"
        ).fetchall()]  # fmt: skip
        terminal_rows = conn.execute(
            "SELECT data FROM flynn_queue.events WHERE session_key = 'p' AND type = ANY(%s)",
            ([int(t) for t in TERMINAL_EVENTS],),
        ).fetchall()
        finals = conn.execute(
            "SELECT run_id, count(*) FROM flynn_queue.replies WHERE session_key = 'p' AND kind = 1 GROUP BY run_id"
        ).fetchall()
    # One writer at a time: the session's sequence numbers are 1, 2, 3… in commit order.
    assert seqs == list(range(1, len(seqs) + 1)), seqs
    terminals = Counter(pb.RunEvent.FromString(bytes(r[0])).run_id for r in terminal_rows)
    assert set(terminals) == {first.run_id, second.run_id} and all(n == 1 for n in terminals.values())
    assert all(n == 1 for _, n in finals)
    await ch.close()


async def test_a_cancel_through_any_replica_reaches_the_agent_on_the_owner(
    start_replicas: StartReplicas, tokens: Tokens
) -> None:
    """Runs streaming on two replicas; cancels through the gateway land on either replica (round-robin)
    and are forwarded to the owner, whose agent stops: every run ends cancelled by the agent (not
    forced past the cancel deadline), and the forwarded cancels are counted."""
    cfg = (
        "server: {queue: {mode: followup, cancel_deadline: 30s}, agent: {chunks: 400, chunk_interval: 50ms}}"
    )
    mesh = start_replicas(replicas=2, config_yaml=cfg)
    md = tokens.md("operator")
    assert mesh.gateway is not None
    ch = grpc.aio.insecure_channel(mesh.gateway.address)
    stub = pb_grpc.RunControlStub(ch)
    runs = [(await _submit(stub, md, f"c{i}", f"c{i}/1", "stream")).run_id for i in range(8)]
    assert len(set(mesh.owners())) == 2, mesh.owners()  # the sessions are on both replicas
    await asyncio.sleep(0.3)
    for run_id in reversed(runs):  # round-robin: most cancels land on the replica not owning the run
        resp = await stub.CancelRun(
            pb.CancelRunRequest(run_id=run_id, reason="stop"), metadata=md, timeout=10
        )
        assert resp.outcome == pb.CANCEL_OUTCOME_CANCEL_REQUESTED, resp
    for run_id in runs:
        for _ in range(100):
            run = (await stub.GetRun(pb.GetRunRequest(run_id=run_id), metadata=md, timeout=10)).run
            if run.state == pb.RUN_STATE_CANCELLED:
                break
            await asyncio.sleep(0.05)
        assert run.state == pb.RUN_STATE_CANCELLED and run.cancel_reason == "stop", run
    forwarded = 0
    for proc in mesh.queue:
        assert proc.proc is not None
        port = int((proc.data_dir / ".queue.port").read_text().split()[1])
        text = await asyncio.to_thread(_get, f"http://127.0.0.1:{port}/metrics")
        forwarded += sum(
            int(float(line.rsplit(" ", 1)[1]))
            for line in text.splitlines()
            if line.startswith('flynn_queue_calls_forwarded_total{method="CancelRun"}')
        )
    assert forwarded >= 1  # round-robin sent some cancels to the replica not owning the run
    await ch.close()
