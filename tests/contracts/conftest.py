from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BASELINE = ROOT / "protos" / "baseline" / "flynn-v1.binpb"


@pytest.fixture(scope="session")
def buf() -> str:
    path = shutil.which("buf", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if path is None:
        pytest.fail("buf not installed (requirements.lock pins buf-bin; scripts/bootstrap.sh installs it)")
    return path
