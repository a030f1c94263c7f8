"""The chart with and without `database`: PostgreSQL settings reach exactly the stateful services, and
with a database they need no PersistentVolumeClaim; the schema refuses a half-configured database."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.helm.conftest import CHART, Manifest, parse, render, run_helm

STATEFUL = {"config", "queue", "reactions", "nodes"}


def _workloads(docs: list[Manifest]) -> dict[str, Manifest]:
    return {
        d["metadata"]["labels"]["app.kubernetes.io/component"]: d
        for d in docs
        if d["kind"] in ("StatefulSet", "Deployment")
        and d["metadata"]["labels"].get("app.kubernetes.io/component") not in (None, "console")
    }


def _env(workload: Manifest) -> dict[str, Any]:
    container = workload["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def test_default_keeps_sqlite_on_volumes(default_docs: list[Manifest]) -> None:
    w = _workloads(default_docs)
    assert STATEFUL <= set(w)
    for name in STATEFUL:
        assert w[name]["kind"] == "StatefulSet" and w[name]["spec"]["volumeClaimTemplates"]
        assert "FLYNN_DATABASE_URL" not in _env(w[name])


def test_database_from_a_secret_needs_no_volume(database_text: str) -> None:
    w = _workloads(parse(database_text))
    for name, workload in w.items():
        env = _env(workload)
        if name not in STATEFUL:
            assert "FLYNN_DATABASE_URL" not in env, name
            continue
        assert "volumeClaimTemplates" not in workload["spec"], name
        assert env["FLYNN_DATABASE_URL"] == {"secretKeyRef": {"name": "flynn-db-app", "key": "uri"}}
        assert env["FLYNN_DATABASE_PASSWORD_FILE"] == "/etc/flynn/database/password"
        pod = workload["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert "emptyDir" in volumes["data"]
        assert volumes["database"]["secret"] == {
            "secretName": "flynn-db-app",
            "defaultMode": 0o440,
            "items": [{"key": "password", "path": "password"}],
        }
        mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
        assert mounts["database"] == {
            "name": "database",
            "mountPath": "/etc/flynn/database",
            "readOnly": True,
        }


def test_database_url_with_a_password_secret(helm: Path) -> None:
    url = "postgresql://flynn@db.example:5432/flynn?sslmode=require"
    text = render(helm, "--set", f"database.url={url}", "--set", "database.existingSecret=flynn-db")
    w = _workloads(parse(text))
    for name in STATEFUL:
        env = _env(w[name])
        assert env["FLYNN_DATABASE_URL"] == url
        assert env["FLYNN_DATABASE_PASSWORD_FILE"] == "/etc/flynn/database/password"
        assert "volumeClaimTemplates" not in w[name]["spec"]


@pytest.mark.parametrize(
    ("args", "expect"),
    [
        (["--set", "database.urlKey=uri"], "existingSecret"),
        (["--set", "database.url=mysql://u@h/db"], "does not match"),
        (["--set", "database.url=postgresql://u:secret@h/db"], "does not match"),
        (["--set", "database.bogus=1"], "bogus"),
    ],
)
def test_schema_refuses_a_bad_database(helm: Path, args: list[str], expect: str) -> None:
    proc = run_helm(helm, "template", "rel", str(CHART), *args)
    assert proc.returncode != 0 and expect in proc.stderr, proc.stderr


def test_database_allows_replicas_with_pdb_and_round_robin_routing(database_text: str) -> None:
    docs = parse(database_text)
    w = _workloads(docs)
    want = {"config": 2, "queue": 3, "reactions": 2, "nodes": 2}  # charts/flynn/ci/database-values.yaml
    for name, n in want.items():
        assert w[name]["kind"] == "StatefulSet" and w[name]["spec"]["replicas"] == n, name
        assert w[name]["spec"]["podManagementPolicy"] == "Parallel", name
        env = _env(w[name])
        # Replicas forward to each other at the pod IP.
        assert env["POD_IP"] == {"fieldRef": {"fieldPath": "status.podIP"}}
        assert env["FLYNN_ADVERTISE_ADDRESS"].startswith("$(POD_IP):")
    pdbs = {
        d["metadata"]["labels"]["app.kubernetes.io/component"]: d
        for d in docs
        if d["kind"] == "PodDisruptionBudget"
    }
    for name in want:
        assert pdbs[name]["spec"]["maxUnavailable"] == 1, name
    headless = {
        d["metadata"]["labels"]["app.kubernetes.io/component"]: d
        for d in docs
        if d["kind"] == "Service" and d["metadata"]["name"].endswith("-headless")
    }
    for name in want:
        # Round-robin callers must only see ready replicas.
        assert headless[name]["spec"]["publishNotReadyAddresses"] is False, name
    # Every caller reaches the stateful services through their headless Service, spread per call.
    gw = _env(w["gateway"])
    for name in want:
        assert gw[f"FLYNN_{name.upper()}_ADDR"].startswith(f"dns:///rel-flynn-{name}-headless."), gw
    assert not gw["FLYNN_VOICE_ADDR"].startswith("dns:///")


def test_default_keeps_one_replica_and_no_stateful_pdb(default_docs: list[Manifest]) -> None:
    w = _workloads(default_docs)
    for name in STATEFUL:
        assert w[name]["spec"]["replicas"] == 1
        assert not _env(w[name]).get("FLYNN_ADVERTISE_ADDRESS")
    pdbs = {
        d["metadata"]["labels"]["app.kubernetes.io/component"]
        for d in default_docs
        if d["kind"] == "PodDisruptionBudget"
    }
    assert not pdbs & STATEFUL


@pytest.mark.parametrize("name", sorted(STATEFUL))
def test_schema_refuses_replicas_without_a_database(helm: Path, name: str) -> None:
    proc = run_helm(helm, "template", "rel", str(CHART), "--set", f"{name}.replicas=2")
    assert proc.returncode != 0 and f"/{name}/replicas" in proc.stderr, proc.stderr
    ok = run_helm(
        helm, "template", "rel", str(CHART), "--set", f"{name}.replicas=2",
        "--set", "database.url=postgresql://flynn@db:5432/flynn",
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr


def test_console_keeps_sessions_in_the_database_and_may_run_replicas(database_text: str) -> None:
    docs = parse(database_text)
    console = next(
        d
        for d in docs
        if d["kind"] == "Deployment" and d["metadata"]["labels"]["app.kubernetes.io/component"] == "console"
    )
    assert console["spec"]["replicas"] == 2  # charts/flynn/ci/database-values.yaml
    env = _env(console)
    assert env["FLYNN_DATABASE_URL"] == {"secretKeyRef": {"name": "flynn-db-app", "key": "uri"}}
    assert env["FLYNN_DATABASE_PASSWORD_FILE"] == "/etc/flynn/database/password"
    pod = console["spec"]["template"]["spec"]
    assert {v["name"] for v in pod["volumes"]} >= {"database", "data", "tmp"}


def test_schema_refuses_console_replicas_without_a_database(helm: Path) -> None:
    proc = run_helm(helm, "template", "rel", str(CHART), "--set", "console.replicas=2")
    assert proc.returncode != 0 and "/console/replicas" in proc.stderr, proc.stderr
