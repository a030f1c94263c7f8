"""NODES.md's close table through the gateway: a node connected through the gateway gets
`NodeClose{shutdown, reconnect: true}` when the nodes service or the gateway itself is SIGTERMed,
then reconnects by itself."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
from flynn.v1 import nodes_pb2, nodes_pb2_grpc

from examples.companion_node import CompanionNode
from tests.support.mesh import ServiceProcess, Tokens, free_port
from tests.support.nodes import config_yaml, eventually, nodes_config, started, stop_all


async def test_sigterm_of_nodes_or_gateway_sends_node_close_shutdown(tmp_path: Path, tokens: Tokens) -> None:
    cfg_file = tmp_path / "nodes.yaml"
    cfg_file.write_text(config_yaml(nodes_config(heartbeat_s=0.5, lease_s=3)))
    nodes = ServiceProcess(
        "nodes",
        "nodes_svc.main",
        tmp_path / "nodes",
        tokens,
        port=free_port(),
        extra=["--nodes-config", str(cfg_file)],
    )
    nodes.start()
    gateway = ServiceProcess(
        "gateway",
        "gateway.main",
        tmp_path / "gateway",
        tokens,
        addresses={"nodes": nodes.address},
        port=free_port(),
    )
    pairs = []
    try:
        gateway.start()
        async with grpc.aio.insecure_channel(gateway.address) as ch:
            tok = await nodes_pb2_grpc.NodesStub(ch).IssueNodeToken(
                nodes_pb2.IssueNodeTokenRequest(node_id="laptop", role="desktop"),
                metadata=tokens.md("operator"),
                timeout=10,
            )
        node = CompanionNode(
            gateway.address, "laptop", tok.token, "desktop", backoff_initial=0.05, backoff_max=0.5
        )
        pairs.append((node, await started(node)))

        # 1. The nodes service stops: its NodeClose travels through the gateway.
        assert await asyncio.to_thread(nodes.terminate) == 0
        await eventually(lambda: len(node.stats.closes) >= 1, what="NodeClose from the nodes service")
        assert node.stats.closes[0].reason == "shutdown" and node.stats.closes[0].reconnect
        await asyncio.to_thread(nodes.start)
        await eventually(
            lambda: node.epoch >= 2 and node.registered.is_set(), what="back after nodes restart"
        )

        # 2. The gateway itself stops: the node is told the same, not just UNAVAILABLE.
        closes_before = len(node.stats.closes)
        assert await asyncio.to_thread(gateway.terminate) == 0
        await eventually(lambda: len(node.stats.closes) > closes_before, what="NodeClose from the gateway")
        last = node.stats.closes[-1]
        assert last.reason == "shutdown" and last.reconnect, last
        await asyncio.to_thread(gateway.start)
        await eventually(
            lambda: node.epoch >= 3 and node.registered.is_set(), what="back after gateway restart"
        )
    finally:
        await stop_all(pairs)
        gateway.stop()
        nodes.stop()
