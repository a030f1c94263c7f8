"""The nodes process killed with SIGKILL in the middle of 1,000 canvas puts, then restarted; on each
backend (SQLite + files, PostgreSQL)."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import grpc
from flynn.v1 import canvas_pb2, canvas_pb2_grpc

from tests.support.mesh import ServiceProcess, Tokens
from tests.support.nodes import config_yaml, nodes_config

TOTAL = 1000
KILL_AFTER = 400
WORKERS = 4


def _content(i: int) -> bytes:
    return hashlib.sha256(str(i).encode()).digest() * (64 + i % 512)  # 2..18 KiB, distinct per put


async def test_sigkill_during_puts_loses_no_acknowledged_put(
    tmp_path: Path, tokens: Tokens, database_url: str
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    cfg_file = tmp_path / "nodes.yaml"
    cfg_file.write_text(config_yaml(nodes_config()))
    db = ["--database-url", database_url] if database_url else []
    proc = ServiceProcess(
        "nodes", "nodes_svc.main", data, tokens, extra=["--nodes-config", str(cfg_file), *db]
    )
    proc.start()
    md = tokens.md("operator")
    acked: dict[tuple[str, int], str] = {}  # (name, version) -> sha256
    attempted: dict[str, set[str]] = {}  # name -> sha256 of every put tried (acked or not)
    killed = asyncio.Event()
    next_i = 0
    try:

        async def worker(stub: canvas_pb2_grpc.CanvasStub, stop_at: int) -> None:
            nonlocal next_i
            while next_i < stop_at:
                i = next_i
                next_i += 1
                name, body = f"crash/{i % 250}", _content(i)
                attempted.setdefault(name, set()).add(hashlib.sha256(body).hexdigest())
                try:
                    r = await stub.PutArtifact(
                        canvas_pb2.PutArtifactRequest(
                            name=name, content_type="application/octet-stream", content=body
                        ),
                        metadata=md,
                        timeout=10,
                    )
                except grpc.aio.AioRpcError as e:
                    assert killed.is_set(), f"put failed before the kill: {e.code()} {e.details()}"
                    return
                assert r.artifact.sha256 == hashlib.sha256(body).hexdigest()
                acked[(name, r.artifact.version)] = r.artifact.sha256
                if len(acked) >= KILL_AFTER and not killed.is_set():
                    killed.set()
                    proc.kill9()  # other workers have puts in flight right now

        async with grpc.aio.insecure_channel(proc.address) as ch:
            stub = canvas_pb2_grpc.CanvasStub(ch)
            await asyncio.gather(*(worker(stub, TOTAL) for _ in range(WORKERS)))
        assert killed.is_set()
        before_restart = len(acked)
        proc.start()
        async with grpc.aio.insecure_channel(proc.address) as ch:
            stub = canvas_pb2_grpc.CanvasStub(ch)
            await asyncio.gather(*(worker(stub, TOTAL) for _ in range(WORKERS)))
            assert len(acked) > before_restart and next_i >= TOTAL
            # Every acknowledged put is readable, byte-exact.
            for (name, version), sha in acked.items():
                a = (
                    await stub.GetArtifact(
                        canvas_pb2.GetArtifactRequest(name=name, version=version), metadata=md, timeout=10
                    )
                ).artifact
                assert a.sha256 == sha and hashlib.sha256(a.content).hexdigest() == sha
            # Nothing half-written is visible: every listed latest version is whole and is one of our puts.
            seen = 0
            token = ""
            while True:
                page = await stub.ListArtifacts(
                    canvas_pb2.ListArtifactsRequest(prefix="crash/", page_size=100, page_token=token),
                    metadata=md,
                    timeout=10,
                )
                for meta in page.artifacts:
                    a = (
                        await stub.GetArtifact(
                            canvas_pb2.GetArtifactRequest(name=meta.name), metadata=md, timeout=10
                        )
                    ).artifact
                    assert hashlib.sha256(a.content).hexdigest() == a.sha256 and a.sha256 in attempted[a.name]
                    seen += 1
                token = page.next_page_token
                if not token:
                    break
            assert seen == 250
        leftovers = [p for p in (data / "canvas").rglob("*") if p.name.endswith(".tmp")]
        assert leftovers == []
        assert proc.terminate() == 0
        # The clean restart keeps everything too.
        proc.start()
        async with grpc.aio.insecure_channel(proc.address) as ch:
            stub = canvas_pb2_grpc.CanvasStub(ch)
            for (name, version), sha in list(acked.items())[::25]:
                a = (
                    await stub.GetArtifact(
                        canvas_pb2.GetArtifactRequest(name=name, version=version), metadata=md, timeout=10
                    )
                ).artifact
                assert a.sha256 == sha
    finally:
        proc.stop()
