"""Client-streaming forwarding. No flynn.v1 method is client-streaming yet, so this runs an in-process
gateway whose table routes Voice/Transcribe as a client stream to the real echo backend process."""

from __future__ import annotations

from pathlib import Path

import grpc
from flynn.v1 import voice_pb2

from flynn_runtime.server import Runtime, running
from gateway.app import GatewayApp
from gateway.routes import Route
from tests.support.gateway import GatewayMesh
from tests.support.mesh import make_settings

TRANSCRIBE = "/flynn.v1.Voice/Transcribe"


class ClientStreamGateway(GatewayApp):
    def routes(self) -> dict[str, Route]:
        table = super().routes()
        table[TRANSCRIBE] = Route(TRANSCRIBE, "voice", request_streaming=True, response_streaming=False)
        return table


async def test_client_stream_forwarded(mesh: GatewayMesh, tmp_path: Path) -> None:
    assert mesh.echo is not None
    settings = make_settings("gateway", tmp_path, mesh.tokens, addresses={"voice": mesh.echo.address})

    def factory(runtime: Runtime) -> GatewayApp:
        return ClientStreamGateway(runtime)

    async with running(settings, factory) as gw, grpc.aio.insecure_channel(gw.address) as ch:
        call = ch.stream_unary(TRANSCRIBE)
        chunks = [b"a" * n for n in (1, 10, 100, 1000)]
        raw = await call(iter(chunks), metadata=mesh.tokens.md("operator"), timeout=10)
        assert voice_pb2.TranscribeResponse.FromString(raw).transcript == "4 messages, 1111 bytes"
