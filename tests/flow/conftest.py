"""Fixtures of the integrated-flow tests: one real mesh per test module (tests/support/flow.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.flow import FlowMesh, flow_mesh
from tests.support.mesh import make_tokens


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FlowMesh]:
    root = tmp_path_factory.mktemp("flow")
    yield from flow_mesh(root, make_tokens(root))
