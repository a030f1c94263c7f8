from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.gateway import GatewayMesh, RealMesh
from tests.support.mesh import make_tokens


@pytest.fixture(scope="package")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayMesh]:
    root = tmp_path_factory.mktemp("gwmesh")
    m = GatewayMesh(root, make_tokens(root))
    try:
        m.start()
        yield m
    finally:
        m.stop()


@pytest.fixture(scope="package")
def real_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealMesh]:
    """The real services that exist, behind a real gateway (for the grpcurl end-to-end tests)."""
    root = tmp_path_factory.mktemp("realmesh")
    m = RealMesh(root, make_tokens(root))
    try:
        m.start()
        yield m
    finally:
        m.stop()
