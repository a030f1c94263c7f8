#!/usr/bin/env python3
"""Regenerate the Python code for protos/ into gen/ (one command, deterministic).

Usage: python scripts/gen_protos.py [--out DIR]

The generated tree (gen/flynn/v1/*_pb2.py, *_pb2.pyi, *_pb2_grpc.py, *_pb2_grpc.pyi) is
committed; tests/contracts/ regenerates into a temporary folder and
fails when the committed copy differs.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import grpc_tools
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"


def generate(out: Path) -> None:
    """Generate into a scratch folder, then move changed files into `out` one by one (atomic renames),
    so code importing gen/ while it regenerates never sees a missing module."""
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out) as scratch:
        _generate_into(Path(scratch))
        fresh = {p.relative_to(scratch) for p in Path(scratch).rglob("*") if p.is_file()}
        for rel in sorted(fresh):
            dest = out / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            src = Path(scratch) / rel
            if not dest.exists() or dest.read_bytes() != src.read_bytes():
                os.replace(src, dest)
        for stale in (out / "flynn").rglob("*"):
            if stale.is_file() and stale.relative_to(out) not in fresh and "__pycache__" not in stale.parts:
                stale.unlink()


def _generate_into(out: Path) -> None:
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out}",
        f"--mypy_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_grpc_out={out}",
        *protos,
    ]
    code = protoc.main(args)
    if code != 0:
        raise SystemExit(f"protoc failed with exit code {code}")
    for pkg in {out / "flynn", *(out / Path(p).parent for p in protos)}:
        (pkg / "__init__.py").touch()
    (out / "flynn" / "py.typed").touch()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "gen")
    ns = parser.parse_args()
    generate(ns.out)
    print(f"generated {sys.argv[0]} -> {ns.out}")


if __name__ == "__main__":
    main()
