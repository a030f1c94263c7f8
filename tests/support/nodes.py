"""Test support for the nodes service: configs, in-process servers, companion nodes, polling."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from flynn.v1 import canvas_pb2_grpc, config_pb2, nodes_pb2, nodes_pb2_grpc
from google.protobuf import duration_pb2

from examples.companion_node import CompanionNode
from flynn_runtime.config_source import StaticConfig
from flynn_runtime.server import RunningServer, running
from nodes_svc.app import NodesApp, add_args
from tests.support.mesh import Tokens, make_settings


def nodes_config(
    enabled: bool = True,
    roles: Sequence[str] = ("desktop", "phone"),
    canvas: bool = True,
    heartbeat_s: float = 1.0,
    lease_s: float = 5.0,
) -> config_pb2.FlynnConfig:
    cfg = config_pb2.FlynnConfig()
    n = cfg.server.nodes
    n.enabled = enabled
    n.allowed_roles.extend(roles)
    n.feature_gates.ui.canvas = canvas
    n.heartbeat_interval.CopyFrom(
        duration_pb2.Duration(nanos=int(heartbeat_s * 1e9) % 10**9, seconds=int(heartbeat_s))
    )
    n.lease.CopyFrom(duration_pb2.Duration(nanos=int(lease_s * 1e9) % 10**9, seconds=int(lease_s)))
    return cfg


def config_yaml(cfg: config_pb2.FlynnConfig) -> str:
    """The --nodes-config file form of `cfg` (the config service's YAML)."""
    from flynn_runtime.config_yaml import config_to_yaml

    return config_to_yaml(cfg)


@dataclass
class NodesHarness:
    server: RunningServer
    config: StaticConfig
    tokens: Tokens
    channel: grpc.aio.Channel
    revision: int = 1

    @property
    def address(self) -> str:
        return self.server.address

    @property
    def app(self) -> NodesApp:
        assert isinstance(self.server.app, NodesApp)
        return self.server.app

    @property
    def nodes(self) -> nodes_pb2_grpc.NodesAsyncStub:
        return nodes_pb2_grpc.NodesStub(self.channel)

    @property
    def canvas(self) -> canvas_pb2_grpc.CanvasStub:
        return canvas_pb2_grpc.CanvasStub(self.channel)

    def op(self) -> tuple[tuple[str, str], ...]:
        return self.tokens.md("operator")

    async def apply(self, cfg: config_pb2.FlynnConfig) -> None:
        self.revision += 1
        await self.config.apply(cfg, self.revision)

    async def issue(self, node_id: str, role: str = "desktop") -> nodes_pb2.IssueNodeTokenResponse:
        resp: nodes_pb2.IssueNodeTokenResponse = await self.nodes.IssueNodeToken(
            nodes_pb2.IssueNodeTokenRequest(node_id=node_id, role=role), metadata=self.op(), timeout=10
        )
        return resp

    async def node(self, node_id: str, role: str = "desktop", **kw: object) -> CompanionNode:
        tok = await self.issue(node_id, role)
        n = CompanionNode(self.address, node_id, tok.token, role, backoff_initial=0.05, backoff_max=0.5, **kw)  # type: ignore[arg-type]
        return n


@contextlib.asynccontextmanager
async def nodes_server(
    data_dir: Path,
    tokens: Tokens,
    cfg: config_pb2.FlynnConfig | None = None,
    extra: list[str] | None = None,
    database_url: str = "",
) -> AsyncIterator[NodesHarness]:
    static = StaticConfig(cfg if cfg is not None else nodes_config())
    parser = argparse.ArgumentParser()
    add_args(parser)
    settings = dataclasses.replace(
        make_settings("nodes", data_dir, tokens),
        extra=vars(parser.parse_args(extra or [])),
        database_url=database_url,
    )
    async with running(settings, lambda rt: NodesApp(rt, config=static)) as srv:
        ch = grpc.aio.insecure_channel(srv.address)
        try:
            yield NodesHarness(srv, static, tokens, ch)
        finally:
            await ch.close(None)


async def eventually(
    check: Callable[[], bool | Awaitable[bool]], within: float = 15.0, what: str = ""
) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        r = check()
        if not isinstance(r, bool):
            r = await r
        if r:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what or check}")


async def started(node: CompanionNode, within: float = 15.0) -> asyncio.Task[str]:
    task = node.start()
    await eventually(node.registered.is_set, within, f"{node.node_id} registered")
    return task


async def stop_all(pairs: Sequence[tuple[CompanionNode, asyncio.Task[str]]]) -> None:
    for n, _ in pairs:
        await n.stop()
    for _, t in pairs:
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await asyncio.wait_for(t, 10)
