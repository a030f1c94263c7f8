"""Fixtures of the nodes/canvas tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.support.mesh import Tokens
from tests.support.nodes import NodesHarness, nodes_server


@pytest.fixture
async def harness(tmp_path: Path, tokens: Tokens) -> AsyncIterator[NodesHarness]:
    async with nodes_server(tmp_path / "data", tokens) as h:
        yield h
