"""Owner hints (queue_svc/ownership.py `owner_hint`): a run-control replica asked about a session another
live replica owns reads the lease (no write: the lease's epoch and holder are untouched), remembers the
owner until that lease's expiry, and forwards the next calls at once. When the session moves (its
owner hands it over on SIGTERM and a survivor adopts it; the old owner comes back at the same address,
alive and owning nothing), every replica still answers calls about it promptly, whatever it
remembered: a hint is refreshed by the takeover loop's look-up, or dropped when the owner it names does
not answer or answers SESSION_OWNER_MOVED, and never makes a caller wait for the old lease.

Three real replica processes on one real PostgreSQL, called directly (no gateway) so that each call
reaches the replica the test names.
"""

from __future__ import annotations

import asyncio
import time
import urllib.request

import grpc
import psycopg
from flynn.v1 import gateway_pb2, gateway_pb2_grpc
from flynn.v1 import run_control_pb2 as pb
from flynn.v1 import run_control_pb2_grpc as pb_grpc

from tests.replicas.conftest import StartReplicas
from tests.support.mesh import Tokens
from tests.support.replicas import QueueReplicas

CONFIG = "server: {queue: {mode: followup}, agent: {think_time: 60s}}\n"
#: Long, so that a hint stays valid across the stops and starts below (a handover expires it at once).
LEASE = 30.0


def _stub(mesh: QueueReplicas, i: int) -> tuple[grpc.aio.Channel, pb_grpc.RunControlStub]:
    ch = grpc.aio.insecure_channel(mesh.queue[i].address)
    return ch, pb_grpc.RunControlStub(ch)


async def test_stale_owner_hints_cost_neither_the_lease_nor_an_error(
    start_replicas: StartReplicas, tokens: Tokens
) -> None:
    mesh = start_replicas(replicas=3, config_yaml=CONFIG, lease_seconds=LEASE)
    md = tokens.md("operator")
    channels: list[grpc.aio.Channel] = []
    try:
        (cha, a), (chb, b), (chc, c) = (_stub(mesh, i) for i in range(3))
        channels += [cha, chb, chc]
        run = await a.SubmitMessage(
            pb.SubmitMessageRequest(session_key="s", channel="t", text="work", idempotency_key="k1"),
            metadata=md, timeout=10,
        )  # fmt: skip
        assert mesh.leases()["s"][0] == mesh.holder(0)
        epoch = _epoch(mesh)
        # B and C forward to A; the first call reads the lease, the next ones go by the hint.
        for stub in (b, c) * 3:
            got = await stub.GetSession(pb.GetSessionRequest(session_key="s"), metadata=md, timeout=10)
            assert got.session.active_run_id == run.run_id
        assert _epoch(mesh) == epoch and mesh.leases()["s"][0] == mesh.holder(0)  # they took nothing

        # A dead hinted owner: A stops gracefully (hands its leases over); a survivor's takeover loop
        # adopts the session; the other survivor still remembers A.
        mesh.queue[0].terminate()
        for _ in range(100):
            owner = mesh.index_of(mesh.leases().get("s", ("replica-0", 0.0))[0])
            if owner != 0:
                break
            await asyncio.sleep(0.05)
        assert owner in (1, 2)
        stale = (b, c)[2 - owner]  # the survivor that did not adopt it
        t0 = time.monotonic()
        await stale.GetSession(pb.GetSessionRequest(session_key="s"), metadata=md, timeout=10)
        assert time.monotonic() - t0 < LEASE / 3, "a stale hint made the call wait for the old lease"
        assert mesh.index_of(mesh.leases()["s"][0]) == owner

        # A live replica named by stale hints: everyone learns the owner, the owner hands the session
        # over and comes back at the same address, alive and (once a survivor adopted it) not the
        # owner. The replicas remembering it get SESSION_OWNER_MOVED (or, while its channel
        # reconnects, no answer) and look the owner up afresh: the caller sees a plain answer.
        mesh.queue[0].start(timeout=60)
        stubs = [a, b, c]
        for stub in stubs:
            await stub.GetSession(pb.GetSessionRequest(session_key="s"), metadata=md, timeout=10)
        mesh.queue[owner].terminate()
        mesh.queue[owner].start(timeout=60)
        for stub in stubs:
            t0 = time.monotonic()
            got = await stub.GetSession(pb.GetSessionRequest(session_key="s"), metadata=md, timeout=10)
            assert got.session.session_key == "s"
            assert time.monotonic() - t0 < LEASE / 3
        cancelled = await stubs[owner].CancelRun(
            pb.CancelRunRequest(session_key="s", reason="stop"), metadata=md, timeout=10
        )
        assert cancelled.outcome in (pb.CANCEL_OUTCOME_CANCEL_REQUESTED, pb.CANCEL_OUTCOME_NO_ACTIVE_RUN)
    finally:
        for ch in channels:
            await ch.close()


def _epoch(mesh: QueueReplicas) -> int:
    with psycopg.connect(mesh.database_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT epoch FROM flynn_queue.leases WHERE scope = 'session' AND name = 's'"
        ).fetchone()
    assert row is not None
    return int(row[0])


def _forwarded_cancels(mesh: QueueReplicas) -> int:
    total = 0
    for i, proc in enumerate(mesh.queue):
        if i in mesh.dead:
            continue
        port = int((proc.data_dir / ".queue.port").read_text().split()[1])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
        total += sum(
            int(float(line.rsplit(" ", 1)[1]))
            for line in text.splitlines()
            if line.startswith('flynn_queue_calls_forwarded_total{method="CancelRun"}')
        )
    return total


async def test_the_gateway_sends_cancels_straight_to_the_owner(
    start_replicas: StartReplicas, tokens: Tokens
) -> None:
    """Gateway/SendMessage learns each session's owner from the replica's answer (x-flynn-owner), so
    Gateway/CancelRun reaches the owner directly: no cancel is forwarded between replicas. When that
    owner dies, the cancel goes to any replica instead, which waits for the lease and answers."""
    mesh = start_replicas(replicas=3, config_yaml=CONFIG, lease_seconds=2.0)
    md = tokens.md("operator")
    assert mesh.gateway is not None
    async with grpc.aio.insecure_channel(mesh.gateway.address) as ch:
        gw = gateway_pb2_grpc.GatewayStub(ch)

        async def send(session: str) -> str:
            r = await gw.SendMessage(
                gateway_pb2.SendMessageRequest(channel="t", session_key=session, text="work", idempotency_key="k"),
                metadata=md, timeout=10,
            )  # fmt: skip
            return str(r.run_id)

        runs = [await send(f"g{i}") for i in range(9)]
        assert len(mesh.owners()) == 3, mesh.owners()  # round-robin spread the sessions
        for run_id in runs:
            resp = await gw.CancelRun(
                gateway_pb2.GatewayCancelRunRequest(run_id=run_id, reason="stop"), metadata=md, timeout=10
            )
            assert resp.outcome == pb.CANCEL_OUTCOME_CANCEL_REQUESTED, resp
        assert await asyncio.to_thread(_forwarded_cancels, mesh) == 0

        # The remembered owner dies: the cancel still gets its answer (another replica adopts).
        run_id = await send("g-last")
        victim = mesh.index_of(mesh.leases()["g-last"][0])
        mesh.kill(victim)
        resp = await gw.CancelRun(
            gateway_pb2.GatewayCancelRunRequest(run_id=run_id, reason="stop"), metadata=md, timeout=15
        )
        assert resp.run_id == run_id
        assert mesh.index_of(mesh.leases()["g-last"][0]) != victim
