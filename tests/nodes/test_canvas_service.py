"""flynn.v1.Canvas through a real in-process server: CAS over gRPC, names, gate, clean restart."""

from __future__ import annotations

import hashlib
from pathlib import Path

import grpc
import pytest
from flynn.v1 import canvas_pb2

from flynn_runtime.audit import read_audit
from flynn_runtime.rich_status import from_rpc_error
from tests.support.mesh import Tokens
from tests.support.nodes import NodesHarness, nodes_config, nodes_server

TRAVERSAL = ["../x", "/etc/passwd", "a/../../b", "a\x00b", "a\\b"]


async def test_cas_conflict_reports_current_etag(harness: NodesHarness) -> None:
    h = harness
    put = h.canvas.PutArtifact
    r1 = await put(
        canvas_pb2.PutArtifactRequest(
            name="board/main", content_type="text/markdown", content=b"# v1", etag="*"
        ),
        metadata=h.op(),
        timeout=10,
    )
    r2 = await put(
        canvas_pb2.PutArtifactRequest(
            name="board/main", content_type="text/markdown", content=b"# v2", etag=r1.artifact.etag
        ),
        metadata=h.op(),
        timeout=10,
    )
    assert r2.artifact.version == 2 and r2.artifact.sha256 == hashlib.sha256(b"# v2").hexdigest()
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await put(
            canvas_pb2.PutArtifactRequest(
                name="board/main",
                content_type="text/markdown",
                content=b"# lost update",
                etag=r1.artifact.etag,
            ),
            metadata=h.op(),
            timeout=10,
        )
    assert ei.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    info = from_rpc_error(ei.value)
    assert (
        info is not None
        and info.reason == "ETAG_MISMATCH"
        and info.metadata["current_etag"] == r2.artifact.etag
    )
    got = await h.canvas.GetArtifact(
        canvas_pb2.GetArtifactRequest(name="board/main"), metadata=h.op(), timeout=10
    )
    assert got.artifact.content == b"# v2" and got.artifact.actor == "operator:operator"
    v1 = await h.canvas.GetArtifact(
        canvas_pb2.GetArtifactRequest(name="board/main", version=1), metadata=h.op(), timeout=10
    )
    assert v1.artifact.content == b"# v1"
    lst = await h.canvas.ListArtifacts(
        canvas_pb2.ListArtifactsRequest(prefix="board/"), metadata=h.op(), timeout=10
    )
    assert [a.name for a in lst.artifacts] == ["board/main"] and lst.artifacts[0].content == b""
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await h.canvas.DeleteArtifact(
            canvas_pb2.DeleteArtifactRequest(name="board/main", etag=r1.artifact.etag),
            metadata=h.op(),
            timeout=10,
        )
    assert ei.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    d = await h.canvas.DeleteArtifact(
        canvas_pb2.DeleteArtifactRequest(name="board/main"), metadata=h.op(), timeout=10
    )
    assert d.deleted_versions == 2
    events = [e["event"] for e in read_audit(h.server.runtime.audit.path)]  # type: ignore[arg-type]
    assert events.count("canvasPut") == 2 and events.count("canvasDelete") == 1


@pytest.mark.parametrize("name", TRAVERSAL)
async def test_path_traversal_names_refused_with_field(harness: NodesHarness, name: str) -> None:
    h = harness
    calls = [
        h.canvas.PutArtifact(
            canvas_pb2.PutArtifactRequest(name=name, content_type="text/plain", content=b"x"),
            metadata=h.op(),
            timeout=10,
        ),
        h.canvas.GetArtifact(canvas_pb2.GetArtifactRequest(name=name), metadata=h.op(), timeout=10),
        h.canvas.DeleteArtifact(canvas_pb2.DeleteArtifactRequest(name=name), metadata=h.op(), timeout=10),
    ]
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await call
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        info = from_rpc_error(ei.value)
        assert info is not None and [v.field for v in info.violations] == ["name"]
    data_dir = h.server.runtime.settings.data_dir
    assert not (data_dir.parent / "x").exists() and not list((data_dir / "canvas" / "blobs").rglob("*.bin"))


async def test_canvas_gate_off_refuses(tmp_path: Path, tokens: Tokens) -> None:
    async with nodes_server(tmp_path / "data", tokens, nodes_config(canvas=False)) as h:
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await h.canvas.PutArtifact(
                canvas_pb2.PutArtifactRequest(name="a", content_type="text/plain", content=b"x"),
                metadata=h.op(),
                timeout=10,
            )
        info = from_rpc_error(ei.value)
        assert (
            ei.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            and info is not None
            and info.reason == "CANVAS_DISABLED"
        )
        await h.apply(nodes_config(canvas=True))  # live, no restart
        r = await h.canvas.PutArtifact(
            canvas_pb2.PutArtifactRequest(name="a", content_type="text/plain", content=b"x"),
            metadata=h.op(),
            timeout=10,
        )
        assert r.artifact.version == 1


async def test_canvas_limits_over_grpc(tmp_path: Path, tokens: Tokens) -> None:
    extra = ["--canvas-max-artifact-bytes", "1000", "--canvas-max-total-bytes", "1500"]
    from tests.support.nodes import nodes_server as ns

    async with ns(tmp_path / "data", tokens, extra=extra) as h:
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await h.canvas.PutArtifact(
                canvas_pb2.PutArtifactRequest(name="a", content_type="text/plain", content=b"x" * 1001),
                metadata=h.op(),
                timeout=10,
            )
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        await h.canvas.PutArtifact(
            canvas_pb2.PutArtifactRequest(name="a", content_type="text/plain", content=b"x" * 1000),
            metadata=h.op(),
            timeout=10,
        )
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await h.canvas.PutArtifact(
                canvas_pb2.PutArtifactRequest(name="b", content_type="text/plain", content=b"x" * 600),
                metadata=h.op(),
                timeout=10,
            )
        assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_canvas_survives_clean_restart(tmp_path: Path, tokens: Tokens) -> None:
    data = tmp_path / "data"
    payloads = {f"docs/{i}": hashlib.sha256(str(i).encode()).digest() * 100 for i in range(20)}
    async with nodes_server(data, tokens) as h:
        for name, body in payloads.items():
            await h.canvas.PutArtifact(
                canvas_pb2.PutArtifactRequest(
                    name=name, content_type="application/octet-stream", content=body
                ),
                metadata=h.op(),
                timeout=10,
            )
    async with nodes_server(data, tokens) as h:
        for name, body in payloads.items():
            a = (
                await h.canvas.GetArtifact(
                    canvas_pb2.GetArtifactRequest(name=name), metadata=h.op(), timeout=10
                )
            ).artifact
            assert a.content == body and a.sha256 == hashlib.sha256(body).hexdigest() and a.version == 1
        page = await h.canvas.ListArtifacts(
            canvas_pb2.ListArtifactsRequest(prefix="docs/", page_size=15), metadata=h.op(), timeout=10
        )
        assert len(page.artifacts) == 15 and page.next_page_token
        page2 = await h.canvas.ListArtifacts(
            canvas_pb2.ListArtifactsRequest(prefix="docs/", page_size=15, page_token=page.next_page_token),
            metadata=h.op(),
            timeout=10,
        )
        assert len(page2.artifacts) == 5 and not page2.next_page_token
