"""values.tracing: the OTEL_* environment of every service, strictly valid; nothing when off."""

from __future__ import annotations

from pathlib import Path

import yaml

from tests.helm.conftest import CHART, run_helm
from tests.helm.test_chart_validation import KUBE_VERSIONS, kubernetes_validate

SERVICES = {"config", "queue", "reactions", "nodes", "voice", "gateway"}


def _env_by_component(text: str) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for doc in yaml.safe_load_all(text):
        if not doc or doc.get("kind") not in ("Deployment", "StatefulSet"):
            continue
        for c in doc["spec"]["template"]["spec"]["containers"]:
            out[c["name"]] = {e["name"]: e.get("value", "") for e in c.get("env", [])}
    return out


def test_tracing_values_set_the_otel_environment_of_every_service(helm: Path, tmp_path: Path) -> None:
    proc = run_helm(
        helm, "template", "rel", str(CHART), "--namespace", "flynn",
        "--set", "tracing.enabled=true", "--set", "tracing.otlpEndpoint=http://otel-collector.observability:4317",
        "--set", "tracing.samplerArg=0.25", "--set", "tracing.captureContent=true",
        "--set", "tracing.resourceAttributes=deployment.environment=canary",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    env = _env_by_component(proc.stdout)
    assert SERVICES <= set(env)
    for name in SERVICES:
        e = env[name]
        assert e["OTEL_TRACES_EXPORTER"] == "otlp"
        assert e["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector.observability:4317"
        assert (
            e["OTEL_TRACES_SAMPLER"] == "parentbased_traceidratio" and e["OTEL_TRACES_SAMPLER_ARG"] == "0.25"
        )
        assert e["OTEL_SERVICE_NAME"] == f"flynn-{name}"
        assert e["OTEL_RESOURCE_ATTRIBUTES"] == (
            "service.namespace=flynn,service.instance.id=$(FLYNN_INSTANCE_ID),deployment.environment=canary"
        )
        assert e["OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"] == "true"
        names = list(e)  # $(FLYNN_INSTANCE_ID) expands only when defined earlier in the list
        assert names.index("FLYNN_INSTANCE_ID") < names.index("OTEL_RESOURCE_ATTRIBUTES")
    path = tmp_path / "tracing.yaml"
    path.write_text(proc.stdout)
    result = kubernetes_validate(path, *KUBE_VERSIONS)
    assert result.returncode == 0, result.stdout + result.stderr


def test_tracing_off_by_default_sets_nothing(helm: Path) -> None:
    proc = run_helm(helm, "template", "rel", str(CHART))
    assert proc.returncode == 0, proc.stderr
    assert "OTEL_" not in proc.stdout


def test_tracing_on_without_an_endpoint_is_refused(helm: Path) -> None:
    proc = run_helm(helm, "template", "rel", str(CHART), "--set", "tracing.enabled=true")
    assert proc.returncode != 0 and "tracing.otlpEndpoint" in proc.stderr
    bad = run_helm(helm, "template", "rel", str(CHART), "--set", "tracing.samplerArg=2")
    assert bad.returncode != 0 and "samplerArg" in bad.stderr
