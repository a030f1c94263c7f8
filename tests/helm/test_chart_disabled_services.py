"""`<service>.enabled: false` in the chart: the service is left out (no workload, no Service, no
address), and the rest of the mesh, replayed from the rendered pods, reports it as not deployed,
not as failing: the gateway's routes, System/GetStatus, System/GetMetrics, the console's status and
the helm test hook."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from flynn.v1 import system_pb2, system_pb2_grpc

from console.mesh_client import MeshClient
from flynn_runtime import topology
from tests.helm.conftest import ROOT, Manifest, parse, render
from tests.helm.test_chart_env_boots import _files_of
from tests.helm.test_manifests import by_kind, main_container, workloads
from tests.support.mesh import free_port, grpcurl, wait_serving

BIN = Path(sys.executable).parent
LEFT_OUT = ("nodes", "voice")


@pytest.fixture(scope="module")
def docs(helm: Path) -> list[Manifest]:
    return parse(render(helm, *(a for n in LEFT_OUT for a in ("--set", f"{n}.enabled=false"))))


@pytest.fixture(scope="module")
def mesh(docs: list[Manifest], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    root = tmp_path_factory.mktemp("chart-partial")
    w = workloads(docs)
    local = {name: f"127.0.0.1:{free_port()}" for name in w}
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("FLYNN_")}
    base_env["PYTHONPATH"] = f"{ROOT}:{ROOT / 'gen'}"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for name in (n for n in topology.START_ORDER if n in w):
            spec = w[name]["spec"]["template"]["spec"]
            c = main_container(w[name])
            files = _files_of(docs, spec, c, root / name)
            env = dict(base_env)
            for e in c["env"]:
                value = e.get("value", f"{name}-0")
                if e["name"] == "FLYNN_LISTEN":
                    value = local[name]
                elif e["name"] == "FLYNN_METRICS_LISTEN":
                    value = "127.0.0.1:0"
                elif e["name"] == "FLYNN_DATA_DIR":
                    value = str(root / name / "data")
                elif e["name"].endswith("_ADDR") and value:  # an empty address stays empty
                    value = local[e["name"].removeprefix("FLYNN_").removesuffix("_ADDR").lower()]
                elif value in files:
                    value = str(files[value])
                env[e["name"]] = value
            log = (root / f"{name}.log").open("wb")
            procs.append(
                subprocess.Popen(
                    [str(BIN / c["args"][0])], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=root
                )
            )
            wait_serving(local[name], timeout=90)
        yield local
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()


def _token(docs: list[Manifest]) -> str:
    creds = next(s for s in by_kind(docs, "Secret") if s["metadata"]["name"].endswith("-credentials"))
    return base64.b64decode(creds["data"]["operator-token"]).decode()


def test_left_out_services_render_nothing(docs: list[Manifest]) -> None:
    assert set(workloads(docs)) == set(topology.SERVICES) - set(LEFT_OUT)
    names = {d["metadata"]["name"] for d in docs if d["kind"] in ("Service", "PodDisruptionBudget")}
    assert not [n for n in names if n.endswith(tuple(f"-{s}" for s in LEFT_OUT))], names
    gateway_env = {e["name"]: e.get("value") for e in main_container(workloads(docs)["gateway"])["env"]}
    assert gateway_env["FLYNN_VOICE_ADDR"] == "" and gateway_env["FLYNN_NODES_ADDR"] == ""
    assert (
        "voice=" not in gateway_env["FLYNN_METRICS_ADDRS"] and "queue=" in gateway_env["FLYNN_METRICS_ADDRS"]
    )
    hook = next(p for p in by_kind(docs, "Pod") if p["metadata"]["annotations"].get("helm.sh/hook") == "test")
    assert not [a for a in hook["spec"]["containers"][0]["args"] if "voice" in a or "nodes" in a]


def test_the_mesh_reports_left_out_services_as_not_deployed(
    mesh: dict[str, str], docs: list[Manifest]
) -> None:
    token = _token(docs)
    md = (("authorization", f"Bearer {token}"),)
    with grpc.insecure_channel(mesh["gateway"]) as ch:
        system = system_pb2_grpc.SystemStub(ch)
        status = {
            s.service: s
            for s in system.GetStatus(system_pb2.GetStatusRequest(), metadata=md, timeout=10).services
        }
        for name in LEFT_OUT:
            assert status[name].health == system_pb2.SERVICE_HEALTH_NOT_DEPLOYED, status[name]
        for name in set(topology.SERVICES) - set(LEFT_OUT):
            assert status[name].health == system_pb2.SERVICE_HEALTH_SERVING, status[name]
        metrics = system.GetMetrics(system_pb2.GetMetricsRequest(), metadata=md, timeout=20)
        assert sorted(metrics.not_deployed_services) == sorted(LEFT_OUT)
        assert not set(LEFT_OUT) & set(metrics.unavailable_services)
    # The gateway's routes: a method of a left-out service is UNIMPLEMENTED / NOT_DEPLOYED, not UNAVAILABLE.
    out = grpcurl("-format-error", mesh["gateway"], "flynn.v1.Voice/ListVoices", token=token, data="{}")
    assert out.returncode != 0
    err = json.loads(out.stdout or out.stderr)
    assert err["code"] == 12, err
    info = next(d for d in err["details"] if d["@type"].endswith("ErrorInfo"))
    assert info["reason"] == "NOT_DEPLOYED" and info["metadata"]["service"] == "voice"

    # The console's status (what its /api/status serves) says the same.
    async def console_status() -> dict[str, str]:
        client = MeshClient(mesh["gateway"])
        try:
            st = await client.get_status(token)
        finally:
            await client.close()
        return {s["service"]: s["health"] for s in st["services"]}

    seen = asyncio.run(console_status())
    assert seen["voice"] == seen["nodes"] == "NOT_DEPLOYED" and seen["queue"] == "SERVING", seen
