"""The gateway forwards every kind of call to a real backend process, unchanged (grpc Python client)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from flynn.v1 import nodes_pb2, run_control_pb2, run_control_pb2_grpc, voice_pb2, voice_pb2_grpc

from flynn_runtime.rich_status import from_rpc_error
from tests.support.gateway import GatewayMesh


@pytest.fixture
def channel(mesh: GatewayMesh) -> Iterator[grpc.Channel]:
    assert mesh.gateway is not None
    with grpc.insecure_channel(mesh.gateway.address) as ch:
        yield ch


def md(mesh: GatewayMesh, role: str = "operator") -> tuple[tuple[str, str], ...]:
    return mesh.tokens.md(role)


def wait_for_line(path: Path, line: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and line in path.read_text().splitlines():
            return
        time.sleep(0.02)
    raise AssertionError(f"{line!r} never appeared in {path}")


def test_unary_forwarded(mesh: GatewayMesh, channel: grpc.Channel) -> None:
    stub = voice_pb2_grpc.VoiceStub(channel)
    resp = stub.Synthesize(voice_pb2.SynthesizeRequest(text="hello"), metadata=md(mesh), timeout=10)
    assert resp.audio_content == b"hello"


def test_metadata_forwarded_without_hop_by_hop_headers(mesh: GatewayMesh, channel: grpc.Channel) -> None:
    stub = voice_pb2_grpc.VoiceStub(channel)
    resp = stub.ListVoices(
        voice_pb2.ListVoicesRequest(),
        metadata=(*md(mesh), ("x-flynn-trace", "abc123"), ("x-raw-bin", b"\x00\x01")),
        timeout=10,
    )
    seen = {v.name for v in resp.voices}
    assert f"md:authorization=Bearer {mesh.tokens.operator}" in seen
    assert "md:x-flynn-trace=abc123" in seen
    assert "md:x-raw-bin=0001" in seen
    # The gateway's own client sets user-agent; the caller's is not copied, and nothing reserved is.
    assert not any(n.startswith(("md::", "md:grpc-", "md:te=", "md:content-type")) for n in seen)


def test_deadline_propagated(mesh: GatewayMesh, channel: grpc.Channel) -> None:
    stub = voice_pb2_grpc.VoiceStub(channel)
    resp = stub.Synthesize(voice_pb2.SynthesizeRequest(text="x"), metadata=md(mesh), timeout=7)
    assert resp.engine.startswith("deadline=")
    seen = float(resp.engine.split("=")[1])
    # The caller's 7 s (grpc-timeout is coarsely encoded, so allow rounding), not the gateway default (300 s).
    assert 0 < seen < 7.5


def test_no_deadline_gets_the_gateway_default(mesh: GatewayMesh, channel: grpc.Channel) -> None:
    stub = voice_pb2_grpc.VoiceStub(channel)
    resp = stub.Synthesize(voice_pb2.SynthesizeRequest(text="x"), metadata=md(mesh))
    assert resp.engine != "deadline=none"  # unary calls are always bounded downstream


def test_deadline_exceeded_through_the_gateway(mesh: GatewayMesh, channel: grpc.Channel) -> None:
    stub = voice_pb2_grpc.VoiceStub(channel)
    with pytest.raises(grpc.RpcError) as exc:
        stub.Synthesize(voice_pb2.SynthesizeRequest(text="sleep:5"), metadata=md(mesh), timeout=0.5)
    assert exc.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_rich_error_details_survive_the_hop(mesh: GatewayMesh, channel: grpc.Channel) -> None:
    stub = voice_pb2_grpc.VoiceStub(channel)
    with pytest.raises(grpc.RpcError) as exc:
        stub.Synthesize(voice_pb2.SynthesizeRequest(text=""), metadata=md(mesh), timeout=10)
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    err = from_rpc_error(exc.value)
    assert err is not None
    assert [v.field for v in err.violations] == ["text"]
    assert err.reason == "INVALID_FIELD"


def test_server_stream_forwarded(mesh: GatewayMesh, channel: grpc.Channel) -> None:
    stub = voice_pb2_grpc.VoiceStub(channel)
    chunks = list(
        stub.StreamSynthesize(voice_pb2.StreamSynthesizeRequest(text="n:25"), metadata=md(mesh), timeout=10)
    )
    assert [c.text for c in chunks] == [str(i) for i in range(25)]


def test_bidi_stream_forwarded(mesh: GatewayMesh, channel: grpc.Channel) -> None:
    # Nodes/Connect is public (nodes authenticate in-band); the echo backend echoes raw bytes.
    call = channel.stream_stream("/flynn.v1.Nodes/Connect")
    sent = [nodes_pb2.ConnectRequest().SerializeToString() + bytes([i]) for i in range(5)]
    got = list(call(iter(sent), timeout=10))
    assert got == sent


def test_client_cancel_cancels_the_backend_call(mesh: GatewayMesh, channel: grpc.Channel) -> None:
    assert mesh.echo is not None
    stub = voice_pb2_grpc.VoiceStub(channel)
    text = f"sleep:30.{time.monotonic_ns()}"
    fut = stub.Synthesize.future(voice_pb2.SynthesizeRequest(text=text), metadata=md(mesh), timeout=60)
    events = mesh.echo.data_dir / "events.log"
    wait_for_line(events, f"started {text}")
    fut.cancel()
    wait_for_line(events, f"cancelled {text}")


def test_backend_down_is_unavailable_naming_the_service(mesh: GatewayMesh, channel: grpc.Channel) -> None:
    stub = run_control_pb2_grpc.RunControlStub(channel)
    with pytest.raises(grpc.RpcError) as exc:
        stub.GetRun(run_control_pb2.GetRunRequest(run_id="r1"), metadata=md(mesh), timeout=10)
    assert exc.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "the queue service is unavailable" in (exc.value.details() or "")
    err = from_rpc_error(exc.value)
    assert err is not None and err.reason == "BACKEND_UNAVAILABLE"
    assert err.metadata["service"] == "queue"
    # Errors at the edge never name internal hosts or ports (issue 15): not in the message, not in details.
    host, _, port = mesh.dead["queue"].rpartition(":")
    everything = (exc.value.details() or "") + repr(exc.value.trailing_metadata())
    assert port not in everything and f"{host}:" not in everything, everything


def test_agent_is_not_routed(mesh: GatewayMesh, channel: grpc.Channel) -> None:
    call = channel.stream_stream("/flynn.v1.Agent/Run")
    with pytest.raises(grpc.RpcError) as exc:
        list(call(iter([b""]), metadata=md(mesh, "agent"), timeout=10))
    assert exc.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "does not route" in (exc.value.details() or "")


def test_large_messages_cross_the_hop(mesh: GatewayMesh) -> None:
    # Above gRPC's 4 MiB default: the gateway's server and backend channel both use --max-message-bytes.
    assert mesh.gateway is not None
    big = "x" * (6 * 1024 * 1024)
    opts = [
        ("grpc.max_receive_message_length", 32 * 1024 * 1024),
        ("grpc.max_send_message_length", 32 * 1024 * 1024),
    ]
    with grpc.insecure_channel(mesh.gateway.address, options=opts) as ch:
        resp = voice_pb2_grpc.VoiceStub(ch).Synthesize(
            voice_pb2.SynthesizeRequest(text=big), metadata=md(mesh), timeout=30
        )
    assert len(resp.audio_content) == len(big)
