"""The routing table and the merged reflection list, from the descriptors and the topology."""

from __future__ import annotations

from pathlib import Path

import pytest

from flynn_launcher.plan import MeshPaths, command, plan
from flynn_runtime import topology
from flynn_runtime.settings import DEFAULT_PORTS
from gateway.app import GatewayApp
from gateway.descriptors import PB2_MODULES, flynn_services
from gateway.routes import build_routes, external_methods, forwarded_services

ROOT = Path(__file__).resolve().parents[2]


def test_every_generated_module_is_imported_for_reflection() -> None:
    generated = {p.stem for p in (ROOT / "gen" / "flynn" / "v1").glob("*_pb2.py")}
    assert {m.__name__.rsplit(".", 1)[1] for m in PB2_MODULES} == generated


def test_every_internal_method_is_routed_to_its_owner_with_its_kind() -> None:
    routes = build_routes()
    by_name = {s.full_name: s for s in flynn_services()}
    expected = 0
    for info in topology.SERVICES.values():
        if info.name == "gateway":
            continue
        for svc in info.grpc_services:
            for m in by_name[svc].methods:
                expected += 1
                r = routes[f"/{svc}/{m.name}"]
                assert r.backend == info.name
                assert (r.request_streaming, r.response_streaming) == (m.client_streaming, m.server_streaming)
    assert len(routes) == expected
    assert routes["/flynn.v1.Nodes/Connect"].kind == "bidi_stream"
    assert routes["/flynn.v1.ConfigService/WatchConfig"].kind == "server_stream"
    assert routes["/flynn.v1.ConfigService/GetConfig"].kind == "unary"


def test_agent_and_local_services_are_not_forwarded() -> None:
    routes = build_routes()
    assert not [
        p for p in routes if p.startswith(("/flynn.v1.Agent/", "/flynn.v1.Gateway/", "/flynn.v1.System/"))
    ]
    assert set(external_methods()) == {"/flynn.v1.Agent/Run"}


def test_reflection_lists_all_ten_services_and_health_only_the_gateways_own() -> None:
    assert set(GatewayApp.service_names) == {"flynn.v1.Gateway", "flynn.v1.System"}
    # flynn.v1.Replicas is served by each stateful service about itself, never by the gateway.
    assert {*GatewayApp.service_names, *GatewayApp.reflection_names} == {
        s.full_name for s in flynn_services()
    } - set(topology.REPLICA_SERVICES)
    assert len(forwarded_services()) == 7


def test_launcher_ports_follow_the_default_offsets(tmp_path: Path) -> None:
    paths = MeshPaths(tmp_path)
    services = plan(paths, "127.0.0.1", 40000)
    # The gRPC services in topology order, then the operator console (HTTP, after the gateway).
    assert [s.name for s in services] == [*topology.START_ORDER, "console"]
    console = services.pop()
    assert (console.port, console.metrics_port, console.readiness) == (40030, 0, "http")
    for s in services:
        assert s.port == 40000 + DEFAULT_PORTS[s.name] - DEFAULT_PORTS["gateway"]
        assert s.metrics_port == s.port + 100
        assert s.data_dir == tmp_path / s.name
    gw = next(s for s in services if s.name == "gateway")
    cmd = command(gw, paths, "127.0.0.1", 40000, 7.0, [])
    assert cmd[cmd.index("--config-addr") + 1] == "127.0.0.1:40001"
    assert cmd[cmd.index("--service-token-file") + 1] == str(paths.token_file("service-gateway"))
    assert [s.name for s in plan(paths, "127.0.0.1", 40000, only=["gateway", "config"])] == [
        "config",
        "gateway",
    ]


def test_launcher_console_command_is_what_the_console_parses(tmp_path: Path) -> None:
    from console import audit_tail
    from console import main as console_main
    from flynn_runtime import settings

    paths = MeshPaths(tmp_path)
    (console,) = plan(paths, "127.0.0.1", 50050, only=["console"])
    assert console.readiness == "http" and console.port == 50080 == console_main.DEFAULT_HTTP_PORT
    cmd = command(console, paths, "127.0.0.1", 50050, 7.0, [])
    assert cmd[1:3] == ["-m", "console.main"]
    parser = settings.build_parser("console")
    console_main.add_args(parser)
    ns = parser.parse_args(cmd[3:])
    assert ns.http_listen == "127.0.0.1:50080"
    assert ns.gateway_addr == "127.0.0.1:50050"
    assert ns.grace_seconds == 7.0
    # Its data dir sits next to every service's, so its default audit dirs are theirs.
    assert Path(ns.data_dir) == tmp_path / "console"
    for name in topology.START_ORDER:
        (tmp_path / name / "audit").mkdir(parents=True)
    found = audit_tail.default_audit_dirs(Path(ns.data_dir))
    assert {d.parent.name for d in found} == set(topology.START_ORDER)


def test_launcher_gives_every_principal_its_own_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flynn_launcher.secrets_store import ensure_tokens
    from flynn_runtime import auth

    monkeypatch.setenv("USER", "alice")
    paths = MeshPaths(tmp_path)
    paths.secrets.mkdir(parents=True)
    paths.token_file("service").write_text("flt_old-shared-service-token\n")  # an older data dir
    first = ensure_tokens(paths)
    assert not paths.token_file("service").exists()
    assert ensure_tokens(paths) == first  # kept across restarts
    store = auth.TokenStore(paths.tokens_file)
    op = store.lookup(first.operator)
    assert op is not None and (op.name, op.role) == ("alice", auth.Role.OPERATOR)
    ch = store.lookup(first.channel)
    assert ch is not None and ch.role is auth.Role.CHANNEL and ch.channels == frozenset({"cli"})
    agent = store.lookup(first.agent)
    assert agent is not None and agent.role is auth.Role.AGENT
    assert set(first.services) == set(topology.SERVICES)
    for name, token in first.services.items():
        p = store.lookup(token)
        assert p is not None and p.role is auth.Role.SERVICE and p.name == name
        assert paths.token_file(f"service-{name}").read_text().strip() == token
    assert store.lookup("flt_old-shared-service-token") is None
    text = paths.tokens_file.read_text()
    assert first.operator not in text and "sha256" in text
    queue = next(s for s in plan(paths, "127.0.0.1", 40000) if s.name == "queue")
    cmd = command(queue, paths, "127.0.0.1", 40000, 7.0, [])
    assert cmd[cmd.index("--agent-token-file") + 1] == str(paths.token_file("agent"))
