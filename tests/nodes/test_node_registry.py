"""NodeRegistry (domain, no gRPC) on a real SQLite file."""

from __future__ import annotations

from pathlib import Path

import pytest
from flynn.v1 import nodes_pb2

from flynn_runtime.audit import AuditLog
from flynn_runtime.config_source import StaticConfig
from flynn_runtime.errors import Code, FlynnError
from nodes_svc.node_registry import NodeRegistry, SessionClose
from nodes_svc.node_store import NodeStore
from tests.support.nodes import nodes_config


def make(tmp_path: Path, **kw: object) -> tuple[NodeRegistry, StaticConfig]:
    cfg = StaticConfig(nodes_config(**kw))  # type: ignore[arg-type]
    reg = NodeRegistry(NodeStore(tmp_path / "nodes.sqlite"), cfg, AuditLog(tmp_path, "nodes"))
    reg.start()
    return reg, cfg


def register(
    reg: NodeRegistry, node_id: str, token: str, role: str = "desktop"
) -> tuple[object, nodes_pb2.NodeRegistered]:
    return reg.register(
        nodes_pb2.NodeRegister(
            node_id=node_id, token=token, role=role, capabilities=["device.info"], protocol_version=1
        ),
        "ipv4:127.0.0.1:1",
    )


async def test_epochs_replace_and_one_row(tmp_path: Path) -> None:
    reg, _ = make(tmp_path)
    tok = reg.issue_token("a", "desktop", "")
    s1, r1 = register(reg, "a", tok.token)
    s2, r2 = register(reg, "a", tok.token)
    assert (r1.epoch, r1.resumed, r2.epoch, r2.resumed) == (1, False, 2, True)
    msg = s1.outbound.get_nowait()  # type: ignore[attr-defined]
    assert isinstance(msg, SessionClose) and msg.reason == "replaced" and not msg.reconnect
    reg.end_session(s1)  # type: ignore[arg-type]
    assert reg.sessions["a"] is s2
    assert [n.node_id for n in reg.store.list_nodes("", 10, None)] == ["a"]
    reg.end_session(s2)  # type: ignore[arg-type]
    node = reg.get_node("a")
    assert (
        node.status == nodes_pb2.NODE_STATUS_OFFLINE
        and node.offline_reason == "stream_closed"
        and node.reconnect_count == 1
    )
    # The token's hash is stored, never the token.
    raw = (tmp_path / "nodes.sqlite").read_bytes() + (tmp_path / "nodes.sqlite-wal").read_bytes()
    assert tok.token.encode() not in raw


async def test_lease_and_live_config(tmp_path: Path) -> None:
    reg, cfg = make(tmp_path, heartbeat_s=0.05, lease_s=0.1)
    a = reg.issue_token("a", "desktop", "")
    b = reg.issue_token("b", "phone", "")
    sa, _ = register(reg, "a", a.token)
    sb, _ = register(reg, "b", b.token, "phone")
    sa.last_seen -= 1.0  # type: ignore[attr-defined]  # silent for 1 s > lease 0.1 s
    sb.last_seen -= 1.0  # type: ignore[attr-defined]
    reg.on_heartbeat(sb)  # type: ignore[arg-type]  # b heartbeats: lease renewed
    reg.tick()
    assert sa.closed and sa.close_reason == "lease_expired"  # type: ignore[attr-defined]
    assert not sb.closed  # type: ignore[attr-defined]
    await cfg.apply(nodes_config(roles=("desktop",)), 2)
    reg.apply_config()
    assert sb.closed and sb.close_reason == "role_not_allowed"  # type: ignore[attr-defined]
    await cfg.apply(nodes_config(enabled=False), 3)
    reg.apply_config()
    with pytest.raises(FlynnError) as ei:
        register(reg, "a", a.token)
    assert ei.value.code == Code.UNAVAILABLE and ei.value.reason == "NODES_DISABLED"
