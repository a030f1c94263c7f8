"""The chart's TLS modes (issue 15): the gateway's certificate from an existing Secret or a cert-manager
Certificate, mutual TLS between the services, a public gateway without TLS refused unless
gateway.allowPlaintext, NetworkPolicy on by default; kubernetes-validate passes for each mode, and the
Certificates match cert-manager's schema for the fields the chart sets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema

from flynn_runtime import topology
from tests.helm.conftest import CHART, Manifest, parse, render, run_helm
from tests.helm.test_chart_validation import KUBE_VERSIONS, kubernetes_validate

PUBLIC = ("--set", "gateway.service.type=LoadBalancer")
FROM_SECRET = (*PUBLIC, "--set", "gateway.tls.existingSecret=flynn-gateway-cert")
CERT_MANAGER = (
    *PUBLIC,
    "--set", "gateway.tls.certManager.enabled=true",
    "--set", "gateway.tls.certManager.issuerRef.name=edge-issuer",
    "--set", "gateway.tls.certManager.dnsNames[0]=flynn.example.com",
    "--set", "meshTls.enabled=true",
    "--set", "meshTls.certManager.enabled=true",
    "--set", "meshTls.certManager.issuerRef.name=mesh-ca",
)  # fmt: skip
MESH_FROM_SECRET = (
    *FROM_SECRET,
    "--set",
    "meshTls.enabled=true",
    "--set",
    "meshTls.existingSecret=mesh-cert",
)

# The part of cert-manager.io/v1 Certificate's CRD schema (cert-manager 1.x) for the fields the chart sets.
_USAGES = ["signing", "digital signature", "content commitment", "key encipherment", "key agreement",
           "data encipherment", "cert sign", "crl sign", "encipher only", "decipher only", "any",
           "server auth", "client auth", "code signing", "email protection", "s/mime", "ipsec end system",
           "ipsec tunnel", "ipsec user", "timestamping", "ocsp signing", "microsoft sgc", "netscape sgc"]  # fmt: skip
CERTIFICATE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "cert-manager.io/v1"},
        "kind": {"const": "Certificate"},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["issuerRef", "secretName"],
            "properties": {
                "secretName": {"type": "string", "minLength": 1},
                "duration": {"type": "string"},
                "renewBefore": {"type": "string"},
                "dnsNames": {"type": "array", "items": {"type": "string"}, "minItems": 1},
                "usages": {"type": "array", "items": {"enum": _USAGES}},
                "privateKey": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "algorithm": {"enum": ["RSA", "ECDSA", "Ed25519"]},
                        "size": {"type": "integer"},
                        "rotationPolicy": {"enum": ["Never", "Always"]},
                    },
                },
                "issuerRef": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["name"],
                    "properties": {
                        "name": {"type": "string", "minLength": 1},
                        "kind": {"type": "string"},
                        "group": {"type": "string"},
                    },
                },
            },
        },
    },
}


def _validate(text: str, tmp_path: Path, name: str) -> None:
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    proc = kubernetes_validate(path, *KUBE_VERSIONS)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    warnings = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("WARN")]
    assert all("kind Certificate " in w for w in warnings), warnings


def _workloads(docs: list[Manifest]) -> dict[str, Manifest]:
    return {
        d["metadata"]["labels"]["app.kubernetes.io/component"]: d
        for d in docs
        if d["kind"] in ("Deployment", "StatefulSet")
    }


def _env(w: Manifest) -> dict[str, str]:
    c = w["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e.get("value", "") for e in c["env"]}


def _volumes(w: Manifest) -> dict[str, Manifest]:
    return {v["name"]: v for v in w["spec"]["template"]["spec"]["volumes"]}


def test_public_gateway_without_tls_is_refused_unless_allow_plaintext(helm: Path) -> None:
    for args in (
        PUBLIC,
        ("--set", "gateway.service.type=NodePort"),
        ("--set", "gateway.ingress.enabled=true", "--set", "gateway.ingress.host=flynn.example.com"),
    ):
        proc = run_helm(helm, "template", "rel", str(CHART), *args)
        assert proc.returncode != 0, args
        assert "without TLS" in proc.stderr and "gateway.allowPlaintext" in proc.stderr, proc.stderr
    allowed = run_helm(helm, "template", "rel", str(CHART), *PUBLIC, "--set", "gateway.allowPlaintext=true")
    assert allowed.returncode == 0, allowed.stderr
    # In-cluster only (the default ClusterIP) needs no TLS: plaintext stays the default there.
    assert run_helm(helm, "template", "rel", str(CHART)).returncode == 0


def test_plaintext_public_gateway_validates_when_allowed(helm: Path, tmp_path: Path) -> None:
    _validate(render(helm, *PUBLIC, "--set", "gateway.allowPlaintext=true"), tmp_path, "plaintext")


def test_gateway_tls_from_an_existing_secret(helm: Path, tmp_path: Path) -> None:
    text = render(helm, *FROM_SECRET)
    _validate(text, tmp_path, "secret")
    docs = parse(text)
    assert not [d for d in docs if d["kind"] == "Certificate"]
    w = _workloads(docs)
    gw = _env(w["gateway"])
    assert gw["FLYNN_TLS_CERT_FILE"] == "/etc/flynn/tls/tls.crt"
    assert gw["FLYNN_TLS_KEY_FILE"] == "/etc/flynn/tls/tls.key"
    assert gw["FLYNN_REFLECTION_REQUIRES_TOKEN"] == "true"
    assert _volumes(w["gateway"])["tls"]["secret"]["secretName"] == "flynn-gateway-cert"
    # A Secret volume (not subPath), so a renewed certificate appears in place.
    mounts = w["gateway"]["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
    assert any(m["name"] == "tls" and "subPath" not in m for m in mounts)
    # Internal services stay plaintext without meshTls.
    assert "FLYNN_TLS_CERT_FILE" not in _env(w["queue"])
    console = next(
        d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"].endswith("-console")
    )
    assert _env(console)["FLYNN_TLS_CA_FILE"] == "/etc/flynn/gateway-tls/ca.crt"


def test_gateway_and_mesh_certificates_from_cert_manager(helm: Path, tmp_path: Path) -> None:
    text = render(helm, *CERT_MANAGER)
    _validate(text, tmp_path, "cert-manager")
    docs = parse(text)
    certs = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Certificate"}
    assert set(certs) == {"rel-flynn-gateway-tls", "rel-flynn-mesh-tls"}
    for cert in certs.values():
        jsonschema.validate(cert, CERTIFICATE_SCHEMA)
    edge = certs["rel-flynn-gateway-tls"]["spec"]
    assert edge["issuerRef"] == {"name": "edge-issuer", "kind": "ClusterIssuer", "group": "cert-manager.io"}
    assert edge["dnsNames"][0] == "flynn.example.com"
    assert "rel-flynn-gateway.flynn.svc" in edge["dnsNames"]
    mesh = certs["rel-flynn-mesh-tls"]["spec"]
    assert {"server auth", "client auth"} <= set(mesh["usages"])
    for name in topology.SERVICES:
        assert f"rel-flynn-{name}.flynn.svc.cluster.local" in mesh["dnsNames"], name
    w = _workloads(docs)
    assert _volumes(w["gateway"])["tls"]["secret"]["secretName"] == edge["secretName"]
    for name in topology.SERVICES:
        env = _env(w[name])
        assert env["FLYNN_TLS_CA_FILE"] == "/etc/flynn/mesh-tls/ca.crt", name
        assert _volumes(w[name])["mesh-tls"]["secret"]["secretName"] == mesh["secretName"], name
        assert env["FLYNN_LOCAL_LISTEN"].startswith("127.0.0.1:"), name
    # The gateway presents the mesh certificate to the services and its own to the public.
    gw = _env(w["gateway"])
    assert gw["FLYNN_TLS_CLIENT_CERT_FILE"] == "/etc/flynn/mesh-tls/tls.crt"
    assert gw["FLYNN_TLS_CERT_FILE"] == "/etc/flynn/tls/tls.crt"
    hook = next(d for d in docs if d["kind"] == "Pod")
    containers = {c["name"]: c for c in hook["spec"]["containers"]}
    assert set(containers) == {"healthcheck", "healthcheck-gateway"}
    assert {e["name"] for e in containers["healthcheck"]["env"]} >= {
        "FLYNN_HEALTHCHECK_CA_FILE",
        "FLYNN_HEALTHCHECK_CERT_FILE",
        "FLYNN_HEALTHCHECK_KEY_FILE",
    }


def test_mesh_tls_from_an_existing_secret_validates(helm: Path, tmp_path: Path) -> None:
    text = render(helm, *MESH_FROM_SECRET)
    _validate(text, tmp_path, "mesh-secret")
    w = _workloads(parse(text))
    for name in topology.SERVICES:
        assert _volumes(w[name])["mesh-tls"]["secret"]["secretName"] == "mesh-cert", name


def test_mesh_tls_needs_a_source_and_one_gateway_source_only(helm: Path) -> None:
    proc = run_helm(helm, "template", "rel", str(CHART), "--set", "meshTls.enabled=true")
    assert proc.returncode != 0 and "meshTls.existingSecret or meshTls.certManager.enabled" in proc.stderr
    both = run_helm(
        helm, "template", "rel", str(CHART), *FROM_SECRET,
        "--set", "gateway.tls.certManager.enabled=true", "--set", "gateway.tls.certManager.issuerRef.name=x",
    )  # fmt: skip
    assert both.returncode != 0 and "tls" in both.stderr
    no_issuer = run_helm(
        helm, "template", "rel", str(CHART), *PUBLIC, "--set", "gateway.tls.certManager.enabled=true"
    )
    assert no_issuer.returncode != 0 and "issuerRef" in no_issuer.stderr


def test_network_policy_is_on_by_default(helm: Path) -> None:
    docs = parse(render(helm))
    policies = {
        d["metadata"]["labels"]["app.kubernetes.io/component"] for d in docs if d["kind"] == "NetworkPolicy"
    }
    assert policies >= set(topology.SERVICES)
