"""Shared fixtures. Per-area fixtures live in each tests/<area>/conftest.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.mesh import Tokens, make_tokens


@pytest.fixture
def tokens(tmp_path: Path) -> Tokens:
    return make_tokens(tmp_path)
