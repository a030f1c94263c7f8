"""Fixtures of the replica tests: run-control replicas on the test's real PostgreSQL."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.mesh import Tokens
from tests.support.replica_mesh import ReplicaMesh
from tests.support.replicas import QueueReplicas

StartReplicas = Callable[..., QueueReplicas]


@pytest.fixture
def start_replicas(tmp_path: Path, tokens: Tokens, postgres_url: str) -> Iterator[StartReplicas]:
    """`start_replicas(replicas=3, config_yaml=..., lease_seconds=...)`: replica processes and a gateway
    in front of them, started now and stopped when the test ends (passed or failed)."""
    started: list[QueueReplicas] = []

    def start(*, replicas: int = 3, config_yaml: str = "", lease_seconds: float = 5.0) -> QueueReplicas:
        mesh = QueueReplicas(
            tmp_path,
            tokens,
            postgres_url,
            replicas=replicas,
            config_yaml=config_yaml,
            lease_seconds=lease_seconds,
        )
        started.append(mesh)
        return mesh.start()

    yield start
    for mesh in started:
        mesh.stop()


@pytest.fixture
def mesh(tmp_path: Path, tokens: Tokens, postgres_url: str) -> Iterator[ReplicaMesh]:
    """Two processes of each stateful service behind a gateway (tests/support/replica_mesh.py)."""
    m = ReplicaMesh(tmp_path / "mesh", tokens)
    m.database_url = postgres_url
    try:
        m.start()
        yield m
    finally:
        m.stop()
