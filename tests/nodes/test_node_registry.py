"""NodeRegistry (domain, no gRPC) on each real backend: a SQLite file, then PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from flynn.v1 import nodes_pb2

from flynn_runtime.audit import AuditLog
from flynn_runtime.config_source import StaticConfig
from flynn_runtime.errors import Code, FlynnError
from nodes_svc.node_registry import NodeRegistry, NodeSession, SessionClose
from nodes_svc.node_store import SCHEMA, NodeStore
from nodes_svc.node_store_pg import MIGRATIONS, PgNodeStore
from nodes_svc.node_store_sqlite import SqliteNodeStore
from tests.support.nodes import nodes_config
from tests.support.postgres import Databases


@pytest.fixture
async def store(tmp_path: Path, database_url: str, databases: Databases) -> AsyncIterator[NodeStore]:
    if not database_url:
        yield SqliteNodeStore(tmp_path / "nodes.sqlite")
        return
    yield PgNodeStore(
        await databases.open(database_url, service="nodes", schema=SCHEMA, migrations=MIGRATIONS)
    )


async def make(
    store: NodeStore, tmp_path: Path, *, heartbeat_s: float = 1.0, lease_s: float = 5.0
) -> tuple[NodeRegistry, StaticConfig]:
    cfg = StaticConfig(nodes_config(heartbeat_s=heartbeat_s, lease_s=lease_s))
    reg = NodeRegistry(store, cfg, AuditLog(tmp_path, "nodes"))
    await reg.start()
    return reg, cfg


async def register(
    reg: NodeRegistry, node_id: str, token: str, role: str = "desktop"
) -> tuple[NodeSession, nodes_pb2.NodeRegistered]:
    return await reg.register(
        nodes_pb2.NodeRegister(
            node_id=node_id, token=token, role=role, capabilities=["device.info"], protocol_version=1
        ),
        "ipv4:127.0.0.1:1",
    )


async def test_epochs_replace_and_one_row(store: NodeStore, tmp_path: Path) -> None:
    reg, _ = await make(store, tmp_path)
    tok = await reg.issue_token("a", "desktop", "")
    s1, r1 = await register(reg, "a", tok.token)
    s2, r2 = await register(reg, "a", tok.token)
    assert (r1.epoch, r1.resumed, r2.epoch, r2.resumed) == (1, False, 2, True)
    msg = s1.outbound.get_nowait()
    assert isinstance(msg, SessionClose) and msg.reason == "replaced" and not msg.reconnect
    reg.end_session(s1)
    assert reg.sessions["a"] is s2
    assert [n.node_id for n in await reg.store.list_nodes("", 10, None)] == ["a"]
    reg.end_session(s2)
    await reg.writes.drain()
    node = await reg.get_node("a")
    assert (
        node.status == nodes_pb2.NODE_STATUS_OFFLINE
        and node.offline_reason == "stream_closed"
        and node.reconnect_count == 1
    )
    # The token's hash is stored, never the token.
    assert all(t.sha256 != tok.token and tok.token not in t.sha256 for t in await reg.store.all_tokens())
    if isinstance(store, SqliteNodeStore):
        raw = (tmp_path / "nodes.sqlite").read_bytes() + (tmp_path / "nodes.sqlite-wal").read_bytes()
        assert tok.token.encode() not in raw


async def test_two_registrations_of_one_node_at_once_get_distinct_epochs(
    store: NodeStore, tmp_path: Path
) -> None:
    reg, _ = await make(store, tmp_path)
    tok = await reg.issue_token("a", "desktop", "")
    results = await asyncio.gather(*(register(reg, "a", tok.token) for _ in range(5)))
    assert sorted(r.epoch for _, r in results) == [1, 2, 3, 4, 5]
    node = await store.get_node("a")
    assert node is not None and node.epoch == 5 and node.reconnect_count == 4


async def test_lease_and_live_config(store: NodeStore, tmp_path: Path) -> None:
    reg, cfg = await make(store, tmp_path, heartbeat_s=0.05, lease_s=0.1)
    a = await reg.issue_token("a", "desktop", "")
    b = await reg.issue_token("b", "phone", "")
    sa, _ = await register(reg, "a", a.token)
    sb, _ = await register(reg, "b", b.token, "phone")
    sa.last_seen -= 1.0  # silent for 1 s > lease 0.1 s
    sb.last_seen -= 1.0
    reg.on_heartbeat(sb)  # b heartbeats: lease renewed
    reg.tick()
    assert sa.closed and sa.close_reason == "lease_expired"
    assert not sb.closed
    await cfg.apply(nodes_config(roles=("desktop",)), 2)
    reg.apply_config()
    assert sb.closed and sb.close_reason == "role_not_allowed"
    await cfg.apply(nodes_config(enabled=False), 3)
    reg.apply_config()
    with pytest.raises(FlynnError) as ei:
        await register(reg, "a", a.token)
    assert ei.value.code == Code.UNAVAILABLE and ei.value.reason == "NODES_DISABLED"
