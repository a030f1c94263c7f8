"""Address settings to gRPC targets: one address, a list of replicas, a headless Service."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from flynn_runtime.channels import client_channel, grpc_target


@pytest.mark.parametrize(
    ("address", "target"),
    [
        ("127.0.0.1:7002", "127.0.0.1:7002"),
        ("10.0.0.1:7002,10.0.0.2:7002", "ipv4:10.0.0.1:7002,10.0.0.2:7002"),
        ("10.0.0.1:7002, 10.0.0.2:7002", "ipv4:10.0.0.1:7002,10.0.0.2:7002"),
        ("[::1]:7002,[::2]:7002", "ipv6:[::1]:7002,[::2]:7002"),
        ("dns:///flynn-queue-headless.flynn.svc:50052", "dns:///flynn-queue-headless.flynn.svc:50052"),
    ],
)
def test_targets(address: str, target: str) -> None:
    assert grpc_target(address) == target


async def test_calls_are_spread_over_a_list_of_replicas() -> None:
    """round_robin over `a,b`: calls (not connections) alternate between the two servers. Each server
    answers its own health status, which tells them apart."""
    servers = []
    for status in (health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING):
        server = grpc.aio.server()
        hs = health.aio.HealthServicer()  # type: ignore[attr-defined]
        await hs.set("", status)
        health_pb2_grpc.add_HealthServicer_to_server(hs, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        servers.append((server, port))
    ch = client_channel(",".join(f"127.0.0.1:{p}" for _, p in servers), retries=False)
    try:
        stub = health_pb2_grpc.HealthStub(ch)
        for _ in range(20):  # until both subchannels are ready
            await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
        answers = [(await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)).status for _ in range(20)]
        assert answers.count(health_pb2.HealthCheckResponse.SERVING) >= 5
        assert answers.count(health_pb2.HealthCheckResponse.NOT_SERVING) >= 5
    finally:
        await ch.close(None)
        for server, _ in servers:
            await server.stop(None)
