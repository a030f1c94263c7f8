"""flynn.v1.Canvas servicer: validate, call the canvas, map to protos."""

from __future__ import annotations

from typing import Any

from flynn.v1 import canvas_pb2, canvas_pb2_grpc
from grpc.aio import ServicerContext

from flynn_runtime.auth import actor
from flynn_runtime.timestamps import timestamp
from flynn_runtime.validation import Violations, page_size
from nodes_svc.canvas_store import MAX_NAME_LEN, ArtifactMeta, Canvas, content_type_problem, name_problem
from nodes_svc.servicer import decode_page_token, encode_page_token

Ctx = ServicerContext[Any, Any]


def _name(v: Violations, field: str, name: str) -> None:
    problem = name_problem(name)
    if problem is not None:
        v.add(field, problem)


def _prefix(v: Violations, prefix: str) -> None:
    if not prefix:
        return
    if len(prefix) > MAX_NAME_LEN or "\x00" in prefix or "\\" in prefix or prefix.startswith("/"):
        v.add("prefix", "must be the start of a valid artifact name")


def artifact_proto(m: ArtifactMeta, content: bytes | None = None) -> canvas_pb2.Artifact:
    ts = timestamp(m.update_time)
    a = canvas_pb2.Artifact(
        name=m.name,
        version=m.version,
        etag=m.etag,
        content_type=m.content_type,
        sha256=m.sha256,
        size_bytes=m.size,
        update_time=ts,
        actor=m.actor,
    )
    if content is not None:
        a.content = content
    return a


class CanvasServicer(canvas_pb2_grpc.CanvasServicer):
    def __init__(self, canvas: Canvas) -> None:
        self.canvas = canvas

    async def PutArtifact(
        self, request: canvas_pb2.PutArtifactRequest, context: Ctx
    ) -> canvas_pb2.PutArtifactResponse:
        v = Violations()
        _name(v, "name", request.name)
        ct = content_type_problem(request.content_type)
        if ct is not None:
            v.add("content_type", ct)
        v.text("etag", request.etag, max_bytes=128)
        v.check(request.restore_version >= 0, "restore_version", "must not be negative")
        v.raise_if_any()
        meta = await self.canvas.put(
            request.name,
            request.content_type,
            request.content,
            request.etag,
            actor(),
            request.restore_version,
        )
        return canvas_pb2.PutArtifactResponse(artifact=artifact_proto(meta))

    async def GetArtifact(
        self, request: canvas_pb2.GetArtifactRequest, context: Ctx
    ) -> canvas_pb2.GetArtifactResponse:
        v = Violations()
        _name(v, "name", request.name)
        v.check(request.version >= 0, "version", "must be >= 0 (0 means the latest)")
        v.raise_if_any()
        meta, content = await self.canvas.get(request.name, request.version)
        return canvas_pb2.GetArtifactResponse(artifact=artifact_proto(meta, content))

    async def ListArtifacts(
        self, request: canvas_pb2.ListArtifactsRequest, context: Ctx
    ) -> canvas_pb2.ListArtifactsResponse:
        v = Violations()
        _prefix(v, request.prefix)
        v.raise_if_any()
        size = page_size(request.page_size, default=100, maximum=1000)
        after = decode_page_token(request.page_token)
        items = await self.canvas.list_latest(request.prefix, after, size + 1)
        more = len(items) > size
        items = items[:size]
        return canvas_pb2.ListArtifactsResponse(
            artifacts=[artifact_proto(m) for m in items],
            next_page_token=encode_page_token(items[-1].name) if more and items else "",
        )

    async def DeleteArtifact(
        self, request: canvas_pb2.DeleteArtifactRequest, context: Ctx
    ) -> canvas_pb2.DeleteArtifactResponse:
        v = Violations()
        _name(v, "name", request.name)
        v.text("etag", request.etag, max_bytes=128)
        v.text("reason", request.reason, max_bytes=1024)
        v.raise_if_any()
        n = await self.canvas.delete(request.name, request.etag, actor(), request.reason)
        return canvas_pb2.DeleteArtifactResponse(deleted_versions=n)
