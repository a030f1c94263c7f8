"""A companion node and an operator reach the nodes process through the real gateway process."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import grpc
import pytest
from flynn.v1 import canvas_pb2, canvas_pb2_grpc, nodes_pb2, nodes_pb2_grpc

from examples.companion_node import CompanionNode
from tests.support.gateway import module_exists
from tests.support.mesh import ServiceProcess, Tokens, free_port
from tests.support.nodes import config_yaml, eventually, nodes_config, started, stop_all

pytestmark = pytest.mark.skipif(not module_exists("gateway.main"), reason="gateway not built yet")


async def test_connect_invoke_and_canvas_through_gateway(tmp_path: Path, tokens: Tokens) -> None:
    cfg_file = tmp_path / "nodes.yaml"
    cfg_file.write_text(config_yaml(nodes_config()))
    nodes_proc = ServiceProcess(
        "nodes", "nodes_svc.main", tmp_path / "nodes", tokens, extra=["--nodes-config", str(cfg_file)]
    )
    gw: ServiceProcess | None = None
    pairs = []
    try:
        await asyncio.to_thread(nodes_proc.start)
        dead = {b: f"127.0.0.1:{free_port()}" for b in ("config", "queue", "reactions", "voice")}
        gw = ServiceProcess(
            "gateway",
            "gateway.main",
            tmp_path / "gateway",
            tokens,
            addresses={"nodes": nodes_proc.address, **dead},
        )
        await asyncio.to_thread(gw.start)
        md = tokens.md("operator")
        async with grpc.aio.insecure_channel(gw.address) as ch:
            nodes = nodes_pb2_grpc.NodesStub(ch)
            tok = await nodes.IssueNodeToken(
                nodes_pb2.IssueNodeTokenRequest(node_id="desk-1", role="desktop"), metadata=md, timeout=10
            )
            node = CompanionNode(
                gw.address, "desk-1", tok.token, "desktop", backoff_initial=0.05, backoff_max=0.5
            )
            pairs.append((node, await started(node)))
            items = [
                m
                async for m in nodes.InvokeNode(
                    nodes_pb2.InvokeNodeRequest(
                        node_id="desk-1",
                        command="canvas.present",
                        args_json=json.dumps({"name": "b", "steps": 2}),
                    ),
                    metadata=md,
                    timeout=10,
                )
            ]
            assert [m.WhichOneof("message") for m in items] == ["progress", "progress", "result"] and items[
                -1
            ].result.ok
            put = await canvas_pb2_grpc.CanvasStub(ch).PutArtifact(
                canvas_pb2.PutArtifactRequest(name="via/gw", content_type="text/plain", content=b"hi"),
                metadata=md,
                timeout=10,
            )
            assert put.artifact.version == 1
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                async for _ in nodes.InvokeNode(
                    nodes_pb2.InvokeNodeRequest(
                        node_id="desk-1",
                        command="system.notify",
                        args_json='{"sleep_ms": 3000}',
                        timeout_ms=200,
                    ),
                    metadata=md,
                    timeout=10,
                ):
                    pass
            assert ei.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            await eventually(lambda: len(node.stats.deadline_missed) == 1, what="node saw the deadline")
    finally:
        await stop_all(pairs)
        if gw is not None:
            gw.stop()
        nodes_proc.stop()
