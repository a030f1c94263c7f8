"""Two nodes replicas (real processes) on one real PostgreSQL: presence, forwarding, fencing, canvas."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from flynn.v1 import canvas_pb2, canvas_pb2_grpc, nodes_pb2, nodes_pb2_grpc

from examples.companion_node import CompanionNode
from flynn_runtime.rich_status import from_rpc_error
from tests.support.mesh import ServiceProcess, Tokens, all_started
from tests.support.nodes import config_yaml, eventually, nodes_config, started, stop_all


@pytest.fixture
def replicas(tmp_path: Path, tokens: Tokens, postgres_url: str) -> Iterator[list[ServiceProcess]]:
    cfg_file = tmp_path / "nodes.yaml"
    cfg_file.write_text(config_yaml(nodes_config(heartbeat_s=0.5, lease_s=3)))
    procs = [
        ServiceProcess(
            "nodes",
            "nodes_svc.main",
            tmp_path / f"nodes-{name}",
            tokens,
            extra=["--nodes-config", str(cfg_file), "--database-url", postgres_url],
        )
        for name in ("a", "b")
    ]
    with all_started(procs):
        yield procs


async def _list(stub: nodes_pb2_grpc.NodesStub, md: tuple[tuple[str, str], ...]) -> list[nodes_pb2.Node]:
    resp = await stub.ListNodes(nodes_pb2.ListNodesRequest(page_size=100), metadata=md, timeout=10)
    return list(resp.nodes)


async def _invoke(
    stub: nodes_pb2_grpc.NodesStub, md: tuple[tuple[str, str], ...], node_id: str, timeout_ms: int = 5000
) -> nodes_pb2.InvokeResult:
    result = None
    async for item in stub.InvokeNode(
        nodes_pb2.InvokeNodeRequest(node_id=node_id, command="device.info", timeout_ms=timeout_ms),
        metadata=md,
        timeout=timeout_ms / 1000 + 2,
    ):
        if item.HasField("result"):
            result = item.result
    assert result is not None
    return result


async def test_node_on_a_invoked_through_b_and_reconnecting_to_b_is_listed_once(
    replicas: list[ServiceProcess], tokens: Tokens
) -> None:
    a, b = replicas
    md = tokens.md("operator")
    async with grpc.aio.insecure_channel(a.address) as ch_a, grpc.aio.insecure_channel(b.address) as ch_b:
        sa, sb = nodes_pb2_grpc.NodesStub(ch_a), nodes_pb2_grpc.NodesStub(ch_b)
        tok = await sa.IssueNodeToken(
            nodes_pb2.IssueNodeTokenRequest(node_id="laptop", role="desktop"), metadata=md, timeout=10
        )
        # A token issued through A authenticates on B too (tokens live in the database).
        first = CompanionNode(
            a.address, "laptop", tok.token, "desktop", backoff_initial=0.05, backoff_max=0.5
        )
        pairs = [(first, await started(first))]
        try:
            # Invoked through B: forwarded to A, which holds the stream.
            result = await _invoke(sb, md, "laptop")
            assert result.ok and json.loads(result.result_json)
            assert first.stats.invokes == 1
            for stub in (sa, sb):
                nodes = await _list(stub, md)
                assert [(n.node_id, n.status, n.epoch) for n in nodes] == [
                    ("laptop", nodes_pb2.NODE_STATUS_ONLINE, 1)
                ]
            # The node reconnects to B: B bumps the epoch, A is woken and closes the old stream.
            second = CompanionNode(
                b.address, "laptop", tok.token, "desktop", backoff_initial=0.05, backoff_max=0.5
            )
            pairs.append((second, await started(second)))
            assert second.epoch == 2
            await eventually(lambda: not first.registered.is_set(), 5, "the old stream on A fenced")
            assert [c.reason for c in first.stats.closes] == ["replaced"]
            for stub in (sa, sb):
                nodes = await _list(stub, md)
                assert [(n.node_id, n.status, n.epoch) for n in nodes] == [
                    ("laptop", nodes_pb2.NODE_STATUS_ONLINE, 2)
                ]
            # Invokes through either replica reach the new stream on B.
            for stub in (sa, sb):
                assert (await _invoke(stub, md, "laptop")).ok
            assert second.stats.invokes == 2 and first.stats.invokes == 1
            # The fenced stream stays fenced: still listed once after A's offline bookkeeping ran.
            await asyncio.sleep(0.5)
            nodes = await _list(sa, md)
            assert len(nodes) == 1 and nodes[0].status == nodes_pb2.NODE_STATUS_ONLINE
            # Canvas from either replica: a put through A is read through B.
            ca, cb = canvas_pb2_grpc.CanvasStub(ch_a), canvas_pb2_grpc.CanvasStub(ch_b)
            put = await ca.PutArtifact(
                canvas_pb2.PutArtifactRequest(
                    name="page.html", content=b"<p>hi</p>", content_type="text/html"
                ),
                metadata=md,
                timeout=10,
            )
            got = await cb.GetArtifact(
                canvas_pb2.GetArtifactRequest(name="page.html"), metadata=md, timeout=10
            )
            assert got.artifact.content == b"<p>hi</p>" and got.artifact.sha256 == put.artifact.sha256
        finally:
            await stop_all(pairs)


async def test_invoke_fails_fast_when_the_owner_replica_is_gone(
    replicas: list[ServiceProcess], tokens: Tokens
) -> None:
    a, b = replicas
    md = tokens.md("operator")
    async with grpc.aio.insecure_channel(a.address) as ch_a, grpc.aio.insecure_channel(b.address) as ch_b:
        sa, sb = nodes_pb2_grpc.NodesStub(ch_a), nodes_pb2_grpc.NodesStub(ch_b)
        tok = await sa.IssueNodeToken(
            nodes_pb2.IssueNodeTokenRequest(node_id="phone", role="phone"), metadata=md, timeout=10
        )
        # A node that does not reconnect (a long backoff), so "gone" stays gone during the test.
        node = CompanionNode(a.address, "phone", tok.token, "phone", backoff_initial=60, backoff_max=60)
        pairs = [(node, await started(node))]
        try:
            a.kill9()
            t0 = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await _invoke(sb, md, "phone", timeout_ms=8000)
            took = time.monotonic() - t0
            rich = from_rpc_error(err.value)
            assert rich is not None, err.value
            # Either the owner's lease already expired (offline) or the owner is unreachable: both
            # are named, and neither waits out the invoke's 8 s deadline.
            assert (err.value.code(), rich.reason) in {
                (grpc.StatusCode.UNAVAILABLE, "NODE_OWNER_UNREACHABLE"),
                (grpc.StatusCode.FAILED_PRECONDITION, "NODE_OFFLINE"),
            }, rich
            assert took < 8, took
            # Within the presence lease (5 s) plus a renewal, B marks the node offline ("replica_lost").

            async def offline() -> bool:
                nodes = await _list(sb, md)
                return bool(nodes) and nodes[0].status == nodes_pb2.NODE_STATUS_OFFLINE

            await eventually(offline, 15, "the dead replica's node marked offline")
            nodes = await _list(sb, md)
            assert nodes[0].offline_reason == "replica_lost"
            with pytest.raises(grpc.aio.AioRpcError) as err2:
                await _invoke(sb, md, "phone")
            assert err2.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        finally:
            await stop_all(pairs)


async def test_a_paused_replica_comes_back_with_its_node_online_and_listed_once(
    replicas: list[ServiceProcess], tokens: Tokens
) -> None:
    """SIGSTOP the replica holding a node's stream past the presence lease: the other replica marks
    the node offline (replica_lost); after SIGCONT the node is online again, listed once, invocable
    through either replica (the stream reasserted, or the node registered again)."""
    a, b = replicas
    md = tokens.md("operator")
    async with grpc.aio.insecure_channel(a.address) as ch_a, grpc.aio.insecure_channel(b.address) as ch_b:
        sa, sb = nodes_pb2_grpc.NodesStub(ch_a), nodes_pb2_grpc.NodesStub(ch_b)
        tok = await sa.IssueNodeToken(
            nodes_pb2.IssueNodeTokenRequest(node_id="tablet", role="desktop"), metadata=md, timeout=10
        )
        node = CompanionNode(a.address, "tablet", tok.token, "desktop", backoff_initial=0.05, backoff_max=0.5)
        pairs = [(node, await started(node))]
        try:
            assert a.proc is not None
            a.proc.send_signal(signal.SIGSTOP)

            async def offline_on_b() -> bool:
                nodes = await _list(sb, md)
                return bool(nodes) and nodes[0].status == nodes_pb2.NODE_STATUS_OFFLINE

            await eventually(offline_on_b, 20, "the paused replica's node marked offline by b")
            a.proc.send_signal(signal.SIGCONT)

            async def online_everywhere() -> bool:
                lists = [await _list(s, md) for s in (sa, sb)]
                return all(
                    [(n.node_id, n.status) for n in nodes] == [("tablet", nodes_pb2.NODE_STATUS_ONLINE)]
                    for nodes in lists
                )

            await eventually(online_everywhere, 20, "the node online again, listed once")
            for stub in (sa, sb):
                assert (await _invoke(stub, md, "tablet")).ok
        finally:
            if a.proc is not None and a.proc.poll() is None:
                a.proc.send_signal(signal.SIGCONT)
            await stop_all(pairs)
