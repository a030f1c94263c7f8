#!/usr/bin/env python3
"""Regenerate the Python code for protos/ into gen/ (one command, deterministic).

Usage: python scripts/gen_protos.py [--out DIR]

The generated tree (gen/flynn/v1/*_pb2.py, *_pb2.pyi, *_pb2_grpc.py, *_pb2_grpc.pyi) is
committed; tests/contract/test_generated_code.py regenerates into a temporary folder and
fails when the committed copy differs.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import grpc_tools
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"


def generate(out: Path) -> None:
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    if out.exists():
        shutil.rmtree(out / "flynn", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
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
