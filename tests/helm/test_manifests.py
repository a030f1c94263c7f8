"""Assertions on the rendered manifests (default and production values), cross-checked with the code."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from flynn_runtime import auth, config_yaml, settings, topology
from tests.helm.conftest import CHART, Manifest, parse, render, run_helm

STATEFUL = {n for n, s in topology.SERVICES.items() if s.stateful}
STATELESS = set(topology.SERVICES) - STATEFUL


def by_kind(docs: list[Manifest], kind: str) -> list[Manifest]:
    return [d for d in docs if d["kind"] == kind]


def named(docs: list[Manifest], kind: str, name: str) -> Manifest:
    found = [d for d in by_kind(docs, kind) if d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


CONSOLE = "console"  # the operator web console: an HTTP process, not a gRPC service of topology


def component(d: Manifest) -> str:
    return str(d["metadata"]["labels"]["app.kubernetes.io/component"])


def workloads(docs: list[Manifest]) -> dict[str, Manifest]:
    """gRPC service name (topology.SERVICES) -> its StatefulSet or Deployment."""
    out: dict[str, Manifest] = {}
    for d in docs:
        if d["kind"] in ("StatefulSet", "Deployment") and component(d) in topology.SERVICES:
            out[component(d)] = d
    return out


def console_workload(docs: list[Manifest]) -> Manifest:
    (found,) = [d for d in docs if d["kind"] == "Deployment" and component(d) == CONSOLE]
    return found


def pod_specs(docs: list[Manifest]) -> Iterator[tuple[str, dict[str, Any]]]:
    for d in docs:
        if d["kind"] in ("StatefulSet", "Deployment", "DaemonSet", "Job"):
            yield f"{d['kind']}/{d['metadata']['name']}", d["spec"]["template"]["spec"]
        elif d["kind"] == "Pod":
            yield f"Pod/{d['metadata']['name']}", d["spec"]


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "<valueFrom>") for e in container.get("env", [])}


def main_container(workload: Manifest) -> dict[str, Any]:
    containers = workload["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    container: dict[str, Any] = containers[0]
    return container


def test_every_service_is_deployed_with_the_right_kind(rendered: list[Manifest]) -> None:
    w = workloads(rendered)
    assert set(w) == set(topology.SERVICES)
    every = {component(d) for d in rendered if d["kind"] in ("StatefulSet", "Deployment", "DaemonSet")}
    assert every == set(topology.SERVICES) | {CONSOLE}
    for name in STATEFUL:
        assert w[name]["kind"] == "StatefulSet", name
        assert w[name]["spec"]["replicas"] == 1, (
            "without a database: one replica of each stateful service (SCALING.md)"
        )
    for name in STATELESS:
        assert w[name]["kind"] == "Deployment", name
        assert w[name]["spec"]["replicas"] >= 2, name


def test_container_runs_the_services_console_script(rendered: list[Manifest]) -> None:
    for name, w in workloads(rendered).items():
        c = main_container(w)
        assert "command" not in c, "the image's tini entrypoint must stay PID 1"
        assert c["args"] == [topology.SERVICES[name].console_script]


def test_probes_hit_the_grpc_port_and_health_name(rendered: list[Manifest]) -> None:
    for name, w in workloads(rendered).items():
        c = main_container(w)
        env = env_of(c)
        listen_port = int(env["FLYNN_LISTEN"].rpartition(":")[2])
        assert env["FLYNN_LISTEN"].startswith("0.0.0.0:"), "kubelet probes reach the pod IP"
        grpc_port = {p["name"]: p["containerPort"] for p in c["ports"]}["grpc"]
        assert grpc_port == listen_port
        local = env.get("FLYNN_LOCAL_LISTEN")
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            if local is None:
                spec = c[probe]["grpc"]
                assert spec["port"] == listen_port, (name, probe)
                service = spec["service"]
            else:
                # TLS on the port: the kubelet's gRPC probe has no TLS, so flynn-healthcheck probes the
                # process's loopback-only plaintext port from inside the pod.
                assert local.startswith("127.0.0.1:") and "FLYNN_TLS_CERT_FILE" in env, name
                cmd = c[probe]["exec"]["command"]
                assert cmd[0] == "flynn-healthcheck" and cmd[-1].startswith(f"{local}/"), (name, cmd)
                service = cmd[-1].partition("/")[2]
            assert service in topology.SERVICES[name].grpc_services, (name, probe)
            assert service == topology.SERVICES[name].grpc_services[0]


def test_default_ports_match_the_settings_defaults(default_docs: list[Manifest]) -> None:
    for name, w in workloads(default_docs).items():
        port = int(env_of(main_container(w))["FLYNN_LISTEN"].rpartition(":")[2])
        assert port == settings.DEFAULT_PORTS[name]


def test_termination_grace_exceeds_the_service_grace(rendered: list[Manifest]) -> None:
    for name, w in workloads(rendered).items():
        grace = float(env_of(main_container(w))["FLYNN_GRACE_SECONDS"])
        # The shutdown bounds the stop hook, server.stop and close by the grace each (server.py).
        assert w["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > 3 * grace, name


def test_stateful_services_keep_their_data_on_a_pvc(rendered: list[Manifest]) -> None:
    w = workloads(rendered)
    for name in STATEFUL:
        sts = w[name]
        claims = {t["metadata"]["name"]: t for t in sts["spec"]["volumeClaimTemplates"]}
        assert "data" in claims, name
        assert claims["data"]["spec"]["resources"]["requests"]["storage"]
        c = main_container(sts)
        mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
        assert mounts["data"] == env_of(c)["FLYNN_DATA_DIR"] == "/data"
        pod_volumes = {v["name"] for v in sts["spec"]["template"]["spec"].get("volumes", [])}
        assert "data" not in pod_volumes, "the PVC, not a pod volume, must back /data"
        headless = named(rendered, "Service", sts["spec"]["serviceName"])
        assert headless["spec"]["clusterIP"] == "None"
    for name in STATELESS:
        volumes = {v["name"]: v for v in w[name]["spec"]["template"]["spec"]["volumes"]}
        assert "emptyDir" in volumes["data"], name


def test_stateless_services_have_a_disruption_budget(rendered: list[Manifest]) -> None:
    w = workloads(rendered)
    pdbs = by_kind(rendered, "PodDisruptionBudget")
    for name in STATELESS:
        labels = w[name]["spec"]["template"]["metadata"]["labels"]
        matching = [p for p in pdbs if p["spec"]["selector"]["matchLabels"].items() <= labels.items()]
        assert len(matching) == 1, name
        assert w[name]["spec"]["selector"]["matchLabels"] == matching[0]["spec"]["selector"]["matchLabels"]
        anti = w[name]["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
        assert anti["preferredDuringSchedulingIgnoredDuringExecution"], "replicas should spread over nodes"


def test_no_container_runs_as_root(rendered: list[Manifest]) -> None:
    specs = list(pod_specs(rendered))
    assert any(k.startswith("Pod/") for k, _ in specs), "the helm test hook pod is checked too"
    for where, spec in specs:
        psc = spec["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["runAsUser"] != 0, where
        assert psc["seccompProfile"]["type"] == "RuntimeDefault", where
        assert spec["automountServiceAccountToken"] is False, where
        tmp_volumes = {v["name"] for v in spec["volumes"] if "emptyDir" in v}
        for c in spec["containers"] + spec.get("initContainers", []):
            sc = c["securityContext"]
            assert sc["runAsNonRoot"] is True and sc.get("runAsUser", psc["runAsUser"]) != 0, where
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add"), where
            assert sc.get("privileged", False) is False, where
            tmp = [m for m in c["volumeMounts"] if m["mountPath"] == "/tmp"]
            assert tmp and tmp[0]["name"] in tmp_volumes, f"{where}: /tmp must be a writable emptyDir"
            for m in c["volumeMounts"]:
                if m["mountPath"] not in ("/tmp", "/data"):
                    assert m.get("readOnly") is True, f"{where}: {m['mountPath']} writable"
            assert c["resources"].get("limits", {}).get("memory"), where


def test_every_grpc_service_port_is_marked_grpc(rendered: list[Manifest]) -> None:
    for svc in by_kind(rendered, "Service"):
        for port in svc["spec"]["ports"]:
            if port["name"] == "grpc":
                assert port["appProtocol"] == "grpc", svc["metadata"]["name"]


def exposed(docs: list[Manifest]) -> set[str]:
    """Components reachable from outside the cluster (Service type, Ingress, Gateway API routes)."""
    out = {
        s["metadata"]["labels"]["app.kubernetes.io/component"]
        for s in by_kind(docs, "Service")
        if s["spec"].get("type", "ClusterIP") in ("NodePort", "LoadBalancer")
        or s["spec"].get("externalIPs")
        or s["spec"].get("type") == "ExternalName"
    }
    services = {s["metadata"]["name"]: s for s in by_kind(docs, "Service")}
    for ing in by_kind(docs, "Ingress"):
        backends = [p["backend"]["service"]["name"] for r in ing["spec"]["rules"] for p in r["http"]["paths"]]
        if "defaultBackend" in ing["spec"]:
            backends.append(ing["spec"]["defaultBackend"]["service"]["name"])
        out |= {services[b]["metadata"]["labels"]["app.kubernetes.io/component"] for b in backends}
    for kind in ("GRPCRoute", "HTTPRoute", "TLSRoute", "TCPRoute"):
        out |= {f"{kind}:" + d["metadata"]["name"] for d in by_kind(docs, kind)}
    return out


def test_only_the_gateway_and_the_console_are_exposed(
    default_docs: list[Manifest], production_docs: list[Manifest]
) -> None:
    """Only the gateway (the mesh's door) and the console (an operator UI, through its own Ingress,
    enabled explicitly: production values do) may be reachable from outside."""
    assert exposed(default_docs) == set()
    assert exposed(production_docs) == {"gateway", CONSOLE}
    for docs in (default_docs, production_docs):
        for svc in by_kind(docs, "Service"):
            if svc["metadata"]["labels"]["app.kubernetes.io/component"] != "gateway":
                assert svc["spec"]["type"] == "ClusterIP", svc["metadata"]["name"]


def test_gateway_ingress_targets_only_the_gateway(helm: Path) -> None:
    docs = parse(
        render(
            helm,
            "--set", "gateway.ingress.enabled=true", "--set", "gateway.ingress.host=flynn.example.com",
            "--set", "gateway.ingress.className=nginx", "--set", "gateway.ingress.tlsSecretName=flynn-tls",
        )
    )  # fmt: skip
    (ingress,) = by_kind(docs, "Ingress")
    assert exposed(docs) == {"gateway"}
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend["port"] == {"name": "grpc"}
    gateway_svc = named(docs, "Service", backend["name"])
    assert gateway_svc["metadata"]["labels"]["app.kubernetes.io/component"] == "gateway"
    assert ingress["spec"]["tls"] == [{"hosts": ["flynn.example.com"], "secretName": "flynn-tls"}]
    missing_host = run_helm(helm, "template", "rel", str(CHART), "--set", "gateway.ingress.enabled=true")
    assert missing_host.returncode != 0 and "gateway.ingress.host is required" in missing_host.stderr


def test_addresses_point_at_the_right_services(rendered: list[Manifest]) -> None:
    services = {s["metadata"]["name"]: s for s in by_kind(rendered, "Service")}
    w = workloads(rendered)
    for name, workload in w.items():
        env = env_of(main_container(workload))
        namespace = workload["metadata"]["namespace"]
        for backend in settings.BACKENDS:
            host, _, port = env[f"FLYNN_{backend.upper()}_ADDR"].rpartition(":")
            svc_name, ns, svc_word, *_ = host.split(".")
            assert (ns, svc_word) == (namespace, "svc"), host
            svc = services[svc_name]
            assert svc["spec"]["selector"] == w[backend]["spec"]["selector"]["matchLabels"], (name, backend)
            grpc_port = {p["name"]: p["port"] for p in svc["spec"]["ports"]}["grpc"]
            assert int(port) == grpc_port
            target = int(env_of(main_container(w[backend]))["FLYNN_LISTEN"].rpartition(":")[2])
            assert (
                target == {p["name"]: p["containerPort"] for p in main_container(w[backend])["ports"]}["grpc"]
            )


def _secret_data(secret: Manifest) -> dict[str, str]:
    out = {k: base64.b64decode(v).decode() for k, v in secret.get("data", {}).items()}
    out.update(secret.get("stringData", {}))
    return out


def test_generated_tokens_file_authenticates_the_generated_tokens(
    default_docs: list[Manifest], tmp_path: Path
) -> None:
    w = workloads(default_docs)
    spec = w["queue"]["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    env = env_of(main_container(w["queue"]))
    tokens_secret = named(default_docs, "Secret", volumes["tokens"]["secret"]["secretName"])
    cred_secret = named(default_docs, "Secret", volumes["service-token"]["secret"]["secretName"])
    assert cred_secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    # The files land where the env vars say.
    mounts = {m["name"]: m["mountPath"] for m in main_container(w["queue"])["volumeMounts"]}
    tokens_item = volumes["tokens"]["secret"]["items"][0]
    assert f"{mounts['tokens']}/{tokens_item['path']}" == env["FLYNN_TOKENS_FILE"]
    token_item = volumes["service-token"]["secret"]["items"][0]
    assert f"{mounts['service-token']}/{token_item['path']}" == env["FLYNN_SERVICE_TOKEN_FILE"]
    # The runtime's own TokenStore reads the rendered file and maps the plaintext tokens to roles.
    path = tmp_path / "tokens.yaml"
    path.write_text(_secret_data(tokens_secret)[tokens_item["key"]])
    store = auth.TokenStore(path)
    creds = _secret_data(cred_secret)
    service = store.lookup(creds[token_item["key"]])
    operator = store.lookup(creds["operator-token"])
    assert service is not None and service.role is auth.Role.SERVICE and service.name == "queue"
    assert service.may_call("/flynn.v1.Voice/Synthesize") and not service.may_call(
        "/flynn.v1.Nodes/InvokeNode"
    )
    assert operator is not None and operator.role is auth.Role.OPERATOR and operator.name == "admin"
    # every service has its own credential, and the agent's grants nothing
    names = {p.name for p in store.file_principals() if p.role is auth.Role.SERVICE}
    assert names == set(auth.SERVICE_SCOPES)
    assert len({creds[f"service-{n}-token"] for n in names}) == len(names)
    agent = store.lookup(creds["agent-token"])
    assert agent is not None and agent.role is auth.Role.AGENT
    agent_item = volumes["service-token"]["secret"]["items"][1]
    assert agent_item["key"] == "agent-token"
    assert f"{mounts['service-token']}/{agent_item['path']}" == env["FLYNN_AGENT_TOKEN_FILE"]
    assert "sha256" in path.read_text() and creds["operator-token"] not in path.read_text()


def test_existing_secrets_are_referenced_not_generated(production_docs: list[Manifest]) -> None:
    assert by_kind(production_docs, "Secret") == []
    for name, w in workloads(production_docs).items():
        volumes = {v["name"]: v for v in w["spec"]["template"]["spec"]["volumes"]}
        assert volumes["tokens"]["secret"]["secretName"] == "flynn-tokens-managed", name
        assert volumes["service-token"]["secret"]["secretName"] == "flynn-service-token-managed", name
        items = [{"key": name, "path": "token"}]
        if name == "queue":
            items.append({"key": "agent", "path": "agent"})
        assert volumes["service-token"]["secret"]["items"] == items, name


def test_seed_config_is_mounted_for_the_config_service_and_parses(rendered: list[Manifest]) -> None:
    from config_svc.validation import validate_config

    w = workloads(rendered)
    config = main_container(w["config"])
    seed_path = env_of(config)["FLYNN_SEED_FILE"]
    volumes = {v["name"]: v for v in w["config"]["spec"]["template"]["spec"]["volumes"]}
    mount = next(m for m in config["volumeMounts"] if seed_path.startswith(m["mountPath"] + "/"))
    cm_ref = volumes[mount["name"]]["configMap"]
    item = next(i for i in cm_ref["items"] if f"{mount['mountPath']}/{i['path']}" == seed_path)
    cm = named(rendered, "ConfigMap", cm_ref["name"])
    text = cm["data"][item["key"]]
    assert yaml.safe_load(text)
    cfg = config_yaml.yaml_to_config(text)
    assert validate_config(cfg) == []
    for name in set(topology.SERVICES) - {"config"}:
        assert "FLYNN_SEED_FILE" not in env_of(main_container(w[name]))


def test_helm_test_hook_checks_every_health_name(rendered: list[Manifest]) -> None:
    pods = [p for p in by_kind(rendered, "Pod") if p["metadata"]["annotations"].get("helm.sh/hook") == "test"]
    assert len(pods) == 1
    targets = set()
    # One container per trust: the mesh's services, and a gateway serving its own certificate.
    for container in pods[0]["spec"]["containers"]:
        args = container["args"]
        assert args[0] == "flynn-healthcheck"
        targets |= {a for a in args[1:] if "/" in a}
    w = workloads(rendered)
    expected = set()
    for name, info in topology.SERVICES.items():
        addr = env_of(main_container(w["queue"]))[f"FLYNN_{name.upper()}_ADDR"] if name != "gateway" else None
        if addr is None:
            svc = next(
                s
                for s in by_kind(rendered, "Service")
                if s["metadata"]["labels"]["app.kubernetes.io/component"] == "gateway"
            )
            ns = svc["metadata"]["namespace"]
            port = {p["name"]: p["port"] for p in svc["spec"]["ports"]}["grpc"]
            addr = f"{svc['metadata']['name']}.{ns}.svc.cluster.local:{port}"
        expected |= {f"{addr}/{s}" for s in ("", *info.grpc_services)}
    assert targets == expected


def test_network_policy_lets_only_the_gateway_and_console_in_from_outside(
    production_docs: list[Manifest],
) -> None:
    policies = {
        p["metadata"]["labels"]["app.kubernetes.io/component"]: p
        for p in by_kind(production_docs, "NetworkPolicy")
    }
    assert set(policies) == set(topology.SERVICES) | {CONSOLE}
    release = {"app.kubernetes.io/instance": "flynn", "app.kubernetes.io/name": "flynn"}
    # The console: its HTTP port only, from networkPolicy.consoleFrom (the ingress controller).
    console = policies.pop(CONSOLE)
    assert console["spec"]["policyTypes"] == ["Ingress"]
    assert (
        console["spec"]["podSelector"]["matchLabels"]
        == (console_workload(production_docs)["spec"]["selector"]["matchLabels"])
    )
    values = yaml.safe_load((CHART / "ci" / "production-values.yaml").read_text())
    assert console["spec"]["ingress"] == [
        {"ports": [{"port": "http", "protocol": "TCP"}], "from": values["networkPolicy"]["consoleFrom"]}
    ]
    for name, policy in policies.items():
        assert policy["spec"]["policyTypes"] == ["Ingress"]
        grpc_open_to: list[Any] = []
        for rule in policy["spec"]["ingress"]:
            ports = {p["port"] for p in rule["ports"]}
            sources = rule.get("from")
            if "grpc" in ports:
                grpc_open_to.append(sources)
            if sources != [{"podSelector": {"matchLabels": release}}]:
                assert name == "gateway" or ports == {"metrics"}, (name, rule)
        if name == "gateway":
            assert any(s and "ipBlock" in s[0] for s in grpc_open_to)
        else:
            assert grpc_open_to == [[{"podSelector": {"matchLabels": release}}]], name


def test_service_monitor_scrapes_every_component_once(
    production_docs: list[Manifest], default_docs: list[Manifest]
) -> None:
    assert by_kind(default_docs, "ServiceMonitor") == []
    (sm,) = by_kind(production_docs, "ServiceMonitor")
    selector = sm["spec"]["selector"]["matchLabels"]
    scraped = [
        s for s in by_kind(production_docs, "Service") if selector.items() <= s["metadata"]["labels"].items()
    ]
    assert sorted(s["metadata"]["labels"]["app.kubernetes.io/component"] for s in scraped) == sorted(
        topology.SERVICES
    )
    for s in scraped:
        assert "metrics" in {p["name"] for p in s["spec"]["ports"]}
    assert sm["spec"]["endpoints"][0]["port"] == "metrics"


@pytest.mark.parametrize("name", sorted(topology.SERVICES))
def test_metrics_listen_matches_the_metrics_port(rendered: list[Manifest], name: str) -> None:
    c = main_container(workloads(rendered)[name])
    port = {p["name"]: p["containerPort"] for p in c["ports"]}["metrics"]
    assert env_of(c)["FLYNN_METRICS_LISTEN"] == f"0.0.0.0:{port}"


# --- the operator console ---------------------------------------------------------------------


def test_console_runs_flynn_console_with_http_probes_on_its_port(rendered: list[Manifest]) -> None:
    d = console_workload(rendered)
    assert d["spec"]["replicas"] == 1, (
        "without a database sign-in sessions live in one process's memory (CONSOLE.md)"
    )
    c = main_container(d)
    assert "command" not in c and c["args"] == ["flynn-console"]
    env = env_of(c)
    assert env["FLYNN_HTTP_LISTEN"].startswith("0.0.0.0:"), "kubelet probes reach the pod IP"
    listen_port = int(env["FLYNN_HTTP_LISTEN"].rpartition(":")[2])
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": listen_port}, "an HTTP port only: no gRPC, no metrics"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert set(c[probe]) & {"grpc", "tcpSocket", "exec"} == set(), probe
        spec = c[probe]["httpGet"]
        assert spec["path"] == "/healthz", probe
        assert ports.get(spec["port"], spec["port"]) == listen_port, probe
    grace = float(env["FLYNN_GRACE_SECONDS"])
    assert d["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > grace
    volumes = {v["name"]: v for v in d["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert mounts["data"] == env["FLYNN_DATA_DIR"] == "/data" and "emptyDir" in volumes["data"]
    # Only the gateway's CA when the gateway serves TLS (to verify it by).
    assert set(volumes) - {"gateway-tls"} == {"data", "tmp"}, (
        "the console needs no token: operators sign in with theirs"
    )
    if "gateway-tls" in volumes:
        assert volumes["gateway-tls"]["secret"]["items"] == [{"key": "ca.crt", "path": "ca.crt"}]
    assert "FLYNN_AUDIT_DIRS" not in env, "the services' audit files are not on its volumes (CONSOLE.md)"


def test_console_reads_through_the_gateway_service(rendered: list[Manifest]) -> None:
    env = env_of(main_container(console_workload(rendered)))
    host, _, port = env["FLYNN_GATEWAY_ADDR"].rpartition(":")
    svc_name, ns, svc_word, *_ = host.split(".")
    assert (ns, svc_word) == (console_workload(rendered)["metadata"]["namespace"], "svc")
    svc = named(rendered, "Service", svc_name)
    assert svc["spec"]["selector"] == workloads(rendered)["gateway"]["spec"]["selector"]["matchLabels"]
    assert int(port) == {p["name"]: p["port"] for p in svc["spec"]["ports"]}["grpc"]


def test_console_service_is_cluster_internal_http(rendered: list[Manifest]) -> None:
    d = console_workload(rendered)
    (svc,) = [s for s in by_kind(rendered, "Service") if component(s) == CONSOLE]
    assert svc["spec"]["type"] == "ClusterIP"
    assert svc["spec"]["selector"] == d["spec"]["selector"]["matchLabels"]
    (port,) = svc["spec"]["ports"]
    assert port["targetPort"] == "http" and port["appProtocol"] == "http"
    assert "flynn.io/metrics" not in svc["metadata"]["labels"], "the console has no metrics port"


def test_console_cookie_is_secure_exactly_when_served_over_tls(
    default_docs: list[Manifest], production_docs: list[Manifest], helm: Path
) -> None:
    assert "FLYNN_SECURE_COOKIE" not in env_of(main_container(console_workload(default_docs)))
    assert by_kind(production_docs, "Ingress")  # production values: console behind a TLS Ingress
    assert env_of(main_container(console_workload(production_docs)))["FLYNN_SECURE_COOKIE"] == "1"
    forced = parse(render(helm, "--set", "console.secureCookie=true"))
    assert env_of(main_container(console_workload(forced)))["FLYNN_SECURE_COOKIE"] == "1"


def test_console_ingress_is_explicit_and_targets_only_the_console(helm: Path) -> None:
    # The gateway's Ingress does not bring the console's along.
    gw_only = parse(
        render(
            helm,
            "--set",
            "gateway.ingress.enabled=true",
            "--set",
            "gateway.ingress.host=flynn.example.com",
            "--set",
            "gateway.ingress.tlsSecretName=flynn-tls",
        )  # fmt: skip
    )
    assert exposed(gw_only) == {"gateway"}
    docs = parse(
        render(
            helm,
            "--set", "console.ingress.enabled=true", "--set", "console.ingress.host=console.example.com",
            "--set", "console.ingress.tlsSecretName=console-tls",
        )
    )  # fmt: skip
    (ingress,) = by_kind(docs, "Ingress")
    assert exposed(docs) == {CONSOLE}
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend["port"] == {"name": "http"}
    assert component(named(docs, "Service", backend["name"])) == CONSOLE
    assert ingress["spec"]["tls"] == [{"hosts": ["console.example.com"], "secretName": "console-tls"}]
    missing_host = run_helm(helm, "template", "rel", str(CHART), "--set", "console.ingress.enabled=true")
    assert missing_host.returncode != 0 and "console.ingress.host is required" in missing_host.stderr


def test_console_can_be_left_out(helm: Path) -> None:
    docs = parse(render(helm, "--set", "console.enabled=false", "--set", "networkPolicy.enabled=true"))
    assert [
        d for d in docs if d["metadata"].get("labels", {}).get("app.kubernetes.io/component") == CONSOLE
    ] == []
    assert set(workloads(docs)) == set(topology.SERVICES)


def test_prometheus_rule_and_dashboard_are_optional_and_carry_the_generated_files(
    helm: Path, default_docs: list[Manifest]
) -> None:
    assert by_kind(default_docs, "PrometheusRule") == []
    assert not [c for c in by_kind(default_docs, "ConfigMap") if c["metadata"]["name"].endswith("-dashboard")]
    docs = parse(
        render(
            helm,
            "--set", "metrics.prometheusRule.enabled=true",
            "--set-string", "metrics.prometheusRule.labels.release=kube-prometheus-stack",
            "--set", "metrics.grafanaDashboard.enabled=true",
            "--set-string", "metrics.grafanaDashboard.annotations.grafana_folder=Flynn",
        )
    )  # fmt: skip
    (rule,) = by_kind(docs, "PrometheusRule")
    files = CHART / "files"
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert rule["spec"] == yaml.safe_load((files / "prometheus-rules.yaml").read_text())
    (dash,) = [c for c in by_kind(docs, "ConfigMap") if c["metadata"]["name"].endswith("-dashboard")]
    assert dash["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dash["metadata"]["annotations"] == {"grafana_folder": "Flynn"}
    assert json.loads(dash["data"]["flynn-canary.json"]) == json.loads(
        (files / "grafana-dashboard.json").read_text()
    )
    bad = run_helm(helm, "template", "r", str(CHART), "--set", "metrics.prometheusRule.window=5m")
    assert bad.returncode != 0 and "prometheusRule" in bad.stderr


def test_trusted_proxies_and_session_cap_reach_the_processes(
    production_docs: list[Manifest], default_docs: list[Manifest]
) -> None:
    w = workloads(production_docs)
    for name in ("gateway", "nodes", "queue"):
        assert env_of(main_container(w[name]))["FLYNN_TRUSTED_PROXIES"] == "10.0.0.0/8", name
    assert env_of(main_container(console_workload(production_docs)))["FLYNN_TRUSTED_PROXIES"] == "10.0.0.0/8"
    assert env_of(main_container(w["queue"]))["FLYNN_MAX_SESSIONS_PER_PRINCIPAL"] == "10000"
    # by default no proxy is trusted: the peer address is the client
    assert "FLYNN_TRUSTED_PROXIES" not in env_of(main_container(workloads(default_docs)["gateway"]))


def test_extra_channel_tokens_are_bound_to_their_channels(helm: Path, tmp_path: Path) -> None:
    h = auth.hash_token("tg-secret")
    docs = parse(
        render(
            helm,
            "--set-json",
            f'auth.extraTokens=[{{"name":"tg-bot","role":"channel","sha256":"{h}","channels":["telegram"]}}]',
            "--set",
            "auth.operatorName=alice",
        )
    )
    tokens = next(d for d in by_kind(docs, "Secret") if d["metadata"]["name"].endswith("-tokens"))
    path = tmp_path / "tokens.yaml"
    path.write_text(_secret_data(tokens)["tokens.yaml"])
    store = auth.TokenStore(path)
    bot = store.lookup("tg-secret")
    assert bot is not None and bot.role is auth.Role.CHANNEL and bot.channels == frozenset({"telegram"})
    assert {p.name for p in store.file_principals() if p.role is auth.Role.OPERATOR} == {"alice"}


def test_proxy_protocol_port_is_wired_when_set(helm: Path) -> None:
    docs = parse(
        render(helm, "--set", "gateway.proxyProtocolPort=50060", "--set", "networkPolicy.enabled=true")
    )
    gw = main_container(workloads(docs)["gateway"])
    assert env_of(gw)["FLYNN_PROXY_PROTOCOL_LISTEN"] == "0.0.0.0:50060"
    assert {"name": "grpc-proxy", "containerPort": 50060, "protocol": "TCP"} in gw["ports"]
    svc = next(s for s in by_kind(docs, "Service") if s["metadata"]["name"].endswith("-gateway"))
    assert any(p["name"] == "grpc-proxy" and p["targetPort"] == "grpc-proxy" for p in svc["spec"]["ports"])
    netpol = next(n for n in by_kind(docs, "NetworkPolicy") if n["metadata"]["name"].endswith("-gateway"))
    ports = [p["port"] for rule in netpol["spec"]["ingress"] for p in rule.get("ports", [])]
    assert "grpc-proxy" in ports
    # off by default
    assert "FLYNN_PROXY_PROTOCOL_LISTEN" not in env_of(
        main_container(workloads(parse(render(helm)))["gateway"])
    )


def test_voice_pods_run_the_voice_image_and_every_other_pod_the_runtime_image(
    default_docs: list[Manifest], production_docs: list[Manifest]
) -> None:
    """The Dockerfile makes two images (docs/operations/IMAGE.md): only voice carries the engines."""
    for docs, runtime, voice in (
        (default_docs, "ghcr.io/flynn-project/flynn:0.1.0", "ghcr.io/flynn-project/flynn-voice:0.1.0"),
        (
            production_docs,
            "registry.example.com/flynn/flynn@sha256:" + "0" * 64,
            "registry.example.com/flynn/flynn-voice@sha256:" + "1" * 64,
        ),
    ):
        images = {name: main_container(w)["image"] for name, w in workloads(docs).items()}
        assert images.pop("voice") == voice
        assert set(images.values()) == {runtime}
        assert main_container(console_workload(docs))["image"] == runtime
