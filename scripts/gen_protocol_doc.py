#!/usr/bin/env python3
"""Regenerate the method tables of docs/api/PROTOCOL.md from the protos (descriptors with comments).

Usage: python scripts/gen_protocol_doc.py [--check]

Only the text between the GENERATED markers is rewritten; the prose around it is hand-written.
--check exits 1 (and prints a diff) when the committed document is stale; tests/contracts runs it.
"""

from __future__ import annotations

import argparse
import difflib
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "gen")]

import grpc_tools  # noqa: E402
from google.protobuf import descriptor_pb2  # noqa: E402

from flynn_runtime import topology  # noqa: E402
from flynn_runtime.auth import PUBLIC, required_roles  # noqa: E402

DOC = ROOT / "docs" / "api" / "PROTOCOL.md"
PROTO_ROOT = ROOT / "protos"
BEGIN = "<!-- BEGIN GENERATED: scripts/gen_protocol_doc.py (do not edit by hand) -->"
END = "<!-- END GENERATED -->"
_SERVICE, _METHOD = 6, 2  # FileDescriptorProto.service, ServiceDescriptorProto.method field numbers


def descriptor_set() -> descriptor_pb2.FileDescriptorSet:
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "set.binpb"
        subprocess.run(
            [
                sys.executable, "-m", "grpc_tools.protoc",
                f"-I{PROTO_ROOT}", f"-I{well_known}",
                "--include_source_info", f"--descriptor_set_out={out}",
                *protos,
            ],
            check=True,
        )  # fmt: skip
        return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


def _comment(text: str) -> str:
    return " ".join(line.strip() for line in text.strip().splitlines()).replace("|", "\\|")


def _kind(m: descriptor_pb2.MethodDescriptorProto) -> str:
    if m.client_streaming and m.server_streaming:
        return "bidi stream"
    if m.client_streaming:
        return "client stream"
    if m.server_streaming:
        return "server stream"
    return "unary"


def _type(name: str) -> str:
    return name.removeprefix(".flynn.v1.")


def _roles(path: str) -> str:
    roles = required_roles(path)
    if roles is None:
        return "(not exposed)"
    if roles is PUBLIC:
        return "public"
    return ", ".join(sorted(r.value for r in roles))


def render(fds: descriptor_pb2.FileDescriptorSet) -> str:
    lines: list[str] = []
    services = []
    for f in fds.file:
        if f.package != "flynn.v1":
            continue
        comments = {tuple(loc.path): loc.leading_comments for loc in f.source_code_info.location}
        for i, svc in enumerate(f.service):
            services.append((f.name, i, svc, comments))
    services.sort(key=lambda s: s[0])
    lines.append("| Service | Served by | Proto file | Methods |")
    lines.append("|---|---|---|---|")
    for fname, _i, svc, _c in services:
        full = f"flynn.v1.{svc.name}"
        owner = topology.owner_of(full) or (
            "each stateful service, about its own replicas (not routed by the gateway)"
            if full in topology.REPLICA_SERVICES
            else "external agents (not routed by the gateway)"
        )
        lines.append(
            f"| [`{full}`](#{full.replace('.', '').lower()}) | {owner} | `protos/{fname}` | {len(svc.method)} |"
        )
    for _fname, i, svc, comments in services:
        full = f"flynn.v1.{svc.name}"
        lines += ["", f"### {full}", "", _comment(comments.get((_SERVICE, i), "")), ""]
        lines.append("| Method | Kind | Request → Response | Roles | What it does |")
        lines.append("|---|---|---|---|---|")
        for j, m in enumerate(svc.method):
            path = f"/{full}/{m.name}"
            desc = _comment(comments.get((_SERVICE, i, _METHOD, j), ""))
            lines.append(
                f"| `{m.name}` | {_kind(m)} | `{_type(m.input_type)}` → `{_type(m.output_type)}` "
                f"| {_roles(path)} | {desc} |"
            )
    return "\n".join(lines) + "\n"


def rewrite(doc: str, generated: str) -> str:
    head, sep, rest = doc.partition(BEGIN)
    if not sep:
        raise SystemExit(f"{DOC} lacks the marker {BEGIN!r}")
    _old, sep2, tail = rest.partition(END)
    if not sep2:
        raise SystemExit(f"{DOC} lacks the marker {END!r}")
    return f"{head}{BEGIN}\n{generated}{END}{tail}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail when PROTOCOL.md is stale")
    ns = parser.parse_args()
    current = DOC.read_text()
    wanted = rewrite(current, render(descriptor_set()))
    if ns.check:
        if wanted != current:
            sys.stdout.writelines(
                difflib.unified_diff(
                    current.splitlines(True), wanted.splitlines(True), str(DOC), "regenerated"
                )
            )
            print("\nPROTOCOL.md is stale: run python scripts/gen_protocol_doc.py", file=sys.stderr)
            raise SystemExit(1)
        return
    if wanted != current:
        DOC.write_text(wanted)
        print(f"updated {DOC}")


if __name__ == "__main__":
    main()
