"""A real mesh (every service as its own process) behind a real gateway that trusts 127.0.0.1 as a
proxy (so a test can stand for many client addresses with X-Forwarded-For), and a run-control
session cap small enough to reach."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from flynn.v1 import principals_pb2, principals_pb2_grpc, run_control_pb2, run_control_pb2_grpc

from flynn_runtime import topology
from tests.support.mesh import ServiceProcess, Tokens, free_port, make_tokens

SESSION_CAP = 4


@dataclass
class SecureMesh:
    root: Path
    tokens: Tokens
    procs: dict[str, ServiceProcess] = field(default_factory=dict)
    proxy_port: int = 0  # the gateway's PROXY protocol listener

    def start(self) -> SecureMesh:
        ports = {name: free_port() for name in topology.START_ORDER}
        addresses = {name: f"127.0.0.1:{port}" for name, port in ports.items() if name != "gateway"}
        self.proxy_port = free_port()
        extra = {
            "gateway": [
                "--trusted-proxies",
                "127.0.0.1/32",
                "--proxy-protocol-listen",
                f"127.0.0.1:{self.proxy_port}",
            ],
            "queue": ["--max-sessions-per-principal", str(SESSION_CAP)],
        }
        for name in topology.START_ORDER:
            proc = ServiceProcess(
                name,
                topology.SERVICES[name].module,
                self.root / name,
                self.tokens,
                addresses=addresses,
                port=ports[name],
                extra=extra.get(name, []),
            )
            self.procs[name] = proc
            proc.start(timeout=60)
        return self

    def stop(self) -> None:
        for name in reversed(list(self.procs)):
            self.procs[name].stop()

    @property
    def gateway(self) -> str:
        return self.procs["gateway"].address

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.gateway)

    def issue(self, name: str, role: int, channels: list[str] | None = None) -> str:
        with self.channel() as ch:
            resp = principals_pb2_grpc.PrincipalsStub(ch).IssueToken(
                principals_pb2.IssueTokenRequest(name=name, role=role, channels=channels or []),
                metadata=self.tokens.md("operator"),
                timeout=10,
            )
        token = str(resp.token)
        if role != principals_pb2.PRINCIPAL_ROLE_AGENT:
            self.wait_known(token)
        return token

    def wait_known(self, token: str, timeout: float = 10.0) -> None:
        """An issued token reaches every service through WatchPrincipals within moments: wait until
        the gateway and run control behind it accept it (NOT_FOUND for a session nobody has)."""
        deadline = time.monotonic() + timeout
        with self.channel() as ch:
            rc = run_control_pb2_grpc.RunControlStub(ch)
            while True:
                try:
                    rc.GetSession(
                        run_control_pb2.GetSessionRequest(session_key="probe:none"), metadata=bearer(token)
                    )
                except grpc.RpcError as err:
                    unknown = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.RESOURCE_EXHAUSTED)
                    if err.code() not in unknown or time.monotonic() > deadline:
                        return
                time.sleep(0.02)


@pytest.fixture(scope="package")
def secure_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureMesh]:
    root = tmp_path_factory.mktemp("secmesh")
    m = SecureMesh(root, make_tokens(root))
    try:
        m.start()
        yield m
    finally:
        m.stop()


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)
