"""Every `sh` recipe of docs/operations/RUNBOOK.md runs, in page order, against a mesh from `flynn-dev up`.

The recipes use $GW (the gateway), $TOKEN (operator), $SESSION and $NODE_ID. The fixture starts the
whole mesh with the real launcher on free loopback ports, sends one message so the session exists,
and keeps one companion node connected (Nodes/Connect with a token issued by Nodes/IssueNodeToken)
so that the node recipes have something to show.
"""

from __future__ import annotations

import importlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from flynn.v1 import nodes_pb2, nodes_pb2_grpc, run_control_pb2, run_control_pb2_grpc  # noqa: F401
from google.protobuf import descriptor_pool

from tests.helm.conftest import ROOT

RUNBOOK = ROOT / "docs" / "operations" / "RUNBOOK.md"
BLOCK = re.compile(r"^```sh\n(.*?)^```", re.S | re.M)
SESSION = "cli:runbook"
NODE_ID = "phone-runbook"


def recipes() -> list[str]:
    return BLOCK.findall(RUNBOOK.read_text())


def recipe_id(block: str) -> str:
    first = block.splitlines()[0].lstrip("# ").strip()
    return re.sub(r"[^a-z0-9]+", "-", first.lower()).strip("-")[:48] if block.startswith("#") else "recipe"


def methods_of(block: str) -> set[str]:
    return set(re.findall(r"\b(flynn\.v1\.\w+/\w+|grpc\.health\.v1\.Health/\w+)", block))


# --- static checks ----------------------------------------------------------------------------


def test_runbook_has_recipes_for_the_common_tasks() -> None:
    used = set().union(*(methods_of(b) for b in recipes()))
    for task, method in {
        "check health": "grpc.health.v1.Health/Check",
        "status of every service": "flynn.v1.System/GetStatus",
        "show config": "flynn.v1.ConfigService/GetConfig",
        "flip a gate": "flynn.v1.ConfigService/UpdateConfig",
        "roll config back": "flynn.v1.ConfigService/RollbackConfig",
        "explain a value": "flynn.v1.ConfigService/ExplainConfig",
        "which revision each service runs": "flynn.v1.ConfigService/ListWatchers",
        "cancel a run": "flynn.v1.RunControl/CancelRun",
        "inspect a session": "flynn.v1.RunControl/GetSession",
        "list nodes": "flynn.v1.Nodes/ListNodes",
        "read canvas": "flynn.v1.Canvas/GetArtifact",
        "list canvas": "flynn.v1.Canvas/ListArtifacts",
        "why did my rule not fire": "flynn.v1.Reactions/ListTraces",
        "metrics": "flynn.v1.System/GetMetrics",
    }.items():
        assert method in used, f"no recipe for {task} ({method})"


def test_recipes_name_real_methods_and_go_through_the_gateway() -> None:
    for module in sorted((ROOT / "gen" / "flynn" / "v1").glob("*_pb2.py")):
        importlib.import_module(f"flynn.v1.{module.stem}")  # registers the file in the default pool
    pool = descriptor_pool.Default()
    for block in recipes():
        for line in block.splitlines():
            if "grpcurl" in line:
                assert "$GW" in line, f"recipe does not use $GW: {line}"
                if "flynn.v1." in line and "/" in line:
                    assert '"authorization: Bearer $TOKEN"' in line, line
        for method in methods_of(block):
            service, _, name = method.partition("/")
            if service.startswith("grpc.health"):
                continue
            desc = pool.FindServiceByName(service)
            assert desc.FindMethodByName(name) is not None, method


# --- the mesh ---------------------------------------------------------------------------------


def _ports_free(base: int) -> bool:
    for offset in [*range(6), 30, *range(100, 106)]:  # 30: the console (HTTP)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", base + offset))
            except OSError:
                return False
    return True


def _free_base() -> int:
    for base in range(41000 + (os.getpid() % 50) * 200, 60000, 200):
        if _ports_free(base):
            return base
    raise RuntimeError("no free block of ports")


@dataclass
class Mesh:
    env: dict[str, str]
    data_dir: Path
    proc: subprocess.Popen[bytes]


class _Node:
    """A companion node kept connected with heartbeats until closed."""

    def __init__(self, address: str, token: str) -> None:
        self._stop = threading.Event()
        self.registered = threading.Event()
        self._channel = grpc.insecure_channel(address)
        stub = nodes_pb2_grpc.NodesStub(self._channel)
        self._responses = stub.Connect(self._requests(token))
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _requests(self, token: str) -> Iterator[nodes_pb2.ConnectRequest]:
        yield nodes_pb2.ConnectRequest(
            register=nodes_pb2.NodeRegister(
                node_id=NODE_ID, token=token, role="phone", capabilities=["system.notify"], protocol_version=1
            )
        )
        while not self._stop.wait(1.0):
            yield nodes_pb2.ConnectRequest(heartbeat=nodes_pb2.NodeHeartbeat())

    def _read(self) -> None:
        try:
            for resp in self._responses:
                if resp.WhichOneof("message") == "registered":
                    self.registered.set()
        except grpc.RpcError:
            pass

    def close(self) -> None:
        self._stop.set()
        self._responses.cancel()  # type: ignore[no-untyped-call]
        self._channel.close()
        self._thread.join(5)


def _start_mesh(
    tmp_path_factory: pytest.TempPathFactory, env: dict[str, str]
) -> tuple[subprocess.Popen[bytes], int, Path]:
    """`flynn-dev up` on a free block of ports; another block if a port was taken meanwhile."""
    failures = []
    for _attempt in range(3):
        data_dir = tmp_path_factory.mktemp("runbook-mesh")
        base = _free_base()
        log_path = data_dir / "flynn-dev.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "flynn_launcher.main", "up", "--data-dir", str(data_dir),
                 "--base-port", str(base), "--grace-seconds", "3"],
                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
            )  # fmt: skip
        deadline = time.monotonic() + 180
        while "Flynn mesh is up" not in log_path.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        else:
            return proc, base, data_dir
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
        failures.append(log_path.read_text(errors="replace")[-3000:])
    raise RuntimeError("flynn-dev up failed three times:\n" + "\n---\n".join(failures))


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    if shutil.which("jq") is None:
        pytest.fail("the runbook recipes need jq (apt-get install jq)")
    bin_dir = str(Path(sys.executable).parent)
    env = dict(
        os.environ, PATH=f"{bin_dir}:{os.environ.get('PATH', '')}", PYTHONPATH=f"{ROOT}:{ROOT / 'gen'}"
    )
    for key in [k for k in env if k.startswith("FLYNN_")]:
        env.pop(key)
    proc, base, data_dir = _start_mesh(tmp_path_factory, env)
    node: _Node | None = None
    try:
        token = (data_dir / "secrets" / "operator.token").read_text().strip()
        gw = f"127.0.0.1:{base}"
        md = (("authorization", f"Bearer {token}"),)
        with grpc.insecure_channel(gw) as ch:
            run_control_pb2_grpc.RunControlStub(ch).SubmitMessage(
                run_control_pb2.SubmitMessageRequest(
                    session_key=SESSION,
                    channel="cli",
                    sender="operator",
                    text="hello",
                    idempotency_key="rb-setup",
                ),
                metadata=md,
                timeout=20,
            )
            issued = nodes_pb2_grpc.NodesStub(ch).IssueNodeToken(
                nodes_pb2.IssueNodeTokenRequest(node_id=NODE_ID, role="phone", description="runbook test"),
                metadata=md,
                timeout=20,
            )
        node = _Node(f"127.0.0.1:{base + 4}", issued.token)
        assert node.registered.wait(20), "the test node did not register"
        recipe_env = dict(env, GW=gw, TOKEN=token, SESSION=SESSION, NODE_ID=NODE_ID)
        yield Mesh(recipe_env, data_dir, proc)
    finally:
        if node is not None:
            node.close()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


@pytest.mark.parametrize(
    "index", range(len(recipes())), ids=[f"{i:02d}-{recipe_id(b)}" for i, b in enumerate(recipes())]
)
def test_recipe_runs(mesh: Mesh, index: int) -> None:
    block = recipes()[index]
    proc = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", block],
        env=mesh.env,
        cwd=mesh.data_dir,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, (
        f"recipe failed:\n{block}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    )
    assert "ERROR" not in proc.stderr, proc.stderr
    assert proc.stdout.strip() or "select(" in block, f"recipe printed nothing:\n{block}"
