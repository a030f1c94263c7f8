"""Nodes gates applied live from a real ConfigService through the real ConfigWatcher (no restart)."""

from __future__ import annotations

from pathlib import Path

import grpc
from flynn.v1 import config_pb2, nodes_pb2, nodes_pb2_grpc
from google.protobuf import field_mask_pb2

from examples.companion_node import CompanionNode
from flynn_runtime.config_source import ConfigSource
from flynn_runtime.server import running
from nodes_svc.app import NodesApp
from tests.support.config import client_settings, config_server, stub, write_seed
from tests.support.mesh import Tokens
from tests.support.nodes import eventually, started, stop_all

SEED = {
    "server": {
        "nodes": {
            "enabled": True,
            "allowed_roles": ["desktop", "phone"],
            "heartbeat_interval": "1s",
            "lease": "5s",
            "feature_gates.ui.canvas": True,
        }
    }
}


async def _update(cfg_stub: object, path: str, value: config_pb2.FlynnConfig) -> int:
    head = await cfg_stub.GetConfig(config_pb2.GetConfigRequest(), timeout=10)  # type: ignore[attr-defined]
    resp = await cfg_stub.UpdateConfig(  # type: ignore[attr-defined]
        config_pb2.UpdateConfigRequest(
            config=value,
            update_mask=field_mask_pb2.FieldMask(paths=[path]),
            expected_revision=head.revision,
            reason="test",
        ),
        timeout=10,
    )
    assert not resp.unchanged and resp.revision > head.revision
    return int(resp.revision)


async def test_disable_and_role_removal_through_config_service(tmp_path: Path, tokens: Tokens) -> None:
    seed = write_seed(tmp_path / "seed.yaml", SEED)
    async with config_server(tmp_path / "config", tokens, seed_file=seed) as cfg_srv:
        settings = client_settings("nodes", tmp_path / "nodes", tokens, cfg_srv.address)
        async with running(settings, NodesApp) as srv:
            app = srv.app
            assert isinstance(app, NodesApp) and type(app.config).__name__ == "ConfigWatcher"
            source: ConfigSource = app.config
            await eventually(lambda: source.config.server.nodes.enabled, what="seed applied")
            cfg_stub = stub(cfg_srv.address, tokens.operator)
            ch = grpc.aio.insecure_channel(srv.address)
            nodes = nodes_pb2_grpc.NodesStub(ch)
            md = tokens.md("operator")
            pairs = []
            for i, role in enumerate(["desktop", "desktop", "phone", "phone"]):
                tok = await nodes.IssueNodeToken(
                    nodes_pb2.IssueNodeTokenRequest(node_id=f"n{i}", role=role), metadata=md, timeout=10
                )
                n = CompanionNode(
                    srv.address, f"n{i}", tok.token, role, backoff_initial=0.05, backoff_max=0.3
                )
                pairs.append((n, await started(n)))
            # Remove "phone": only the phones are disconnected.
            rev = await _update(
                cfg_stub,
                "server.nodes.allowed_roles",
                config_pb2.FlynnConfig(
                    server=config_pb2.ServerConfig(nodes=config_pb2.NodesConfig(allowed_roles=["desktop"]))
                ),
            )
            assert await source.wait_for_revision(rev, 10)
            for _n, t in pairs[2:]:
                await eventually(lambda t=t: t.done(), what="phone stopped")
                assert t.result() == "closed by server: role_not_allowed"
            assert all(n.registered.is_set() for n, _ in pairs[:2])
            # Canvas gate off: pushed to the connected desktops.
            off = config_pb2.FlynnConfig()
            off.server.nodes.feature_gates.ui.SetInParent()  # the mask merge skips unset parent messages
            rev = await _update(cfg_stub, "server.nodes.feature_gates.ui.canvas", off)
            assert await source.wait_for_revision(rev, 10)
            for n, _ in pairs[:2]:
                await eventually(lambda n=n: n.gates.canvas is False, what="gate pushed")
                assert n.gates.config_revision == rev
            # Disable nodes: every stream closes live with nodes_disabled.
            disabled = config_pb2.FlynnConfig()
            disabled.server.nodes.SetInParent()
            rev = await _update(cfg_stub, "server.nodes.enabled", disabled)
            assert await source.wait_for_revision(rev, 10)
            for n, _ in pairs[:2]:
                await eventually(
                    lambda n=n: any(c.reason == "nodes_disabled" for c in n.stats.closes), what="disabled"
                )
            await eventually(lambda: not app.registry.sessions, what="no streams left")
            listed = await nodes.ListNodes(
                nodes_pb2.ListNodesRequest(status=nodes_pb2.NODE_STATUS_ONLINE), metadata=md, timeout=10
            )
            assert list(listed.nodes) == []
            await stop_all(pairs)
            await ch.close()
