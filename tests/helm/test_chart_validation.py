"""The chart through the real helm binary and kubernetes-validate: lint, render, schema checks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helm.conftest import CHART, DATABASE_VALUES, PRODUCTION_VALUES, ROOT, run_helm

# kubernetes-validate 1.37.0 ships schemas for 1.25 .. 1.37; the oldest and newest we support.
KUBE_VERSIONS = ("1.30.0", "1.35.0")
KUBERNETES_VALIDATE = Path(sys.executable).parent / "kubernetes-validate"


def kubernetes_validate(path: Path, *versions: str) -> subprocess.CompletedProcess[str]:
    args = [str(KUBERNETES_VALIDATE), "--strict"]
    for v in versions:
        args += ["-k", v]
    return subprocess.run([*args, str(path)], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    "values", [None, PRODUCTION_VALUES, DATABASE_VALUES], ids=["default", "production", "database"]
)
def test_helm_lint_strict(helm: Path, values: Path | None) -> None:
    args = ["lint", "--strict", str(CHART)]
    if values is not None:
        args += ["-f", str(values)]
    proc = run_helm(helm, *args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 chart(s) failed" in proc.stdout


@pytest.mark.parametrize("which", ["default", "production", "database"])
def test_rendered_manifests_validate_strictly(
    which: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    text: str = request.getfixturevalue(f"{which}_text")
    path = tmp_path / f"{which}.yaml"
    path.write_text(text)
    proc = kubernetes_validate(path, *KUBE_VERSIONS)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # Every resource is checked against a schema, except the CRDs of the Prometheus Operator and of
    # cert-manager (tests/helm/test_tls_chart.py checks the Certificates against cert-manager's schema).
    warnings = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("WARN")]
    assert all(
        "ServiceMonitor" in w or "PrometheusRule" in w or "kind Certificate " in w for w in warnings
    ), warnings
    if which == "production":
        # production values render one of each CRD kind: ServiceMonitor, PrometheusRule, Certificate
        crd_kinds = ("ServiceMonitor", "PrometheusRule", "kind Certificate ")
        assert all(sum(k in w for w in warnings) == len(KUBE_VERSIONS) for k in crd_kinds), warnings
        assert len(warnings) == len(crd_kinds) * len(KUBE_VERSIONS), warnings


def test_validator_is_not_vacuous(tmp_path: Path, default_text: str) -> None:
    """The same validation rejects a manifest with a misspelt field, for both Kubernetes versions."""
    broken = default_text.replace("readOnlyRootFilesystem: true", "readOnlyRootFileSystem: true", 1)
    assert broken != default_text
    path = tmp_path / "broken.yaml"
    path.write_text(broken)
    for version in KUBE_VERSIONS:
        proc = kubernetes_validate(path, version)
        assert proc.returncode != 0, f"{version}: {proc.stdout}"
        assert "readOnlyRootFileSystem" in proc.stdout + proc.stderr


BROKEN_VALUES = {
    "string replica count": ('gateway:\n  replicas: "three"\n', "/gateway/replicas"),
    "unknown top-level key": ("replicaCount: 3\n", "replicaCount"),
    "unknown nested key": ("queue:\n  replicas: 3\n", "replicas"),
    "wrong enum": ("gateway:\n  service:\n    type: ExternalName\n", "/gateway/service/type"),
    "negative port": ("voice:\n  grpcPort: -1\n", "/voice/grpcPort"),
    "bad token hash": (
        "auth:\n  extraTokens:\n    - {name: tg, role: channel, sha256: not-a-hash}\n",
        "/auth/extraTokens/0/sha256",
    ),
    "bad trusted proxy": ("trustedProxies: [evil.example.com]\n", "/trustedProxies/0"),
    "negative session cap": ("queue:\n  maxSessionsPerPrincipal: -1\n", "/queue/maxSessionsPerPrincipal"),
    "existing tokens without service token": (
        "auth:\n  existingTokensSecret: mine\n",
        "existingServiceTokenSecret",
    ),
    "console exposed by Service type": (
        "console:\n  service:\n    type: LoadBalancer\n",
        "type",
    ),
    "console replicas": ("console:\n  replicas: 2\n", "replicas"),
    "string console switch": ('console:\n  secureCookie: "yes"\n', "/console/secureCookie"),
    "env that is not a Flynn setting": (
        "queue:\n  extraEnv:\n    - {name: PATH, value: /x}\n",
        "/queue/extraEnv/0/name",
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN_VALUES))
def test_schema_rejects_broken_values(helm: Path, tmp_path: Path, case: str) -> None:
    text, where = BROKEN_VALUES[case]
    values = tmp_path / "broken.yaml"
    values.write_text(text)
    for cmd in (["template", "rel", str(CHART)], ["lint", "--strict", str(CHART)]):
        proc = run_helm(helm, *cmd, "-f", str(values))
        out = proc.stdout + proc.stderr
        assert proc.returncode != 0, f"{cmd[0]} accepted {case}"
        assert "schema" in out and where in out, out


def test_schema_rejects_string_replicas_via_set(helm: Path) -> None:
    proc = run_helm(helm, "template", "rel", str(CHART), "--set-string", "voice.replicas=2")
    assert proc.returncode != 0
    assert "/voice/replicas" in proc.stderr and "want integer" in proc.stderr


def test_helm_installer_is_idempotent(helm: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "install_helm.py")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip()) == helm
    version = run_helm(helm, "version", "--short")
    assert version.stdout.startswith("v"), version


def test_chart_refuses_kubernetes_older_than_validated(helm: Path) -> None:
    old = run_helm(helm, "template", "rel", str(CHART), "--kube-version", "1.29.0")
    assert old.returncode != 0 and "kubeVersion" in old.stderr
    for version in KUBE_VERSIONS:
        assert run_helm(helm, "template", "rel", str(CHART), "--kube-version", version).returncode == 0


def test_ingress_variant_validates_strictly(helm: Path, tmp_path: Path) -> None:
    proc = run_helm(
        helm, "template", "rel", str(CHART),
        "--set", "gateway.ingress.enabled=true", "--set", "gateway.ingress.host=flynn.example.com",
        "--set", "gateway.ingress.tlsSecretName=flynn-tls", "--set", "networkPolicy.enabled=true",
        "--set", "console.ingress.enabled=true", "--set", "console.ingress.host=console.example.com",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    path = tmp_path / "ingress.yaml"
    path.write_text(proc.stdout)
    result = kubernetes_validate(path, *KUBE_VERSIONS)
    assert result.returncode == 0, result.stdout + result.stderr


def test_schema_closes_every_object_it_describes() -> None:
    """draft-07, and every object with declared properties rejects unknown keys."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    open_objects: list[str] = []

    def walk(node: object, path: str) -> None:
        if isinstance(node, dict):
            # if/then/not only narrow keys declared beside them, so they stay open.
            if "properties" in node and node.get("additionalProperties") is not False:
                narrowing = (
                    "/properties/auth/if",
                    "/properties/auth/then",
                    "/properties/database/if",
                    "/properties/database/then",
                    "/definitions/certManager/if",
                    "/definitions/certManager/then",
                    "/properties/gateway/properties/tls/not",
                    "/allOf/0/if",
                    "/allOf/0/then",
                )
                if not path.startswith(narrowing):
                    open_objects.append(path or "/")
            for key, value in node.items():
                walk(value, f"{path}/{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{path}/{i}")

    walk(schema, "")
    assert open_objects == []
    # Every top-level key of values.yaml is described, and nothing else is allowed.
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert set(values) <= set(schema["properties"])
