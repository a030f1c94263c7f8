"""SIGTERM of real processes during in-flight calls: calls finish, health turns NOT_SERVING, exit 0,
and open streams end with UNAVAILABLE/SHUTTING_DOWN so clients reconnect."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from flynn.v1 import voice_pb2, voice_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from flynn_runtime.rich_status import from_rpc_error
from tests.gateway.test_forwarding import wait_for_line
from tests.support.gateway import GatewayMesh
from tests.support.mesh import ServiceProcess, make_tokens

GRACE = 5.0


@pytest.fixture
def fresh(tmp_path: Path) -> Iterator[GatewayMesh]:
    m = GatewayMesh(tmp_path, make_tokens(tmp_path))
    try:
        m.start(grace=GRACE, gateway_grace=GRACE)
        yield m
    finally:
        m.stop()


class HealthWatch:
    """Health/Watch on a process, collected in a thread (the statuses it saw, in order)."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.insecure_channel(address)
        self.call = health_pb2_grpc.HealthStub(self.channel).Watch(health_pb2.HealthCheckRequest(service=""))
        self.seen: list[int] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for resp in self.call:
                self.seen.append(resp.status)
        except grpc.RpcError:
            pass

    def wait_for(self, status: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if status in self.seen:
                return
            time.sleep(0.01)
        raise AssertionError(f"health never reported {status}; saw {self.seen}")

    def close(self) -> None:
        self.call.cancel()
        self.channel.close()


def sigterm_during_unary(proc: ServiceProcess, call_target: str, mesh: GatewayMesh) -> None:
    assert mesh.echo is not None and proc.proc is not None
    text = "sleep:1.5"
    watch = HealthWatch(proc.address)
    watch.wait_for(health_pb2.HealthCheckResponse.SERVING)
    with grpc.insecure_channel(call_target) as ch:
        fut = voice_pb2_grpc.VoiceStub(ch).Synthesize.future(
            voice_pb2.SynthesizeRequest(text=text), metadata=mesh.tokens.md("operator"), timeout=30
        )
        wait_for_line(mesh.echo.data_dir / "events.log", f"started {text}")
        sent = time.monotonic()
        proc.proc.send_signal(signal.SIGTERM)
        watch.wait_for(health_pb2.HealthCheckResponse.NOT_SERVING)
        watch.close()
        assert fut.result(timeout=20).audio_content == text.encode()  # the in-flight call completed
    assert proc.proc.wait(timeout=GRACE + 10) == 0
    assert time.monotonic() - sent < GRACE + 5, "exit within the grace period (plus process teardown)"


def test_sigterm_gateway_mid_forward(fresh: GatewayMesh) -> None:
    assert fresh.gateway is not None
    sigterm_during_unary(fresh.gateway, fresh.gateway.address, fresh)


def test_sigterm_backend_during_call_through_gateway(fresh: GatewayMesh) -> None:
    assert fresh.gateway is not None and fresh.echo is not None
    sigterm_during_unary(fresh.echo, fresh.gateway.address, fresh)


def _open_forever_stream(mesh: GatewayMesh, ch: grpc.Channel) -> Iterator[voice_pb2.StreamSynthesizeResponse]:
    assert mesh.echo is not None
    stream = voice_pb2_grpc.VoiceStub(ch).StreamSynthesize(
        voice_pb2.StreamSynthesizeRequest(text="forever"), metadata=mesh.tokens.md("operator"), timeout=60
    )
    assert next(stream).text == "0"
    wait_for_line(mesh.echo.data_dir / "events.log", "stream open")
    return stream


@pytest.mark.parametrize("victim", ["gateway", "echo"])
def test_open_stream_ends_with_shutting_down(fresh: GatewayMesh, victim: str) -> None:
    proc = getattr(fresh, victim)
    assert fresh.gateway is not None and proc is not None and proc.proc is not None
    with grpc.insecure_channel(fresh.gateway.address) as ch:
        stream = _open_forever_stream(fresh, ch)
        proc.proc.send_signal(signal.SIGTERM)
        with pytest.raises(grpc.RpcError) as exc:
            next(stream)
    assert exc.value.code() == grpc.StatusCode.UNAVAILABLE
    err = from_rpc_error(exc.value)
    assert err is not None and err.reason == "SHUTTING_DOWN"
    name = "gateway" if victim == "gateway" else "voice"
    assert f"{name} is shutting down" in err.message
    assert proc.proc.wait(timeout=GRACE + 10) == 0
