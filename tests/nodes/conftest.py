"""Fixtures of the nodes/canvas tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.support.mesh import Tokens
from tests.support.nodes import NodesHarness, nodes_server


@pytest.fixture
async def harness(tmp_path: Path, tokens: Tokens, database_url: str) -> AsyncIterator[NodesHarness]:
    """The nodes service on each backend: SQLite files, then a real PostgreSQL."""
    async with nodes_server(tmp_path / "data", tokens, database_url=database_url) as h:
        yield h
