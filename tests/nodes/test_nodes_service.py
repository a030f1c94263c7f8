"""flynn.v1.Nodes through a real in-process server and real companion nodes (examples/companion_node.py)."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import grpc
import pytest
from flynn.v1 import nodes_pb2

from examples.companion_node import CompanionNode, InvokeContext
from flynn_runtime.audit import read_audit
from flynn_runtime.rich_status import from_rpc_error
from tests.support.nodes import NodesHarness, eventually, nodes_config, started, stop_all


async def _list(h: NodesHarness) -> list[nodes_pb2.Node]:
    resp = await h.nodes.ListNodes(nodes_pb2.ListNodesRequest(page_size=1000), metadata=h.op(), timeout=10)
    return list(resp.nodes)


async def _raw_connect(
    h: NodesHarness, reg: nodes_pb2.NodeRegister
) -> tuple[list[nodes_pb2.ConnectResponse], grpc.aio.AioRpcError | None]:
    """Send one message and read until the stream ends (or the first message, when registered)."""
    call: Any = h.nodes.Connect()
    await call.write(nodes_pb2.ConnectRequest(register=reg))
    got: list[nodes_pb2.ConnectResponse] = []
    try:
        msg = await asyncio.wait_for(call.read(), 10)
        if msg is not grpc.aio.EOF:  # type: ignore[attr-defined]
            got.append(msg)
        call.cancel()
        return got, None
    except grpc.aio.AioRpcError as e:
        return got, e


async def test_reconnect_same_identity_keeps_one_registration(harness: NodesHarness) -> None:
    h = harness
    first = await h.node("desk-1")
    t1 = await started(first)
    assert first.epoch == 1
    tok = first.token
    second = CompanionNode(h.address, "desk-1", tok, "desktop", backoff_initial=0.05)
    t2 = await started(second)
    assert second.epoch == 2
    # The old stream was told it is replaced and does not reconnect (no reconnect loop).
    assert (await asyncio.wait_for(t1, 10)) == "closed by server: replaced"
    assert [c.reason for c in first.stats.closes] == ["replaced"]
    assert first.stats.closes[0].reconnect is False
    nodes = await _list(h)
    assert [n.node_id for n in nodes] == ["desk-1"]
    n = nodes[0]
    assert n.epoch == 2 and n.reconnect_count == 1 and n.status == nodes_pb2.NODE_STATUS_ONLINE
    assert sorted(n.capabilities) == ["canvas.present", "device.info", "system.notify"]
    # A third connection after the second drops: same registration again, epoch 3.
    await second.stop()
    await asyncio.wait_for(t2, 10)
    await eventually(lambda: "desk-1" not in h.app.registry.sessions, what="offline")

    async def offline() -> bool:
        # The offline mark is a background write: it commits just after the stream is gone.
        got = await h.nodes.GetNode(nodes_pb2.GetNodeRequest(node_id="desk-1"), metadata=h.op(), timeout=10)
        return got.node.status == nodes_pb2.NODE_STATUS_OFFLINE

    await eventually(offline, within=5, what="offline in the store")
    got = await h.nodes.GetNode(nodes_pb2.GetNodeRequest(node_id="desk-1"), metadata=h.op(), timeout=10)
    assert got.node.offline_reason == "stream_closed"
    third = CompanionNode(h.address, "desk-1", tok, "desktop")
    t3 = await started(third)
    nodes = await _list(h)
    assert len(nodes) == 1 and nodes[0].epoch == 3 and nodes[0].reconnect_count == 2
    await stop_all([(third, t3)])
    events = [e["event"] for e in read_audit(h.server.runtime.audit.path)]  # type: ignore[arg-type]
    assert events.count("nodeRegister") == 1 and events.count("nodeReconnect") == 2
    assert "nodeDisconnect" in events and "tokenIssued" in events


async def test_disabling_nodes_closes_every_stream_live(harness: NodesHarness) -> None:
    h = harness
    pairs = []
    for i in range(5):
        n = await h.node(f"n{i}", "desktop" if i % 2 else "phone")
        pairs.append((n, await started(n)))
    await h.apply(nodes_config(enabled=False))
    for n, _ in pairs:
        await eventually(lambda n=n: any(c.reason == "nodes_disabled" for c in n.stats.closes), what="close")
        assert n.stats.closes[-1].reconnect is True
    await eventually(lambda: all(n.stats.stream_errors for n, _ in pairs), what="stream errors")
    assert all(n.stats.stream_errors[0][0] == "UNAVAILABLE" for n, _ in pairs)
    assert not h.app.registry.sessions
    # New connections are refused while disabled; the nodes keep retrying with backoff...
    reg = nodes_pb2.NodeRegister(node_id="n0", token=pairs[0][0].token, role="phone", protocol_version=1)
    _, err = await _raw_connect(h, reg)
    assert err is not None and err.code() == grpc.StatusCode.UNAVAILABLE
    info = from_rpc_error(err)
    assert info is not None and info.reason == "NODES_DISABLED"
    # ...and come back by themselves when nodes are enabled again.
    await h.apply(nodes_config(enabled=True))
    for n, _ in pairs:
        await eventually(n.registered.is_set, what=f"{n.node_id} back")
    assert len(await _list(h)) == 5
    await stop_all(pairs)


async def test_role_removal_disconnects_only_that_role(harness: NodesHarness) -> None:
    h = harness
    phone = await h.node("phone-1", "phone")
    desk = await h.node("desk-1", "desktop")
    tp, td = await started(phone), await started(desk)
    await h.apply(nodes_config(roles=("desktop",)))
    assert (await asyncio.wait_for(tp, 10)).endswith("role_not_allowed")
    assert phone.stats.stream_errors[-1][0] == "PERMISSION_DENIED"
    assert desk.registered.is_set() and not desk.stats.closes
    by_id = {n.node_id: n for n in await _list(h)}
    assert by_id["phone-1"].status == nodes_pb2.NODE_STATUS_OFFLINE
    assert by_id["phone-1"].offline_reason == "role_not_allowed"
    assert by_id["desk-1"].status == nodes_pb2.NODE_STATUS_ONLINE
    await stop_all([(desk, td)])


async def test_revoked_token_closes_the_stream(harness: NodesHarness) -> None:
    h = harness
    tok = await h.issue("desk-1")
    node = CompanionNode(h.address, "desk-1", tok.token, "desktop")
    task = await started(node)
    resp = await h.nodes.RevokeNodeToken(
        nodes_pb2.RevokeNodeTokenRequest(token_id=tok.token_id, reason="lost laptop"),
        metadata=h.op(),
        timeout=10,
    )
    assert resp.closed_streams == 1 and not resp.already_revoked
    assert (await asyncio.wait_for(task, 10)) == "closed by server: token_revoked"
    assert node.stats.stream_errors[-1][0] == "UNAUTHENTICATED"
    again = await h.nodes.RevokeNodeToken(
        nodes_pb2.RevokeNodeTokenRequest(token_id=tok.token_id), metadata=h.op(), timeout=10
    )
    assert again.already_revoked
    _, err = await _raw_connect(
        h, nodes_pb2.NodeRegister(node_id="desk-1", token=tok.token, role="desktop", protocol_version=1)
    )
    assert err is not None and err.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_connect_auth_and_validation(harness: NodesHarness) -> None:
    h = harness
    tok = await h.issue("desk-1", "desktop")

    async def code(reg: nodes_pb2.NodeRegister) -> tuple[grpc.StatusCode, str]:
        _, err = await _raw_connect(h, reg)
        assert err is not None
        info = from_rpc_error(err)
        return err.code(), info.reason if info else ""

    reg = nodes_pb2.NodeRegister(node_id="ghost", token="fln_nope", role="desktop", protocol_version=1)
    assert await code(reg) == (grpc.StatusCode.UNAUTHENTICATED, "INVALID_TOKEN")
    reg = nodes_pb2.NodeRegister(node_id="desk-1", token="fln_wrong", role="desktop", protocol_version=1)
    assert await code(reg) == (grpc.StatusCode.UNAUTHENTICATED, "INVALID_TOKEN")
    reg = nodes_pb2.NodeRegister(node_id="desk-2", token=tok.token, role="desktop", protocol_version=1)
    assert await code(reg) == (grpc.StatusCode.PERMISSION_DENIED, "TOKEN_SCOPE")
    reg = nodes_pb2.NodeRegister(node_id="desk-1", token=tok.token, role="phone", protocol_version=1)
    assert await code(reg) == (grpc.StatusCode.PERMISSION_DENIED, "TOKEN_SCOPE")
    kiosk = await h.issue("kiosk-1", "kiosk")
    reg = nodes_pb2.NodeRegister(node_id="kiosk-1", token=kiosk.token, role="kiosk", protocol_version=1)
    assert await code(reg) == (grpc.StatusCode.PERMISSION_DENIED, "ROLE_NOT_ALLOWED")
    reg = nodes_pb2.NodeRegister(node_id="bad id/../x", token=tok.token, role="", protocol_version=7)
    _, err = await _raw_connect(h, reg)
    assert err is not None and err.code() == grpc.StatusCode.INVALID_ARGUMENT
    info = from_rpc_error(err)
    assert info is not None
    assert {v.field for v in info.violations} == {
        "register.node_id",
        "register.role",
        "register.protocol_version",
    }
    # First message must be a Register.
    call: Any = h.nodes.Connect()
    await call.write(nodes_pb2.ConnectRequest(heartbeat=nodes_pb2.NodeHeartbeat(epoch=1)))
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await asyncio.wait_for(call.read(), 10)
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # A second Register on the same stream is a protocol error.
    call2: Any = h.nodes.Connect()
    reg_ok = nodes_pb2.NodeRegister(node_id="desk-1", token=tok.token, role="desktop", protocol_version=1)
    await call2.write(nodes_pb2.ConnectRequest(register=reg_ok))
    assert (await asyncio.wait_for(call2.read(), 10)).WhichOneof("message") == "registered"
    await call2.write(nodes_pb2.ConnectRequest(register=reg_ok))
    last = None
    with pytest.raises(grpc.aio.AioRpcError) as ei3:
        while True:
            last = await asyncio.wait_for(call2.read(), 10)
    assert ei3.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert last is not None and last.close.reason == "protocol_error" and not last.close.reconnect
    # Operator-only RPCs still need a bearer token of the right role.
    with pytest.raises(grpc.aio.AioRpcError) as ei2:
        await h.nodes.IssueNodeToken(
            nodes_pb2.IssueNodeTokenRequest(node_id="x", role="desktop"), metadata=h.tokens.md("channel")
        )
    assert ei2.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_failed_registrations_are_rate_limited(harness: NodesHarness) -> None:
    h = harness
    reg = nodes_pb2.NodeRegister(node_id="ghost", token="fln_nope", role="desktop", protocol_version=1)
    codes = []
    for _ in range(25):
        _, err = await _raw_connect(h, reg)
        assert err is not None
        codes.append(err.code())
    assert codes[0] == grpc.StatusCode.UNAUTHENTICATED
    assert codes[-1] == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_invoke_progress_result_and_undeclared_command(harness: NodesHarness) -> None:
    h = harness
    node = await h.node("desk-1")
    task = await started(node)
    items = [
        m
        async for m in h.nodes.InvokeNode(
            nodes_pb2.InvokeNodeRequest(
                node_id="desk-1", command="canvas.present", args_json=json.dumps({"name": "a", "steps": 3})
            ),
            metadata=h.op(),
            timeout=10,
        )
    ]
    assert [m.WhichOneof("message") for m in items] == ["progress", "progress", "progress", "result"]
    assert items[-1].result.ok and json.loads(items[-1].result.result_json)["presented"] == "a"
    assert items[0].progress.fraction == pytest.approx(1 / 3)
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        async for _ in h.nodes.InvokeNode(
            nodes_pb2.InvokeNodeRequest(node_id="desk-1", command="camera.snap"), metadata=h.op(), timeout=10
        ):
            pass
    assert ei.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    info = from_rpc_error(ei.value)
    assert (
        info is not None
        and info.reason == "COMMAND_NOT_DECLARED"
        and info.metadata["command"] == "camera.snap"
    )
    assert node.stats.invokes == 1  # the undeclared command never reached the node
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        async for _ in h.nodes.InvokeNode(
            nodes_pb2.InvokeNodeRequest(node_id="desk-1", command="device.info", args_json="{oops"),
            metadata=h.op(),
            timeout=10,
        ):
            pass
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    await stop_all([(node, task)])


async def test_invoke_deadline_is_honoured_on_both_sides(harness: NodesHarness) -> None:
    h = harness
    node = await h.node("desk-1")
    task = await started(node)
    t0 = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        async for _ in h.nodes.InvokeNode(
            nodes_pb2.InvokeNodeRequest(
                node_id="desk-1", command="system.notify", args_json='{"sleep_ms": 5000}', timeout_ms=300
            ),
            metadata=h.op(),
            timeout=10,
        ):
            pass
    assert ei.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - t0 < 5  # the server enforced timeout_ms, not the node's sleep
    await eventually(lambda: len(node.stats.deadline_missed) == 1, what="node saw its deadline pass")
    # The caller's own gRPC deadline is the bound when it is shorter than timeout_ms.
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        async for _ in h.nodes.InvokeNode(
            nodes_pb2.InvokeNodeRequest(
                node_id="desk-1", command="device.info", args_json='{"sleep_ms": 5000}', timeout_ms=60000
            ),
            metadata=h.op(),
            timeout=0.4,
        ):
            pass
    assert ei.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await eventually(lambda: len(node.stats.deadline_missed) == 2, what="node saw the caller's deadline")
    # A caller that gives up cancels the work on the node (InvokeCancel), no result is awaited.
    call = h.nodes.InvokeNode(
        nodes_pb2.InvokeNodeRequest(node_id="desk-1", command="device.info", args_json='{"sleep_ms": 5000}'),
        metadata=h.op(),
        timeout=30,
    )
    pending = asyncio.ensure_future(call.read())
    await eventually(lambda: node.stats.invokes == 3, what="third invoke reached the node")
    call.cancel()
    await eventually(
        lambda: any(r == "cancelled" for _, r in node.stats.cancelled), what="node told to cancel"
    )
    pending.cancel()
    assert len(node.stats.deadline_missed) == 2
    await stop_all([(node, task)])


async def test_dropped_stream_fails_inflight_invoke_and_idempotent_retry(harness: NodesHarness) -> None:
    h = harness
    release = asyncio.Event()

    async def slow(args: dict[str, Any], ctx: InvokeContext) -> Any:
        await release.wait()
        return {"done": True}

    tok = await h.issue("desk-1")
    node = CompanionNode(
        h.address, "desk-1", tok.token, "desktop", ["system.notify"], handlers={"system.notify": slow}
    )
    task = await started(node)

    async def call() -> list[nodes_pb2.InvokeNodeResponse]:
        req = nodes_pb2.InvokeNodeRequest(
            node_id="desk-1", command="system.notify", timeout_ms=20000, idempotency_key="k1"
        )
        return [m async for m in h.nodes.InvokeNode(req, metadata=h.op(), timeout=30)]

    pending = asyncio.create_task(call())
    await eventually(lambda: node.stats.invokes == 1, what="invoke reached the node")
    await node.stop()  # the node's stream drops with the invoke in flight
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await asyncio.wait_for(pending, 5)
    assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
    await asyncio.wait_for(task, 10)
    # The node comes back; the caller retries with the same key and gets one result, then the cached one.
    release.set()
    node2 = CompanionNode(
        h.address, "desk-1", tok.token, "desktop", ["system.notify"], handlers={"system.notify": slow}
    )
    task2 = await started(node2)
    first = await call()
    second = await call()
    assert first[-1].result.ok and second[-1].result == first[-1].result
    assert node2.stats.invokes == 1
    await stop_all([(node2, task2)])


async def test_canvas_gate_pushed_and_canvas_commands_refused(harness: NodesHarness) -> None:
    h = harness
    node = await h.node("desk-1")
    task = await started(node)
    assert node.gates.canvas is True
    await h.apply(nodes_config(canvas=False))
    await eventually(lambda: node.gates.canvas is False, what="gate update")
    assert node.stats.gate_updates[-1].config_revision == h.revision
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        async for _ in h.nodes.InvokeNode(
            nodes_pb2.InvokeNodeRequest(node_id="desk-1", command="canvas.present"),
            metadata=h.op(),
            timeout=10,
        ):
            pass
    info = from_rpc_error(ei.value)
    assert (
        ei.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        and info is not None
        and info.reason == "CANVAS_DISABLED"
    )
    ok = [
        m
        async for m in h.nodes.InvokeNode(
            nodes_pb2.InvokeNodeRequest(node_id="desk-1", command="device.info"), metadata=h.op(), timeout=10
        )
    ]
    assert ok[-1].result.ok
    await h.apply(nodes_config(canvas=True))
    await eventually(lambda: node.gates.canvas is True, what="gate back on")
    assert node.registered.is_set() and node.stats.registrations == 1  # no reconnect needed
    await stop_all([(node, task)])


async def test_lease_expiry_marks_node_offline(tmp_path: Any, tokens: Any) -> None:
    from tests.support.nodes import nodes_server

    async with nodes_server(tmp_path / "data", tokens, nodes_config(heartbeat_s=0.2, lease_s=0.6)) as h:
        tok = await h.issue("mute-1")
        call: Any = h.nodes.Connect()  # registers, then never heartbeats
        await call.write(
            nodes_pb2.ConnectRequest(
                register=nodes_pb2.NodeRegister(
                    node_id="mute-1", token=tok.token, role="desktop", protocol_version=1
                )
            )
        )
        got = []
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            while True:
                got.append(await asyncio.wait_for(call.read(), 10))
        assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
        assert got[0].WhichOneof("message") == "registered" and got[0].registered.lease_ms == 600
        assert got[-1].close.reason == "lease_expired" and got[-1].close.reconnect
        node = (
            await h.nodes.GetNode(nodes_pb2.GetNodeRequest(node_id="mute-1"), metadata=h.op(), timeout=10)
        ).node
        assert node.status == nodes_pb2.NODE_STATUS_OFFLINE and node.offline_reason == "lease_expired"
        # A heartbeating node keeps its lease over the same period.
        live = await h.node("live-1")
        t = await started(live)
        await asyncio.sleep(1.5)
        assert (
            live.registered.is_set() and live.stats.registrations == 1 and live.stats.heartbeats_received >= 2
        )
        await stop_all([(live, t)])


async def test_watch_node_events_replays_then_follows(harness: NodesHarness) -> None:
    h = harness
    node = await h.node("desk-1")
    task = await started(node)
    await node.stop()
    await asyncio.wait_for(task, 10)
    await eventually(lambda: "desk-1" not in h.app.registry.sessions)
    stream = h.nodes.WatchNodeEvents(
        nodes_pb2.WatchNodeEventsRequest(after_seq=0), metadata=h.op(), timeout=30
    )
    it = stream.__aiter__()
    e1 = (await it.__anext__()).event
    e2 = (await it.__anext__()).event
    assert (e1.type, e2.type) == (nodes_pb2.NODE_EVENT_TYPE_CONNECTED, nodes_pb2.NODE_EVENT_TYPE_DISCONNECTED)
    assert e2.reason == "stream_closed" and e2.seq > e1.seq
    node2 = CompanionNode(h.address, "desk-1", node.token, "desktop")
    t2 = await started(node2)
    e3 = (await asyncio.wait_for(it.__anext__(), 10)).event
    assert e3.type == nodes_pb2.NODE_EVENT_TYPE_RECONNECTED and e3.epoch == 2
    await h.canvas.PutArtifact(
        __import__("flynn.v1.canvas_pb2", fromlist=["x"]).PutArtifactRequest(
            name="notes/a", content_type="text/plain", content=b"x"
        ),
        metadata=h.op(),
        timeout=10,
    )
    e4 = (await asyncio.wait_for(it.__anext__(), 10)).event
    assert e4.type == nodes_pb2.NODE_EVENT_TYPE_CANVAS_CHANGED and e4.artifact_name == "notes/a"
    stream.cancel()
    # Resuming from a cursor skips what was seen.
    again = h.nodes.WatchNodeEvents(
        nodes_pb2.WatchNodeEventsRequest(after_seq=e3.seq), metadata=h.op(), timeout=30
    )
    first = (await asyncio.wait_for(again.__aiter__().__anext__(), 10)).event
    assert first.seq == e4.seq
    again.cancel()
    await stop_all([(node2, t2)])
