"""The committed generated code (gen/) is exactly what scripts/gen_protos.py produces now."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.contracts.conftest import ROOT


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in (root / "flynn").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "scripts/gen_protos.py", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        # protoc finds its mypy plugins (protoc-gen-mypy, protoc-gen-mypy_grpc) next to this interpreter.
        env=dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"),
    )
    assert out.returncode == 0, out.stderr
    fresh, committed = _files(tmp_path), _files(ROOT / "gen")
    assert sorted(fresh) == sorted(committed), "gen/ has missing or extra files: run scripts/gen_protos.py"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"stale generated files {stale}: run scripts/gen_protos.py and commit gen/"


def test_every_proto_has_generated_modules() -> None:
    for proto in (ROOT / "protos" / "flynn" / "v1").glob("*.proto"):
        for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi"):
            assert (ROOT / "gen" / "flynn" / "v1" / f"{proto.stem}{suffix}").exists()
