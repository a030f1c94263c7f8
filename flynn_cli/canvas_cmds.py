"""`flynn canvas archive|restore|verify`: capture every canvas artifact (all kept versions, metadata)
into one verified archive, optionally remove them (audited), and bring them back with the same names,
versions and hashes. The rollback playbook's canvas step (docs/operations/ROLLOUT.md).

    flynn canvas archive FILE [--prefix P] [--purge --reason "…"]
    flynn canvas verify FILE
    flynn canvas restore FILE [--dry-run]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
from flynn.v1 import canvas_pb2, canvas_pb2_grpc

from flynn_cli import canvas_archive, rpc
from flynn_cli.canvas_archive import ArchiveError, Version

# Versions of one artifact are kept as a contiguous range ending at the latest: probing stops at the
# first missing one, and never goes further back than this.
MAX_VERSIONS_PROBED = 10_000
PAGE = 500


def register(sub: Any) -> None:
    p = sub.add_parser("canvas", help="canvas artifacts: archive (and purge), verify, restore")
    cmds = p.add_subparsers(dest="canvas_cmd", metavar="<command>")
    cmds.required = True

    c = cmds.add_parser("archive", help="write every artifact, all kept versions, into one verified archive")
    c.add_argument("file", type=Path, help="archive to write (tar; gzip when it ends in .gz or .tgz)")
    c.add_argument("--prefix", default="", help="only artifacts whose name starts with this")
    c.add_argument(
        "--purge",
        action="store_true",
        help="after the archive is written and verified, delete the archived artifacts (audited; an "
        "artifact changed since it was read is kept and reported)",
    )
    c.add_argument("--reason", default="", help="why (required with --purge; kept in the audit log)")
    c.set_defaults(func=cmd_archive)

    c = cmds.add_parser("verify", help="check an archive: every version present with its sha256")
    c.add_argument("file", type=Path)
    c.set_defaults(func=cmd_verify)

    c = cmds.add_parser("restore", help="bring archived artifacts back with the same names, versions, hashes")
    c.add_argument("file", type=Path)
    c.add_argument("--dry-run", action="store_true", help="say what would be restored, change nothing")
    c.set_defaults(func=cmd_restore)


def _stub(args: argparse.Namespace) -> canvas_pb2_grpc.CanvasStub:
    return canvas_pb2_grpc.CanvasStub(rpc.channel(args))


def _kw(args: argparse.Namespace) -> dict[str, Any]:
    return {"metadata": rpc.metadata(args), "timeout": args.timeout}


class _Failed(Exception):
    """An RPC failed; it was printed."""


def _call(fn: Any) -> Any:
    try:
        return fn()
    except grpc.RpcError as e:
        rpc.print_error(e)
        raise _Failed from None


def _list(stub: canvas_pb2_grpc.CanvasStub, args: argparse.Namespace) -> list[canvas_pb2.Artifact]:
    out: list[canvas_pb2.Artifact] = []
    token = ""
    while True:
        req = canvas_pb2.ListArtifactsRequest(prefix=args.prefix, page_size=PAGE, page_token=token)
        resp = _call(lambda req=req: stub.ListArtifacts(req, **_kw(args)))
        out.extend(resp.artifacts)
        token = resp.next_page_token
        if not token:
            return out


def _get(
    stub: canvas_pb2_grpc.CanvasStub, args: argparse.Namespace, name: str, version: int
) -> canvas_pb2.Artifact | None:
    try:
        resp = stub.GetArtifact(canvas_pb2.GetArtifactRequest(name=name, version=version), **_kw(args))
    except grpc.RpcError as e:
        if isinstance(e, grpc.Call) and e.code() == grpc.StatusCode.NOT_FOUND:
            return None
        rpc.print_error(e)
        raise _Failed from None
    artifact: canvas_pb2.Artifact = resp.artifact
    return artifact


def _versions(
    stub: canvas_pb2_grpc.CanvasStub, args: argparse.Namespace, latest: canvas_pb2.Artifact
) -> Iterator[Version]:
    """The kept versions of one artifact, newest first (read one at a time: the content is bounded)."""
    for n in range(latest.version, max(latest.version - MAX_VERSIONS_PROBED, 0), -1):
        a = _get(stub, args, latest.name, n)
        if a is None:
            return
        yield Version(
            a.name,
            a.version,
            a.etag,
            a.content_type,
            a.sha256,
            a.update_time.ToJsonString(),
            a.actor,
            a.content,
        )


def cmd_archive(args: argparse.Namespace) -> int:
    if args.purge and not args.reason.strip():
        print("error: --reason is required with --purge (it is kept in the audit log)", file=sys.stderr)
        return 2
    stub = _stub(args)
    try:
        listed = _list(stub, args)
        manifest = canvas_archive.write(
            args.file, args.addr, ((a.name, _versions(stub, args, a)) for a in listed)
        )
    except _Failed:
        return 1
    except ArchiveError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(
        f"archived {len(manifest.artifacts)} artifact(s), {manifest.version_count} version(s) to "
        f"{args.file} (verified: every version's sha256 matches the manifest)"
    )
    if not args.purge:
        return 0
    return _purge(stub, args, manifest)


def _purge(
    stub: canvas_pb2_grpc.CanvasStub, args: argparse.Namespace, manifest: canvas_archive.Manifest
) -> int:
    kept: list[str] = []
    reason = f"{args.reason.strip()} (archived to {args.file.name})"
    for a in manifest.artifacts:
        req = canvas_pb2.DeleteArtifactRequest(name=a.name, etag=a.latest.etag, reason=reason)
        try:
            stub.DeleteArtifact(req, **_kw(args))
        except grpc.RpcError as e:
            if isinstance(e, grpc.Call) and e.code() in (
                grpc.StatusCode.FAILED_PRECONDITION,
                grpc.StatusCode.ABORTED,
            ):
                kept.append(a.name)  # changed since it was archived: its newest version is not in the archive
                continue
            if isinstance(e, grpc.Call) and e.code() == grpc.StatusCode.NOT_FOUND:
                continue  # already gone
            rpc.print_error(e)
            return 1
    print(f"purged {len(manifest.artifacts) - len(kept)} artifact(s) (audited as canvasDelete: {reason})")
    if kept:
        print(
            f"kept {len(kept)} artifact(s) changed since they were archived: {', '.join(kept)}",
            file=sys.stderr,
        )
        return 1
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    try:
        manifest = canvas_archive.verify(args.file)
    except ArchiveError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(
        f"{args.file}: {len(manifest.artifacts)} artifact(s), {manifest.version_count} version(s), "
        f"archived {manifest.created} from {manifest.source}; every sha256 matches"
    )
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    stub = _stub(args)
    restored = present = 0
    conflicts: list[str] = []
    try:
        canvas_archive.verify(args.file)
        for entry, v, content in canvas_archive.contents(args.file):
            there = _get(stub, args, entry.name, v.version)
            if there is not None:
                if there.sha256 == v.sha256:
                    present += 1  # already restored (or never removed): same version, same content
                else:
                    conflicts.append(f"{entry.name}@{v.version}")
                continue
            if args.dry_run:
                restored += 1
                continue
            req = canvas_pb2.PutArtifactRequest(
                name=entry.name, content_type=v.content_type, content=content, restore_version=v.version
            )
            try:
                resp = stub.PutArtifact(req, **_kw(args))
            except grpc.RpcError as e:
                if isinstance(e, grpc.Call) and e.code() == grpc.StatusCode.FAILED_PRECONDITION:
                    conflicts.append(f"{entry.name}@{v.version}")
                    continue
                rpc.print_error(e)
                return 1
            if resp.artifact.sha256 != v.sha256 or resp.artifact.etag != v.etag:
                print(
                    f"error: {entry.name}@{v.version} came back different from the archive", file=sys.stderr
                )
                return 1
            restored += 1
    except _Failed:
        return 1
    except ArchiveError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    verb = "would restore" if args.dry_run else "restored"
    print(f"{verb} {restored} version(s); {present} already present with the same sha256")
    if conflicts:
        print(
            f"not restored: {len(conflicts)} version(s) the canvas holds differently or above: {', '.join(conflicts[:20])}",
            file=sys.stderr,
        )
        return 1
    return 0
