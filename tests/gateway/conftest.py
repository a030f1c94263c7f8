from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.gateway import GatewayMesh
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
