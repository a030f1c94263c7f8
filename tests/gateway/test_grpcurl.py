"""Real grpcurl against a real gateway process with the real services behind it (every one that
exists), plus the backend-down case against the echo mesh (whose queue/reactions are not running)."""

from __future__ import annotations

import json
import time

from flynn_runtime import topology
from tests.support.gateway import GatewayMesh, RealMesh
from tests.support.mesh import grpcurl

FLYNN_SERVICES = [
    "flynn.v1.Agent",
    "flynn.v1.Canvas",
    "flynn.v1.ConfigService",
    "flynn.v1.Gateway",
    "flynn.v1.Nodes",
    "flynn.v1.Principals",
    "flynn.v1.Reactions",
    "flynn.v1.RunControl",
    "flynn.v1.System",
    "flynn.v1.Voice",
]


def test_list_shows_every_service(real_mesh: RealMesh) -> None:
    mesh = real_mesh
    out = grpcurl(mesh.gateway.address, "list", token=mesh.tokens.operator)
    assert out.returncode == 0, out.stderr
    listed = out.stdout.split()
    assert sorted(s for s in listed if s.startswith("flynn.v1.")) == FLYNN_SERVICES
    assert "grpc.health.v1.Health" in listed
    assert "grpc.reflection.v1alpha.ServerReflection" in listed


def test_describe_run_control(real_mesh: RealMesh) -> None:
    mesh = real_mesh
    out = grpcurl(mesh.gateway.address, "describe", "flynn.v1.RunControl", token=mesh.tokens.operator)
    assert out.returncode == 0, out.stderr
    assert "service RunControl {" in out.stdout
    assert "rpc SubmitMessage ( .flynn.v1.SubmitMessageRequest )" in out.stdout
    assert "returns ( stream .flynn.v1.WatchRunEventsResponse )" in out.stdout
    out = grpcurl(
        mesh.gateway.address, "describe", "flynn.v1.SubmitMessageRequest", token=mesh.tokens.operator
    )
    assert out.returncode == 0, out.stderr
    assert "idempotency_key" in out.stdout


def test_health_serving_on_each_running_service(real_mesh: RealMesh) -> None:
    assert {"config", "gateway"} <= set(real_mesh.procs)
    for name, proc in real_mesh.procs.items():
        out = grpcurl(proc.address, "grpc.health.v1.Health/Check")
        assert out.returncode == 0, (name, out.stderr)
        assert json.loads(out.stdout) == {"status": "SERVING"}, name
        for svc in topology.SERVICES[name].grpc_services:
            out = grpcurl(proc.address, "grpc.health.v1.Health/Check", data=json.dumps({"service": svc}))
            assert json.loads(out.stdout) == {"status": "SERVING"}, (name, svc, out.stderr)


def test_invalid_field_is_invalid_argument_with_the_field_violation(real_mesh: RealMesh) -> None:
    mesh = real_mesh
    # The real config service behind the gateway: a page size out of range.
    method, data, field = "flynn.v1.ConfigService/ListRevisions", {"page_size": -5}, "page_size"
    out = grpcurl(mesh.gateway.address, method, token=mesh.tokens.operator, data=json.dumps(data))
    assert out.returncode != 0
    assert "Code: InvalidArgument" in out.stderr
    assert "type.googleapis.com/google.rpc.BadRequest" in out.stderr
    assert f'"field":"{field}"' in out.stderr
    # The same status as JSON (-format-error), parsed.
    out = grpcurl(
        "-format-error", mesh.gateway.address, method, token=mesh.tokens.operator, data=json.dumps(data)
    )
    status = json.loads(out.stderr)
    assert status["code"] == 3
    bad = [d for d in status["details"] if d["@type"].endswith("google.rpc.BadRequest")]
    violations = bad[0].get("fieldViolations") or bad[0]["field_violations"]
    assert violations[0]["field"] == field


def test_no_token_is_unauthenticated(real_mesh: RealMesh) -> None:
    mesh = real_mesh
    out = grpcurl(mesh.gateway.address, "flynn.v1.ConfigService/GetConfig", data="{}")
    assert out.returncode != 0
    assert "Code: Unauthenticated" in out.stderr
    assert "missing bearer token" in out.stderr


def test_channel_token_on_operator_method_is_permission_denied(real_mesh: RealMesh) -> None:
    mesh = real_mesh
    out = grpcurl(
        mesh.gateway.address, "flynn.v1.ConfigService/UpdateConfig", token=mesh.tokens.channel, data="{}"
    )
    assert out.returncode != 0
    assert "Code: PermissionDenied" in out.stderr
    assert "role 'channel' may not call /flynn.v1.ConfigService/UpdateConfig" in out.stderr


def test_backend_down_is_unavailable_naming_it_quickly(mesh: GatewayMesh) -> None:
    assert mesh.gateway is not None
    start = time.monotonic()
    out = grpcurl(mesh.gateway.address, "flynn.v1.Reactions/ListRules", token=mesh.tokens.operator, data="{}")
    elapsed = time.monotonic() - start
    assert out.returncode != 0
    assert "Code: Unavailable" in out.stderr
    assert "the reactions service is unavailable" in out.stderr
    assert mesh.dead["reactions"] not in out.stderr  # no internal address past the edge
    assert elapsed < 15  # never a hang (grpcurl's own -max-time is 20 s); the bench measures the real figure


def test_system_get_status(real_mesh: RealMesh) -> None:
    mesh = real_mesh
    out = grpcurl(mesh.gateway.address, "flynn.v1.System/GetStatus", token=mesh.tokens.operator, data="{}")
    assert out.returncode == 0, out.stderr
    answer = json.loads(out.stdout)
    status = {s["service"]: s for s in answer["services"]}
    assert set(status) == set(topology.START_ORDER)
    for name in mesh.procs:
        assert status[name]["health"] == "SERVICE_HEALTH_SERVING", status[name]
    for name in mesh.missing:
        assert status[name]["health"] == "SERVICE_HEALTH_UNREACHABLE" and status[name]["detail"]
    assert int(answer["head_revision"]) >= 1  # the config service seeded revision 1
    assert status["config"]["applied_revision"] == answer["head_revision"]


def test_system_get_status_shows_each_watchers_applied_revision(real_mesh: RealMesh) -> None:
    # Every backend that watches config reports (ACKs) the revision it applied; give them time to.
    watchers = [n for n in real_mesh.procs if n not in ("config", "gateway")]
    deadline = time.monotonic() + 30
    status: dict[str, dict[str, str]] = {}
    while time.monotonic() < deadline:
        out = grpcurl(
            real_mesh.gateway.address, "flynn.v1.System/GetStatus", token=real_mesh.tokens.operator, data="{}"
        )
        assert out.returncode == 0, out.stderr
        status = {s["service"]: s for s in json.loads(out.stdout)["services"]}
        if all(int(status[n].get("applied_revision", 0)) >= 1 for n in watchers):
            return
        time.sleep(0.2)
    raise AssertionError(f"applied revisions not reported: {status}")


def test_system_get_status_with_backends_down(mesh: GatewayMesh) -> None:
    assert mesh.gateway is not None
    out = grpcurl(mesh.gateway.address, "flynn.v1.System/GetStatus", token=mesh.tokens.operator, data="{}")
    assert out.returncode == 0, out.stderr
    status = {s["service"]: s for s in json.loads(out.stdout)["services"]}
    assert status["voice"]["health"] == "SERVICE_HEALTH_SERVING"  # the echo backend
    assert status["queue"]["health"] == "SERVICE_HEALTH_UNREACHABLE"
    assert "Connection refused" in status["queue"]["detail"] or status["queue"]["detail"]
