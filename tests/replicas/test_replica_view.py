"""Every replica visible: two processes of each stateful service on one real PostgreSQL behind a real
gateway and a real console. Each replica records itself in its service's database (heartbeat from its
lease loop), so the gateway's System.GetStatus and the console's /api/replicas list two entries per
service with distinct ids and the addresses the processes listen on, with what each holds; a
SIGKILLed replica is listed as gone within its bound (the 5 s lease after its last heartbeat), the
survivor stays ready. With SQLite each service is listed as its one process."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from flynn.v1 import system_pb2, system_pb2_grpc

from tests.support.console import ConsoleProcess
from tests.support.flow import FlowMesh, poll
from tests.support.mesh import ServiceProcess, Tokens
from tests.support.replica_mesh import STATEFUL, ReplicaMesh

#: The stated bound: a replica is gone when its last heartbeat is older than its lease (5 s); the
#: kill comes at most lease/3 after a heartbeat. The slack covers this shared machine's scheduling
#: and the polling below, never the bound itself (the age is checked against it exactly).
GONE_AFTER = 5.0
SLACK = 4.0


def _status(mesh: FlowMesh) -> dict[str, system_pb2.ServiceStatus]:
    resp = mesh.system().GetStatus(system_pb2.GetStatusRequest(), metadata=mesh.md("operator"), timeout=10)
    return {s.service: s for s in resp.services}


def _holding(r: system_pb2.ReplicaStatus, name: str) -> float:
    return next((h.value for h in r.holdings if h.name == name), -1.0)


def _check_cli(mesh: ReplicaMesh, addresses: dict[str, set[str]]) -> None:
    """The operator CLI prints the same: a replica row per replica, READY."""
    out = mesh.flynn("status")
    assert out.returncode == 0, out.stdout + out.stderr
    rows = [line.split() for line in out.stdout.splitlines() if line.startswith("replica ")]
    for name in STATEFUL:
        ready = sorted(r[4] for r in rows if r[1] == name and r[5] == "READY")
        assert ready == sorted(addresses[name]), out.stdout


def _kill_and_see_gone(
    mesh: ReplicaMesh, victims: dict[str, ServiceProcess], addresses: dict[str, set[str]]
) -> None:
    """SIGKILL the victims; each is listed as gone within the bound, and the survivor stays ready."""
    killed_at = time.monotonic()
    for proc in victims.values():
        proc.kill9()
    seen_gone: dict[str, float] = {}

    def all_gone() -> dict[str, system_pb2.ServiceStatus] | None:
        st = _status(mesh)
        for name, proc in victims.items():
            dead = {r.address: r for r in st[name].replicas}.get(proc.address)
            if dead is not None and dead.state == system_pb2.REPLICA_STATE_GONE:
                seen_gone.setdefault(name, time.monotonic() - killed_at)
        return st if len(seen_gone) == len(victims) else None

    st = poll(all_gone, timeout=GONE_AFTER + SLACK + 10, interval=0.2, what="the killed replicas gone")
    print("killed → listed as gone (s):", {k: round(v, 2) for k, v in sorted(seen_gone.items())})
    for name, proc in victims.items():
        reps = {r.address: r for r in st[name].replicas}
        assert reps[proc.address].heartbeat_age_seconds > GONE_AFTER
        survivor = next(a for a in addresses[name] if a != proc.address)
        assert reps[survivor].state == system_pb2.REPLICA_STATE_READY, reps[survivor]
        assert seen_gone[name] <= GONE_AFTER + SLACK, (name, seen_gone)


def test_two_replicas_of_each_service_are_listed_and_a_killed_one_is_gone_within_its_bound(
    mesh: ReplicaMesh, tokens: Tokens
) -> None:
    for i in range(4):  # sessions for run control to own
        mesh.send(f"tg:view{i}", f"hello {i}", key=f"view-{i}")
    addresses = {name: {p.address for p in mesh.replicas[name]} for name in STATEFUL}

    def listed() -> dict[str, system_pb2.ServiceStatus] | None:
        st = _status(mesh)
        for name in STATEFUL:
            reps = st[name].replicas
            if len(reps) != 2 or any(r.state != system_pb2.REPLICA_STATE_READY for r in reps):
                return None
        owned = sum(_holding(r, "sessions_owned") for r in st["queue"].replicas)
        parts = sum(_holding(r, "partitions") for r in st["reactions"].replicas)
        # The watch streams of queue, reactions and nodes (two each) and the gateway.
        streams = sum(_holding(r, "watch_streams") for r in st["config"].replicas)
        return st if owned >= 1 and parts == 16 and streams >= 7 else None  # after a heartbeat that saw them

    st = poll(listed, timeout=30, interval=0.3, what="two ready replicas of every stateful service")
    for name in STATEFUL:
        reps = st[name].replicas
        assert len({r.replica_id for r in reps}) == 2, reps
        assert {r.address for r in reps} == addresses[name], (name, reps)
        for r in reps:
            assert r.lease_held and r.database_reachable and r.gone_after_seconds == GONE_AFTER
            assert r.start_time.seconds > 0 and r.heartbeat_age_seconds < GONE_AFTER
            assert r.version
        assert not st[name].replicas_detail
    # What each holds.
    assert all(_holding(r, "nodes_connected") == 0 for r in st["nodes"].replicas)
    assert all(r.detail.startswith("p") for r in st["reactions"].replicas)  # "p0 p1 …"
    # The stateless services list none.
    assert not st["gateway"].replicas and not st["voice"].replicas
    _check_cli(mesh, addresses)

    # The console's endpoint, through a real console process signed in as the operator.
    console = ConsoleProcess(mesh.root / "console", mesh.gateway).start()
    try:
        cookie = console.sign_in(tokens.operator)
        view = console.get_json("/api/replicas", cookie)
        by_service = {s["service"]: s for s in view["services"]}
        assert set(by_service) == set(STATEFUL)
        for name in STATEFUL:
            reps = by_service[name]["replicas"]
            assert {r["address"] for r in reps} == addresses[name]
            assert len({r["replica_id"] for r in reps}) == 2 and {r["state"] for r in reps} == {"ready"}
        assert sum(r["holdings"]["partitions"] for r in by_service["reactions"]["replicas"]) == 16

        # SIGKILL one replica of each: listed as gone within the bound; the survivor stays ready.
        victims = {name: mesh.replicas[name][0] for name in STATEFUL}
        _kill_and_see_gone(mesh, victims, addresses)
        view = console.get_json("/api/replicas", cookie)
        states = {(s["service"], r["address"]): r["state"] for s in view["services"] for r in s["replicas"]}
        for name, proc in victims.items():
            assert states[(name, proc.address)] == "gone"
    finally:
        console.stop()


@pytest.fixture
def sqlite_mesh(tmp_path: Path, tokens: Tokens) -> Iterator[FlowMesh]:
    m = FlowMesh(tmp_path / "mesh", tokens)
    try:
        m.start()
        yield m
    finally:
        m.stop()


def test_without_a_database_each_stateful_service_is_listed_as_its_one_process(sqlite_mesh: FlowMesh) -> None:
    st = _status(sqlite_mesh)
    for name in STATEFUL:
        [r] = st[name].replicas
        assert r.address == sqlite_mesh.procs[name].address, r
        assert r.state == system_pb2.REPLICA_STATE_READY and r.lease_held and r.heartbeat_age_seconds == 0
        assert r.replica_id.startswith(f"{name}-r")
    assert _holding(st["config"].replicas[0], "watch_streams") >= 4
    out = sqlite_mesh.flynn("status", "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    listed = {s["service"]: s.get("replicas", []) for s in json.loads(out.stdout)["services"]}
    assert all(len(listed[name]) == 1 for name in STATEFUL) and not listed["gateway"]


def _list_direct(address: str, tokens: Tokens) -> dict[str, system_pb2.ReplicaStatus]:
    """Replicas/ListReplicas on one replica directly (what an operator does on a pod), by address."""
    with grpc.insecure_channel(address) as ch:
        resp = system_pb2_grpc.ReplicasStub(ch).ListReplicas(
            system_pb2.ListReplicasRequest(), metadata=tokens.md("operator"), timeout=10
        )
    return {r.address: r for r in resp.replicas}


def _when(asked: str, tokens: Tokens, about: str, state: int) -> system_pb2.ReplicaStatus | None:
    """The replica at `about` as `asked` lists it, when it is in `state`."""
    r = _list_direct(asked, tokens).get(about)
    return r if r is not None and r.state == state else None


def test_a_stopped_replica_is_gone_at_once_and_a_frozen_one_comes_back_ready(
    tmp_path: Path, tokens: Tokens, postgres_url: str
) -> None:
    """Three config replicas, asked directly: SIGTERM marks the stopped one gone ("stopped") without
    waiting for the bound; a SIGSTOPped one turns gone after its bound and ready again after SIGCONT."""
    procs = [
        ServiceProcess(
            "config", "config_svc.main", tmp_path / f"config{i}", tokens,
            extra=["--database-url", postgres_url], grace=3.0,
        ).start(timeout=90)
        for i in range(3)
    ]  # fmt: skip
    ready, gone = system_pb2.REPLICA_STATE_READY, system_pb2.REPLICA_STATE_GONE
    try:
        a, b, c = procs
        poll(
            lambda: all(_when(b.address, tokens, p.address, ready) for p in procs) or None,
            timeout=20, what="three ready config replicas",
        )  # fmt: skip
        assert a.terminate(30) == 0
        stopped = _list_direct(b.address, tokens)[a.address]
        assert stopped.state == gone and stopped.detail == "stopped"
        assert stopped.heartbeat_age_seconds < GONE_AFTER  # gone at once, not after the bound
        assert c.proc is not None
        os.kill(c.proc.pid, signal.SIGSTOP)
        try:
            frozen = poll(
                lambda: _when(b.address, tokens, c.address, gone),
                timeout=GONE_AFTER + SLACK + 10, interval=0.2, what="the frozen replica gone",
            )  # fmt: skip
            assert frozen.heartbeat_age_seconds > GONE_AFTER and not frozen.detail
        finally:
            os.kill(c.proc.pid, signal.SIGCONT)
        back = poll(
            lambda: _when(b.address, tokens, c.address, ready),
            timeout=30, interval=0.2, what="the resumed replica ready again",
        )  # fmt: skip
        assert back.replica_id == frozen.replica_id and back.lease_held
        # Asked through the resumed replica itself, the answer is the same.
        assert _list_direct(c.address, tokens)[b.address].state == ready
    finally:
        for p in procs:
            p.stop()
