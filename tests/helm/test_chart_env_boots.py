"""The chart's pods, replayed as local processes: same command, same env, same mounted files.

For each workload of the default render, the container's args[0] runs from .venv/bin with the
container's env, where only what a cluster provides is replaced: listen addresses become free
loopback ports, FLYNN_*_ADDR the matching local addresses, and the mounted Secret / ConfigMap files
are written from the rendered Secret and ConfigMap objects. Then the probes' health names must be
SERVING, the helm test hook's own command must pass, and the config service must hold the
chart's runtimeConfig as revision 1, readable with the generated operator token through the gateway.
The console's pod is replayed the same way: its httpGet probe answers, the generated operator token
signs in through it (the console checks it against the replayed gateway), and SIGTERM stops it with 0.
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from flynn.v1 import config_pb2, config_pb2_grpc

from flynn_runtime import config_yaml, settings, topology
from tests.helm.conftest import ROOT, Manifest
from tests.helm.test_manifests import by_kind, console_workload, main_container, named, workloads
from tests.support.mesh import free_port, wait_serving

BIN = Path(sys.executable).parent


def _files_of(
    docs: list[Manifest], spec: dict[str, Any], container: dict[str, Any], root: Path
) -> dict[str, Path]:
    """Write every Secret/ConfigMap volume item under `root`; mountPath/item path -> local file."""
    volumes = {v["name"]: v for v in spec["volumes"]}
    out: dict[str, Path] = {}
    for mount in container["volumeMounts"]:
        vol = volumes.get(mount["name"], {})
        if "secret" in vol:
            obj = named(docs, "Secret", vol["secret"]["secretName"])
            data = {k: base64.b64decode(v).decode() for k, v in obj.get("data", {}).items()}
            data.update(obj.get("stringData", {}))
            items = vol["secret"]["items"]
        elif "configMap" in vol:
            data = named(docs, "ConfigMap", vol["configMap"]["name"])["data"]
            items = vol["configMap"]["items"]
        else:
            continue
        for item in items:
            local = root / mount["name"] / item["path"]
            local.parent.mkdir(parents=True, exist_ok=True)
            local.write_text(data[item["key"]])
            out[f"{mount['mountPath']}/{item['path']}"] = local
    return out


@pytest.fixture(scope="module")
def chart_mesh(
    default_docs: list[Manifest], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, str]]:
    root = tmp_path_factory.mktemp("chart-mesh")
    w = workloads(default_docs)
    ports = {name: free_port() for name in topology.SERVICES}
    local_addr = {name: f"127.0.0.1:{port}" for name, port in ports.items()}
    procs: dict[str, subprocess.Popen[bytes]] = {}
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("FLYNN_")}
    base_env["PYTHONPATH"] = f"{ROOT}:{ROOT / 'gen'}"
    try:
        for name in topology.START_ORDER:
            spec = w[name]["spec"]["template"]["spec"]
            c = main_container(w[name])
            files = _files_of(default_docs, spec, c, root / name)
            env = dict(base_env)
            for e in c["env"]:
                value = e.get("value", f"{name}-0")  # fieldRef metadata.name -> the pod name
                if e["name"] == "FLYNN_LISTEN":
                    value = local_addr[name]
                elif e["name"] == "FLYNN_METRICS_LISTEN":
                    value = "127.0.0.1:0"
                elif e["name"] == "FLYNN_DATA_DIR":
                    value = str(root / name / "data")
                elif e["name"].endswith("_ADDR"):
                    backend = e["name"].removeprefix("FLYNN_").removesuffix("_ADDR").lower()
                    value = local_addr[backend]
                elif value in files:
                    value = str(files[value])
                env[e["name"]] = value
            assert not any(v.startswith("/etc/flynn") for v in env.values()), (
                "a file the chart mounts is missing"
            )
            log = (root / f"{name}.log").open("wb")
            procs[name] = subprocess.Popen(
                [str(BIN / c["args"][0])], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=root
            )
        for name in topology.START_ORDER:
            probe = main_container(w[name])["readinessProbe"]["grpc"]["service"]
            try:
                wait_serving(local_addr[name], probe, timeout=90)
            except TimeoutError:
                raise AssertionError(
                    f"{name} not SERVING:\n{(root / f'{name}.log').read_text()[-3000:]}"
                ) from None
        yield local_addr
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def test_helm_test_hook_command_passes_against_the_chart_mesh(
    chart_mesh: dict[str, str], default_docs: list[Manifest]
) -> None:
    hook = next(
        p for p in by_kind(default_docs, "Pod") if p["metadata"]["annotations"].get("helm.sh/hook") == "test"
    )
    args = list(hook["spec"]["containers"][0]["args"])
    by_host = {}
    for name in topology.SERVICES:
        if name == "gateway":
            continue
        env = {e["name"]: e.get("value") for e in main_container(workloads(default_docs)["queue"])["env"]}
        by_host[str(env[f"FLYNN_{name.upper()}_ADDR"])] = chart_mesh[name]
    gateway_port = settings.DEFAULT_PORTS["gateway"]
    local = []
    for arg in args[1:]:
        addr, sep, service = arg.partition("/")
        if sep:
            addr = by_host.get(addr) or (chart_mesh["gateway"] if addr.endswith(f":{gateway_port}") else addr)
            arg = f"{addr}/{service}"
        local.append(arg)
    proc = subprocess.run([str(BIN / args[0]), *local], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("ok  ") == sum(1 + len(i.grpc_services) for i in topology.SERVICES.values())


def test_config_service_seeded_from_the_chart_and_reachable_with_the_generated_token(
    chart_mesh: dict[str, str], default_docs: list[Manifest]
) -> None:
    creds = next(s for s in by_kind(default_docs, "Secret") if s["metadata"]["name"].endswith("-credentials"))
    token = base64.b64decode(creds["data"]["operator-token"]).decode()
    seed_cm = next(
        c for c in by_kind(default_docs, "ConfigMap") if c["metadata"]["name"].endswith("-config-seed")
    )
    expected = config_yaml.yaml_to_config(seed_cm["data"]["config.yaml"])
    with grpc.insecure_channel(chart_mesh["gateway"]) as ch:
        stub = config_pb2_grpc.ConfigServiceStub(ch)
        resp = None
        deadline = time.monotonic() + 30
        while resp is None:
            try:
                resp = stub.GetConfig(
                    config_pb2.GetConfigRequest(revision=1),
                    metadata=(("authorization", f"Bearer {token}"),),
                    timeout=5,
                )
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        with pytest.raises(grpc.RpcError) as bad:
            stub.GetConfig(
                config_pb2.GetConfigRequest(), metadata=(("authorization", "Bearer nope"),), timeout=5
            )
    assert bad.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert resp.revision == 1
    assert resp.config == expected
    assert (
        yaml.safe_load(seed_cm["data"]["config.yaml"])["server"]["queue"]["cap"]
        == resp.config.server.queue.cap
    )


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def _http(url: str, data: dict[str, str] | None = None, cookie: str = "") -> tuple[int, dict[str, str], str]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect())
    body = urllib.parse.urlencode(data).encode() if data is not None else None
    req = urllib.request.Request(url, data=body, headers={"Cookie": cookie} if cookie else {})
    try:
        with opener.open(req, timeout=30) as resp:
            return resp.status, dict(resp.headers), resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read().decode()


def test_console_pod_replayed_answers_its_probe_and_signs_in_through_the_gateway(
    chart_mesh: dict[str, str], default_docs: list[Manifest], tmp_path: Path
) -> None:
    c = main_container(console_workload(default_docs))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLYNN_")}
    env["PYTHONPATH"] = f"{ROOT}:{ROOT / 'gen'}"
    for e in c["env"]:
        value = e["value"]
        if e["name"] == "FLYNN_HTTP_LISTEN":
            value = f"127.0.0.1:{port}"
        elif e["name"] == "FLYNN_GATEWAY_ADDR":
            value = chart_mesh["gateway"]
        elif e["name"] == "FLYNN_DATA_DIR":
            value = str(tmp_path / "data")
        env[e["name"]] = value
    assert not [v for v in env.values() if v.startswith("/etc/flynn")], "the console mounts no Secret"
    log_path = tmp_path / "console.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([str(BIN / c["args"][0])], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        probe = c["readinessProbe"]["httpGet"]
        assert probe["port"] == "http" and c["ports"][0]["name"] == "http"
        deadline = time.monotonic() + 60
        while True:
            try:
                status, _, text = _http(f"http://127.0.0.1:{port}{probe['path']}")
                break
            except OSError:
                assert proc.poll() is None, log_path.read_text()[-3000:]
                assert time.monotonic() < deadline, log_path.read_text()[-3000:]
                time.sleep(0.1)
        assert (status, text) == (200, "ok")
        creds = next(
            s for s in by_kind(default_docs, "Secret") if s["metadata"]["name"].endswith("-credentials")
        )
        token = base64.b64decode(creds["data"]["operator-token"]).decode()
        base = f"http://127.0.0.1:{port}"

        def sign_in(tok: str) -> tuple[int, dict[str, str]]:
            # the form carries a CSRF token that must match the sign-in cookie it came with
            _, page_headers, page = _http(f"{base}/signin")
            csrf = re.search(r'name="csrf" value="([^"]+)"', page)
            assert csrf is not None
            status, headers, _ = _http(
                f"{base}/signin",
                {"csrf": csrf.group(1), "token": tok},
                cookie=page_headers["Set-Cookie"].split(";")[0],
            )
            return status, headers

        assert _http(f"{base}/signin", {"token": token})[0] == 403  # no CSRF token: refused
        assert sign_in("nope")[0] == 401
        status, headers = sign_in(token)
        assert status == 303, log_path.read_text()[-3000:]
        cookie = headers["Set-Cookie"].split(";")[0]
        me_status, _, me = _http(f"{base}/api/me", cookie=cookie)
        assert me_status == 200 and json.loads(me)["actor"] == "operator:admin"  # from the credential
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(30) == 0, log_path.read_text()[-3000:]
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
