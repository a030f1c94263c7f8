# mypy: disable-error-code="misc"
"""Reactions on node events from the real nodes service: a companion node connects, the reactions
service (consuming Nodes.WatchNodeEvents) puts a canvas artifact and invokes a command on the node;
the node disconnects and a rule that wants another disconnect reason says why it did not fire."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from flynn.v1 import canvas_pb2, reactions_pb2, reactions_pb2_grpc

from flynn_runtime.server import running
from reactions_svc.app import ReactionsApp
from tests.support.mesh import Tokens, make_settings
from tests.support.nodes import eventually, nodes_server, started

RULES = """
automation:
  reactions:
    - id: desktop-welcome
      enabled: true
      trigger: {event: node_connected}
      conditions:
        - {field: node_role, operator: equals, value: desktop}
      actions:
        - put_canvas: {name: "welcome/{node_id}", content_type: text/markdown, content: "# Hello {node_id}"}
        - invoke_node: {command: system.notify, args_json: '{"title": "hi", "body": "{node_id} is in"}'}
    - id: lease-lost
      enabled: true
      trigger: {event: node_disconnected}
      conditions:
        - {field: attributes.reason, operator: equals, value: lease_expired}
      actions:
        - put_canvas: {name: "lost/{node_id}", content_type: text/plain, content: "lost"}
"""


@contextlib.asynccontextmanager
async def reactions_server(tmp_path: Path, tokens: Tokens, nodes_addr: str) -> AsyncIterator[ReactionsApp]:
    settings = make_settings(
        "reactions",
        tmp_path / "reactions",
        tokens,
        addresses={"nodes": nodes_addr, "queue": "127.0.0.1:1", "config": "127.0.0.1:1"},
    )
    async with running(settings, ReactionsApp) as rx:
        assert isinstance(rx.app, ReactionsApp)
        rx.app.address = rx.address  # type: ignore[attr-defined]
        yield rx.app


async def test_node_events_drive_canvas_and_invoke(
    tmp_path: Path, tokens: Tokens, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "rules.yaml").write_text(RULES)
    monkeypatch.setenv("FLYNN_REACTIONS_RULES_FILE", str(tmp_path / "rules.yaml"))
    monkeypatch.setenv("FLYNN_REACTIONS_CONSUME", "node")
    async with (
        nodes_server(tmp_path / "nodes", tokens) as nodes,
        reactions_server(tmp_path, tokens, nodes.address) as app,
    ):
        node = await nodes.node("desk-1", "desktop")
        task = await started(node)

        async def welcomed() -> bool:
            try:
                got = await nodes.canvas.GetArtifact(
                    canvas_pb2.GetArtifactRequest(name="welcome/desk-1"), metadata=nodes.op(), timeout=5
                )
            except grpc.aio.AioRpcError:
                return False
            return bool(got.artifact.content == b"# Hello desk-1")

        await eventually(welcomed, 20, "welcome artifact")
        await eventually(lambda: node.stats.invokes >= 1, 20, "system.notify invoked on the node")
        await node.stop()
        with contextlib.suppress(Exception):
            await task
        await eventually(lambda: cursor_at_least(app, "node_events", 3), 20, "disconnect consumed")

        async with grpc.aio.insecure_channel(app.address) as ch:  # type: ignore[attr-defined]
            rx = reactions_pb2_grpc.ReactionsStub(ch)
            md = tokens.md("operator")
            ok = await rx.ListTraces(reactions_pb2.ListTracesRequest(rule_id="desktop-welcome"), metadata=md)
            t = ok.traces[0]
            assert t.matched and [a.kind for a in t.actions] == ["put_canvas", "invoke_node"]
            assert all(a.ok for a in t.actions) and t.actions[0].result_id == "welcome/desk-1@1"
            why_not = await rx.ListTraces(reactions_pb2.ListTracesRequest(rule_id="lease-lost"), metadata=md)
            skip = why_not.traces[0]
            assert skip.skip_reason == reactions_pb2.SKIP_REASON_CONDITION
            assert "attributes.reason equals 'lease_expired' failed" in skip.detail
        assert node.stats.invokes == 1


async def cursor_at_least(app: ReactionsApp, name: str, value: int) -> bool:
    assert app.store is not None
    return await app.consumed_upto(name) >= value
