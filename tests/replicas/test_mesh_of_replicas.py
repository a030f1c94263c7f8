"""The whole mesh with two replicas of every stateful service on one real PostgreSQL, behind a real
gateway that reaches each service through the list of its replicas (round_robin): messages become
runs and reactions, a companion node is invoked through the gateway, then one replica of config,
reactions and nodes is SIGKILLed under load. Afterwards: every message was acked by the reaction
exactly once, no run has two finals, a config change reaches every service, and the node (back on
the surviving nodes replica) is invoked again and listed once."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import yaml
from flynn.v1 import nodes_pb2, nodes_pb2_grpc, run_control_pb2

from examples.companion_node import CompanionNode
from tests.support.flow import FLOW_SEED, FlowMesh, poll
from tests.support.gateway import ECHO_MODULE
from tests.support.mesh import ServiceProcess, Tokens, free_port
from tests.support.nodes import eventually

STATEFUL = ("config", "queue", "reactions", "nodes")
MODULES = {
    "config": "config_svc.main",
    "queue": "queue_svc.main",
    "reactions": "reactions_svc.main",
    "nodes": "nodes_svc.main",
}


class ReplicaMesh(FlowMesh):
    """FlowMesh's clients over a mesh whose stateful services run as two processes each."""

    database_url: str = ""
    replicas: dict[str, list[ServiceProcess]]

    def start(self) -> ReplicaMesh:
        seed = dict(FLOW_SEED)
        seed.pop("tts")  # no speech: the voice backend is an echo server here
        seed.pop("audio")
        seed_path = self.root / "seed.yaml"
        self.root.mkdir(parents=True, exist_ok=True)
        seed_path.write_text(yaml.safe_dump(seed, allow_unicode=True))
        ports = {name: [free_port(), free_port()] for name in STATEFUL}
        voice_port, gateway_port = free_port(), free_port()
        addresses = {name: ",".join(f"127.0.0.1:{p}" for p in ports[name]) for name in STATEFUL}
        addresses["voice"] = f"127.0.0.1:{voice_port}"
        self.replicas = {}
        echo = ServiceProcess("voice", ECHO_MODULE, self.root / "echo", self.tokens, port=voice_port)
        self.procs["voice"] = echo.start()
        for name in STATEFUL:
            self.replicas[name] = []
            for i, port in enumerate(ports[name]):
                extra = ["--database-url", self.database_url]
                if name == "config":
                    extra += ["--seed-file", str(seed_path)]
                proc = ServiceProcess(
                    name, MODULES[name], self.root / f"{name}{i}", self.tokens,
                    addresses=addresses, extra=extra, port=port, grace=5.0,
                )  # fmt: skip
                self.replicas[name].append(proc)
                self.procs[f"{name}{i}"] = proc
                proc.start(timeout=90)
        gw = ServiceProcess(
            "gateway",
            "gateway.main",
            self.root / "gateway",
            self.tokens,
            addresses=addresses,
            port=gateway_port,
        )
        self.procs["gateway"] = gw.start(timeout=90)
        self.wait_watchers_applied(self.head_revision(), timeout=60)
        return self

    def wait_watchers_applied(self, revision: int, timeout: float = 15.0) -> None:
        """Every watching service (through the watchers of both config replicas) reports `revision`."""
        services = {"queue", "reactions", "nodes", "gateway"}

        def ok() -> bool:
            best: dict[str, int] = {}
            for w in self.watchers():
                if w.connected:
                    best[w.identity.service] = max(best.get(w.identity.service, 0), w.applied_revision)
            return all(best.get(s, 0) >= revision for s in services)

        poll(ok, timeout=timeout, what=f"every watcher at revision {revision}")


@pytest.fixture
def mesh(tmp_path: Path, tokens: Tokens, postgres_url: str) -> Iterator[ReplicaMesh]:
    m = ReplicaMesh(tmp_path / "mesh", tokens)
    m.database_url = postgres_url
    try:
        m.start()
        yield m
    finally:
        m.stop()


def _send_all(mesh: ReplicaMesh, first: int, count: int) -> list[str]:
    ids = []
    for i in range(first, first + count):
        resp = mesh.send(f"tg:{i % 8}", f"message {i}", key=f"k{i}")
        assert resp.message_id
        ids.append(resp.message_id)
    return ids


async def _node_round(gateway: str, tokens: Tokens, node_id: str, token: str, invokes: int) -> CompanionNode:
    node = CompanionNode(gateway, node_id, token, "desktop", backoff_initial=0.05, backoff_max=0.5)
    task = node.start()
    await eventually(node.registered.is_set, 20, "node registered through the gateway")
    async with grpc.aio.insecure_channel(gateway) as ch:
        stub = nodes_pb2_grpc.NodesStub(ch)
        for _ in range(invokes):  # round_robin: some land on the replica without the stream
            result = None
            async for item in stub.InvokeNode(
                nodes_pb2.InvokeNodeRequest(node_id=node_id, command="device.info", timeout_ms=5000),
                metadata=tokens.md("operator"),
                timeout=10,
            ):
                if item.HasField("result"):
                    result = item.result
            assert result is not None and result.ok
    await node.stop()
    await asyncio.wait_for(task, 10)
    return node


def test_two_replicas_of_each_service_behind_the_gateway_survive_a_kill_each(
    mesh: ReplicaMesh, tokens: Tokens
) -> None:
    md_op = tokens.md("operator")
    nodes = nodes_pb2_grpc.NodesStub(mesh.channel())
    tok = nodes.IssueNodeToken(
        nodes_pb2.IssueNodeTokenRequest(node_id="laptop", role="desktop"), metadata=md_op, timeout=10
    )
    node = asyncio.run(_node_round(mesh.gateway, tokens, "laptop", tok.token, invokes=6))
    assert node.stats.invokes == 6
    ids = _send_all(mesh, 0, 20)
    # Kill one replica of config, reactions and nodes while the first messages are being handled.
    for name in ("config", "reactions", "nodes"):
        mesh.replicas[name][0].kill9()
    ids += _send_all(mesh, 20, 20)
    total = len(ids)

    def acked(replies: list[run_control_pb2.Reply]) -> bool:
        return {r.reply_to_message_id for r in replies if r.kind == run_control_pb2.REPLY_KIND_ACK} >= set(
            ids
        )

    replies = mesh.wait_replies(acked, timeout=90)
    time.sleep(1.0)
    replies = mesh.wait_replies(lambda rs: len(rs) >= len(replies), timeout=30)
    acks = Counter(r.reply_to_message_id for r in replies if r.kind == run_control_pb2.REPLY_KIND_ACK)
    assert set(acks) == set(ids) and all(n == 1 for n in acks.values()), acks.most_common(3)
    finals = Counter(r.run_id for r in replies if r.kind == run_control_pb2.REPLY_KIND_FINAL)
    assert finals and all(n == 1 for n in finals.values()), finals.most_common(3)
    print(f"{total} messages, {len(acks)} acks, {len(finals)} runs with one final each")
    # A config change through the gateway reaches every service (watchers of the dead config replica
    # reconnected to the survivor); ListWatchers (through either replica) sees them all.
    revision = mesh.update({"server.queue.cap": 40}, reason="after the kills")
    mesh.wait_watchers_applied(revision, timeout=30)
    # The node comes back through the gateway (to the surviving nodes replica) and is invoked again.
    node = asyncio.run(_node_round(mesh.gateway, tokens, "laptop", tok.token, invokes=4))
    assert node.stats.invokes == 4
    listed = nodes.ListNodes(nodes_pb2.ListNodesRequest(page_size=100), metadata=md_op, timeout=10)
    assert [n.node_id for n in listed.nodes] == ["laptop"]
    # And the reply stream is continuous: cursors strictly increasing without a gap.
    cursors = [r.cursor for r in replies]
    assert cursors == list(range(cursors[0], cursors[0] + len(cursors))), cursors[:10]
