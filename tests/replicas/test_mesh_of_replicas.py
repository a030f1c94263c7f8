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

import grpc
from flynn.v1 import nodes_pb2, nodes_pb2_grpc, run_control_pb2

from examples.companion_node import CompanionNode
from tests.support.mesh import Tokens
from tests.support.nodes import eventually
from tests.support.replica_mesh import ReplicaMesh


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
