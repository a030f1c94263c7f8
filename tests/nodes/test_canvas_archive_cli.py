"""`flynn canvas archive / verify / restore` through a real gateway and nodes service: every artifact
with its kept versions and metadata in one verified archive with a sha256 per version, an audited
purge, and a restore with the same names, versions, hashes and etags."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from flynn.v1 import canvas_pb2, canvas_pb2_grpc

from tests.support.mesh import ROOT, ServiceProcess, Tokens, free_port
from tests.support.nodes import config_yaml, nodes_config


@pytest.fixture
def gateway(tmp_path: Path, tokens: Tokens) -> Iterator[tuple[ServiceProcess, ServiceProcess]]:
    cfg_file = tmp_path / "nodes.yaml"
    cfg_file.write_text(config_yaml(nodes_config(canvas=True)))
    nodes = ServiceProcess(
        "nodes",
        "nodes_svc.main",
        tmp_path / "nodes",
        tokens,
        port=free_port(),
        extra=["--nodes-config", str(cfg_file)],
    )
    gw = ServiceProcess(
        "gateway", "gateway.main", tmp_path / "gateway", tokens, addresses={"nodes": nodes.address}
    )
    try:
        nodes.start()
        gw.start()
        yield gw, nodes
    finally:
        gw.stop()
        nodes.stop()


def _flynn(gw: ServiceProcess, tokens: Tokens, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(
        os.environ, FLYNN_ADDR=gw.address, FLYNN_TOKEN=tokens.operator, PYTHONPATH=f"{ROOT}:{ROOT / 'gen'}"
    )
    return subprocess.run(
        [sys.executable, "-m", "flynn_cli.main", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=ROOT,
    )


def _state(
    stub: canvas_pb2_grpc.CanvasStub, md: tuple[tuple[str, str], ...]
) -> dict[str, list[tuple[int, str, str, str]]]:
    """name -> kept versions (version, sha256, etag, content_type), read through the API."""
    out: dict[str, list[tuple[int, str, str, str]]] = {}
    for a in stub.ListArtifacts(
        canvas_pb2.ListArtifactsRequest(page_size=1000), metadata=md, timeout=10
    ).artifacts:
        versions = []
        for n in range(a.version, 0, -1):
            try:
                v = stub.GetArtifact(
                    canvas_pb2.GetArtifactRequest(name=a.name, version=n), metadata=md, timeout=10
                )
            except grpc.RpcError:
                break
            versions.append((n, v.artifact.sha256, v.artifact.etag, v.artifact.content_type))
        out[a.name] = sorted(versions)
    return out


def test_archive_purge_restore_round_trip(
    gateway: tuple[ServiceProcess, ServiceProcess], tokens: Tokens, tmp_path: Path
) -> None:
    gw, nodes = gateway
    md = tokens.md("operator")
    with grpc.insecure_channel(gw.address) as ch:
        stub = canvas_pb2_grpc.CanvasStub(ch)

        def put(name: str, content: bytes, ctype: str = "text/plain") -> None:
            stub.PutArtifact(
                canvas_pb2.PutArtifactRequest(name=name, content_type=ctype, content=content),
                metadata=md,
                timeout=10,
            )

        for i in range(3):
            put("docs/status.md", f"# status {i}\n".encode(), "text/markdown")
        put("img/logo.bin", bytes(range(256)) * 40, "application/octet-stream")
        for i in range(25):  # more than the 20 kept versions: the archive holds exactly what is kept
            put("notes/log", f"entry {i}".encode())
        before = _state(stub, md)
        assert [v[0] for v in before["notes/log"]] == list(range(6, 26))

        archive = tmp_path / "canvas.tar.gz"
        out = _flynn(gw, tokens, "canvas", "archive", str(archive))
        assert out.returncode == 0, out.stdout + out.stderr
        assert "archived 3 artifact(s), 24 version(s)" in out.stdout, out.stdout
        with tarfile.open(archive, "r:gz") as tar:
            manifest = json.loads(tar.extractfile("manifest.json").read())  # type: ignore[union-attr]
        archived = {
            a["name"]: sorted(
                (v["version"], v["sha256"], v["etag"], v["content_type"]) for v in a["versions"]
            )
            for a in manifest["artifacts"]
        }
        assert archived == before
        verify = _flynn(gw, tokens, "canvas", "verify", str(archive))
        assert verify.returncode == 0 and "every sha256 matches" in verify.stdout, (
            verify.stdout + verify.stderr
        )

        # A damaged archive is refused.
        damaged = tmp_path / "damaged.tar"
        with tarfile.open(archive, "r:gz") as src, tarfile.open(damaged, "w") as dst:
            for m in src.getmembers():
                data = src.extractfile(m).read()  # type: ignore[union-attr]
                if m.name.endswith("/25.bin"):
                    data = b"tampered"
                    m.size = len(data)
                dst.addfile(m, io.BytesIO(data))
        bad = _flynn(gw, tokens, "canvas", "verify", str(damaged))
        assert bad.returncode == 1 and "does not match its sha256" in bad.stderr, bad.stderr

        # Purge: archived, verified, then removed; each removal audited with the reason.
        second = tmp_path / "canvas.tar"
        purge = _flynn(gw, tokens, "canvas", "archive", str(second), "--purge", "--reason", "canvas rollback")
        assert purge.returncode == 0, purge.stdout + purge.stderr
        assert "purged 3 artifact(s)" in purge.stdout
        assert _state(stub, md) == {}
        audit = "".join(p.read_text() for p in (nodes.data_dir / "audit").glob("*"))
        deletes = [json.loads(line) for line in audit.splitlines() if '"canvasDelete"' in line]
        assert len(deletes) == 3 and all(
            "canvas rollback (archived to canvas.tar)" == d["reason"] for d in deletes
        )

        # Restore: the same names, versions, hashes (and so etags).
        dry = _flynn(gw, tokens, "canvas", "restore", str(second), "--dry-run")
        assert dry.returncode == 0 and "would restore 24 version(s)" in dry.stdout, dry.stdout + dry.stderr
        assert _state(stub, md) == {}
        back = _flynn(gw, tokens, "canvas", "restore", str(second))
        assert back.returncode == 0, back.stdout + back.stderr
        assert _state(stub, md) == before
        again = _flynn(gw, tokens, "canvas", "restore", str(second))
        assert again.returncode == 0 and "restored 0 version(s); 24 already present" in again.stdout, (
            again.stdout
        )
        # New writes continue above the restored versions.
        put("docs/status.md", b"# status after restore\n", "text/markdown")
        assert _state(stub, md)["docs/status.md"][-1][0] == 4
