"""Fixtures of the config tests: an in-process config service with fast bookmarks, and stubs."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from flynn.v1 import config_pb2_grpc

from flynn_runtime.channels import client_channel
from flynn_runtime.server import RunningServer
from tests.support.config import config_server
from tests.support.mesh import Tokens


@pytest.fixture
async def server(tmp_path: Path, tokens: Tokens, database_url: str) -> AsyncIterator[RunningServer]:
    """The config service on each backend: SQLite files, then a real PostgreSQL."""
    async with config_server(
        tmp_path / "config-svc", tokens, bookmark_seconds=0.5, database_url=database_url
    ) as srv:
        yield srv


@pytest.fixture
async def op(server: RunningServer, tokens: Tokens) -> AsyncIterator[config_pb2_grpc.ConfigServiceStub]:
    ch = client_channel(server.address, tokens.operator)
    yield config_pb2_grpc.ConfigServiceStub(ch)
    await ch.close()
