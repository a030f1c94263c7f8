"""A backend that accepts TCP connections but never answers (a hung process, a full accept queue)
still gives UNAVAILABLE naming it, bounded by the gateway's connect timeout, not the caller's deadline."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from flynn.v1 import reactions_pb2, reactions_pb2_grpc

from flynn_runtime.rich_status import from_rpc_error
from flynn_runtime.server import running
from gateway.app import GatewayApp
from tests.support.mesh import Tokens, make_settings


@pytest.fixture
def hung_backend() -> Iterator[str]:
    """A listening socket that never accepts, its backlog filled so new handshakes never complete."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(0)
    port = srv.getsockname()[1]
    fillers = []
    for _ in range(3):
        c = socket.socket()
        c.setblocking(False)
        try:
            c.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        fillers.append(c)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        for c in fillers:
            c.close()
        srv.close()


async def test_hung_backend_is_unavailable_not_a_hang(
    tmp_path: Path, tokens: Tokens, hung_backend: str
) -> None:
    settings = make_settings("gateway", tmp_path, tokens, addresses={"reactions": hung_backend})
    async with running(settings, GatewayApp) as gw, grpc.aio.insecure_channel(gw.address) as ch:
        stub = reactions_pb2_grpc.ReactionsStub(ch)
        start = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await stub.ListRules(reactions_pb2.ListRulesRequest(), metadata=tokens.md("operator"), timeout=60)
        elapsed = time.monotonic() - start
    assert exc.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "the reactions service is unavailable" in (exc.value.details() or "")
    assert hung_backend not in (exc.value.details() or "")
    err = from_rpc_error(exc.value)
    assert err is not None and err.reason == "BACKEND_UNAVAILABLE"
    assert elapsed < 30  # bounded by the connect timeout (about 1 s), far below the caller's 60 s
