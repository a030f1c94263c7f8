"""TLS through the real gateway (issue 15): grpcurl with -cacert works and without it fails; an
internal service under mutual TLS refuses a client without a certificate; a rotated certificate is
served without a restart. Certificates come from flynn_launcher.certs (what `flynn-dev up --tls` uses).
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from flynn_launcher import certs
from tests.support.mesh import ServiceProcess, Tokens, as_call, free_port, grpcurl_path, make_tokens

HOSTS = ["localhost", "127.0.0.1"]


@dataclass
class TlsMesh:
    pki: certs.CertPaths
    tokens: Tokens
    config: ServiceProcess
    gateway: ServiceProcess

    def client_credentials(self, with_cert: bool = True) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            self.pki.ca_cert.read_bytes(),
            self.pki.key("tester").read_bytes() if with_cert else None,
            self.pki.cert("tester").read_bytes() if with_cert else None,
        )


def _tls_args(pki: certs.CertPaths, name: str) -> list[str]:
    return [
        "--tls-cert-file", str(pki.cert(name)),
        "--tls-key-file", str(pki.key(name)),
        "--tls-ca-file", str(pki.ca_cert),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def tls_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsMesh]:
    root = tmp_path_factory.mktemp("tlsmesh")
    tokens = make_tokens(root)
    pki = certs.CertPaths(root / "tls")
    for name in ("config", "gateway", "tester"):
        certs.issue(pki, name, HOSTS)
    ca_only = grpc.ssl_channel_credentials(pki.ca_cert.read_bytes())
    mtls = grpc.ssl_channel_credentials(
        pki.ca_cert.read_bytes(), pki.key("tester").read_bytes(), pki.cert("tester").read_bytes()
    )
    config = ServiceProcess(
        "config", "config_svc.main", root / "config", tokens, extra=_tls_args(pki, "config"), credentials=mtls
    )
    gateway = None
    try:
        config.start(timeout=60)
        dead = {b: f"127.0.0.1:{free_port()}" for b in ("queue", "reactions", "nodes", "voice")}
        gateway = ServiceProcess(
            "gateway",
            "gateway.main",
            root / "gateway",
            tokens,
            addresses={"config": config.address, **dead},
            extra=_tls_args(pki, "gateway"),
            credentials=ca_only,  # the edge asks its callers for no certificate
        ).start(timeout=60)
        yield TlsMesh(pki, tokens, config, gateway)
    finally:
        if gateway is not None:
            gateway.stop()
        config.stop()


def _grpcurl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [grpcurl_path(), "-max-time", "10", *args], capture_output=True, text=True, timeout=30
    )


def test_grpcurl_through_the_gateway_works_with_cacert_and_fails_without(tls_mesh: TlsMesh) -> None:
    auth = ["-H", f"authorization: Bearer {tls_mesh.tokens.operator}", "-d", "{}"]
    # The call crosses the gateway (TLS) and the hop to config (mutual TLS, the gateway's certificate).
    ok = _grpcurl(
        "-cacert",
        str(tls_mesh.pki.ca_cert),
        *auth,
        tls_mesh.gateway.address,
        "flynn.v1.ConfigService/GetConfig",
    )
    assert ok.returncode == 0, ok.stderr
    assert '"revision"' in ok.stdout
    no_ca = _grpcurl(*auth, tls_mesh.gateway.address, "flynn.v1.ConfigService/GetConfig")
    assert no_ca.returncode != 0
    assert "certificate signed by unknown authority" in no_ca.stderr, no_ca.stderr
    plaintext = _grpcurl("-plaintext", *auth, tls_mesh.gateway.address, "flynn.v1.ConfigService/GetConfig")
    assert plaintext.returncode != 0


def _health(address: str, credentials: grpc.ChannelCredentials) -> str:
    with grpc.secure_channel(address, credentials) as ch:
        try:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        except grpc.RpcError as err:
            return f"refused: {as_call(err).code().name}"
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status))


def test_internal_service_under_mtls_refuses_a_client_without_certificate(tls_mesh: TlsMesh) -> None:
    address = tls_mesh.config.address
    assert _health(address, tls_mesh.client_credentials(with_cert=True)) == "SERVING"
    assert _health(address, tls_mesh.client_credentials(with_cert=False)) == "refused: UNAVAILABLE"
    # grpcurl the same way: trusted CA, but no client certificate.
    no_cert = _grpcurl("-cacert", str(tls_mesh.pki.ca_cert), address, "grpc.health.v1.Health/Check")
    assert no_cert.returncode != 0
    with_cert = _grpcurl(
        "-cacert", str(tls_mesh.pki.ca_cert),
        "-cert", str(tls_mesh.pki.cert("tester")), "-key", str(tls_mesh.pki.key("tester")),
        address, "grpc.health.v1.Health/Check",
    )  # fmt: skip
    assert with_cert.returncode == 0 and "SERVING" in with_cert.stdout, with_cert.stderr
    # Nor does it speak plaintext.
    plaintext = _grpcurl("-plaintext", address, "grpc.health.v1.Health/Check")
    assert plaintext.returncode != 0


def test_rotated_certificate_is_served_without_restart(tls_mesh: TlsMesh, tmp_path: Path) -> None:
    gw = tls_mesh.gateway
    assert gw.proc is not None
    pid = gw.proc.pid
    # A certificate from a different CA makes the switch observable: only the new CA verifies it.
    other = certs.CertPaths(tmp_path / "other-ca")
    cert, key = certs.issue(other, "gateway", HOSTS)
    before = _grpcurl("-cacert", str(other.ca_cert), gw.address, "grpc.health.v1.Health/Check")
    assert before.returncode != 0
    for src, dst in ((key, tls_mesh.pki.key("gateway")), (cert, tls_mesh.pki.cert("gateway"))):
        tmp = dst.with_name(dst.name + ".new")
        shutil.copyfile(src, tmp)
        tmp.replace(dst)  # atomic, as cert-manager's Secret volume update is
    deadline = time.monotonic() + 20
    after = before
    while time.monotonic() < deadline:  # bounded: the next handshake picks it up
        after = _grpcurl("-cacert", str(other.ca_cert), gw.address, "grpc.health.v1.Health/Check")
        if after.returncode == 0:
            break
        time.sleep(0.2)
    assert after.returncode == 0 and "SERVING" in after.stdout, after.stderr
    old_ca = _grpcurl("-cacert", str(tls_mesh.pki.ca_cert), gw.address, "grpc.health.v1.Health/Check")
    assert old_ca.returncode != 0
    assert gw.proc.poll() is None and gw.proc.pid == pid  # same process: no restart
