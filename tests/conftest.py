"""Shared fixtures. Per-area fixtures live in each tests/<area>/conftest.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.mesh import Tokens, make_tokens

# A real PostgreSQL server for the database backend's tests (postgres_server, postgres, postgres_url).
pytest_plugins = ["tests.support.postgres"]


@pytest.fixture
def tokens(tmp_path: Path) -> Tokens:
    return make_tokens(tmp_path)
