"""flynn-dev: start the whole mesh locally (`up`) and show its state (`status`).

flynn-dev up [--data-dir DIR] [--host 127.0.0.1] [--base-port 50050] [--only config,gateway,console]
             [--postgres [--replicas N]] [--tls]
flynn-dev status [--data-dir DIR]

`--tls` makes a local CA and certificates under <data dir>/tls (flynn_launcher/certs.py): the gateway
serves TLS, every service-to-service hop is mutual TLS, and the printed grpcurl line passes -cacert.
Without it everything is plaintext (the local default).

After the gRPC services, `up` starts the operator web console (console/) on http://<host>:<base+30>.
With --postgres, `up` first starts a throwaway PostgreSQL in <data dir>/postgres (initdb + pg_ctl,
127.0.0.1, a free port, no system service) and points every stateful service at it
(--database-url, password in <data dir>/secrets/database.password); it stops it on exit.
With --replicas N (needs --postgres) each stateful service runs N times ("config", "config-2", …;
replica i on its port + 1000·i), and every caller gets the comma list of its replicas (round_robin).
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path
from types import FrameType

import grpc
from flynn.v1 import system_pb2, system_pb2_grpc

from flynn_cli.status_cmds import REPLICA_HEADER, print_table, replica_rows
from flynn_launcher.local_postgres import LocalPostgres, usable_directory
from flynn_launcher.plan import (
    CONSOLE,
    CONSOLE_OFFSET,
    PROCESS_NAMES,
    MeshPaths,
    ServicePlan,
    backend_addresses,
    command,
    module_available,
    plan,
    port_offset,
)
from flynn_launcher.secrets_store import CLI_CHANNEL, MeshTokens, ensure_tokens, operator_name, read_token
from flynn_launcher.supervisor import Child, StartupError, Supervisor, check_ready, child_env, say
from flynn_runtime import tls, topology
from flynn_runtime.enum_names import short_name

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SEED = ROOT / "config" / "flynn.yaml"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flynn-dev", description="Run the Flynn mesh on this machine.")
    sub = p.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start every service, wait for health, supervise until Ctrl-C/SIGTERM")
    status = sub.add_parser("status", help="show each service's health and applied config revision")
    for s in (up, status):
        s.add_argument(
            "--data-dir", type=Path, default=Path(".flynn-data"), help="data directory (./.flynn-data)"
        )
        s.add_argument("--host", default="127.0.0.1", help="address every service binds (127.0.0.1)")
        s.add_argument(
            "--base-port",
            type=int,
            default=50050,
            help="gateway port; config +1, queue +2, … metrics +100, console (HTTP) +30 (50050)",
        )
    up.add_argument(
        "--only", default="", help=f"comma-separated subset to start (of {','.join(PROCESS_NAMES)})"
    )
    up.add_argument(
        "--skip-missing", action="store_true", help="skip services whose package does not exist yet"
    )
    up.add_argument("--seed-file", type=Path, default=DEFAULT_SEED, help="config seed for the config service")
    up.add_argument("--grace-seconds", type=float, default=10.0, help="shutdown grace of each service (10)")
    up.add_argument(
        "--health-timeout", type=float, default=60.0, help="seconds to wait for each service (60)"
    )
    up.add_argument(
        "--postgres",
        action="store_true",
        help="keep every stateful service's state in a throwaway PostgreSQL started in <data dir>/postgres",
    )
    up.add_argument(
        "--tls",
        action="store_true",
        help="local CA + certificates in <data dir>/tls: TLS at the gateway, mutual TLS between services",
    )
    up.add_argument(
        "--replicas",
        type=int,
        default=1,
        help="run each stateful service (config, queue, reactions, nodes) this many times; needs --postgres (1)",
    )
    return p


LAUNCHER_CERT = "flynn-dev"


def make_certs(paths: MeshPaths, host: str, names: list[str]) -> None:
    """A local CA (kept across runs) and a fresh certificate per process, plus the launcher's own
    client certificate for its health checks (every internal port requires one)."""
    from flynn_launcher import certs  # cryptography is needed only with --tls

    cp = certs.CertPaths(paths.tls)
    for name in [*names, LAUNCHER_CERT]:
        certs.issue(cp, name, certs.local_hosts(host))
    say(f"TLS: local CA {cp.ca_cert} and certificates for {', '.join(names)}")


def launcher_credentials(tls_dir: Path) -> grpc.ChannelCredentials | None:
    return tls.caller_credentials(
        str(tls_dir / "ca.pem"), str(tls_dir / f"{LAUNCHER_CERT}.pem"), str(tls_dir / f"{LAUNCHER_CERT}.key")
    )


def venv_command(name: str) -> str:
    """The tool installed next to this interpreter (absolute, so the printed line works in any shell),
    else the one on PATH."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    return shutil.which(name) or name


def _seed_args(svc: ServicePlan, seed: Path) -> list[str]:
    """`--seed-file` for the config service, when it supports the flag and the file exists."""
    if svc.of != "config" or not seed.exists():
        return []
    try:
        out = subprocess.run(
            [sys.executable, "-m", svc.module, "--help"],
            capture_output=True,
            text=True,
            timeout=60,
            env=child_env(ROOT),
        )
    except subprocess.TimeoutExpired:
        return []
    return ["--seed-file", str(seed.resolve())] if "--seed-file" in out.stdout else []


def status_command(paths: MeshPaths, host: str, base_port: int) -> list[str]:
    """`flynn-dev status` for this mesh, working from any directory (absolute data dir, its ports)."""
    return [
        venv_command("flynn-dev"), "status",
        "--data-dir", str(paths.data_dir.resolve()), "--host", host, "--base-port", str(base_port),
    ]  # fmt: skip


def _print_banner(
    paths: MeshPaths,
    children: list[Child],
    tokens: MeshTokens,
    host: str,
    base_port: int,
    use_tls: bool = False,
) -> None:
    rows = [("service", "address", "metrics", "pid")]
    rows += [
        (c.plan.name, c.plan.address, str(c.plan.metrics_port) if c.plan.metrics_port else "-", str(c.pid))
        for c in children
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["", f"Flynn mesh is up (data dir {paths.data_dir.resolve()})", ""]
    lines += ["  " + "  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    gateway = next((c for c in children if c.plan.name == "gateway"), None)
    lines += [
        "",
        f"Operator token: {tokens.operator}",
        f"  (principal {operator_name()!r}; kept in {paths.token_file('operator')})",
        f"Channel token for channel {CLI_CHANNEL!r}: {paths.token_file('channel')}",
        "  (more principals: flynn tokens issue NAME --role operator|channel|agent)",
        "",
    ]
    console = next((c for c in children if c.plan.name == CONSOLE), None)
    if console is not None:
        lines += [f"Console: {console.plan.url} (sign in with the operator token)", ""]
    if gateway is not None:
        transport = ["-cacert", str((paths.tls / "ca.pem").resolve())] if use_tls else ["-plaintext"]
        call = [
            venv_command("grpcurl"), *transport, "-H", f"authorization: Bearer {tokens.operator}",
            "-d", "{}", gateway.plan.address, "flynn.v1.System/GetStatus",
        ]  # fmt: skip
        lines += ["First call (through the gateway):", f"  {shlex.join(call)}", ""]
    elif any(c.plan.readiness == "grpc" for c in children):
        first = next(c for c in children if c.plan.readiness == "grpc").plan.address
        transport = (
            ["-cacert", str((paths.tls / "ca.pem").resolve()), "-cert", str((paths.tls / f"{LAUNCHER_CERT}.pem").resolve()),
             "-key", str((paths.tls / f"{LAUNCHER_CERT}.key").resolve())]
            if use_tls else ["-plaintext"]
        )  # fmt: skip
        call = [venv_command("grpcurl"), *transport, first, "grpc.health.v1.Health/Check"]
        lines += ["First call:", f"  {shlex.join(call)}", ""]
    lines += [
        f"Logs: {paths.logs.resolve()}/<service>.log",
        f"Status: {shlex.join(status_command(paths, host, base_port))}",
        "Stop: Ctrl-C",
        "",
    ]
    if gateway is not None:
        # The `flynn` CLI reads its address and token from these (README quick tour).
        token_file = shlex.quote(str(paths.token_file("operator").resolve()))
        lines[-4:-4] = [
            "Operator CLI (any shell, any directory):",
            f"  export FLYNN_ADDR={gateway.plan.address} FLYNN_TOKEN=$(cat {token_file})"
            + (f" FLYNN_CACERT={shlex.quote(str((paths.tls / 'ca.pem').resolve()))}" if use_tls else ""),
            f"  {shlex.join([venv_command('flynn'), 'config', 'get', 'server.queue'])}",
            "",
        ]
    print("\n".join(lines), flush=True)


def start_postgres(paths: MeshPaths) -> tuple[LocalPostgres, list[str]]:
    """Start (initdb on first use) the mesh's own PostgreSQL; returns it and the services' flags."""
    directory = usable_directory(paths.data_dir / "postgres")
    server = LocalPostgres(directory)
    server.init()
    if server.running():
        server.stop("fast")  # a previous `up` that was killed: restart on a fresh free port
    server.start()
    server.ensure_database("flynn")
    password_file = paths.secrets / "database.password"
    password_file.parent.mkdir(parents=True, exist_ok=True)
    password_file.write_text(server.password + "\n")
    password_file.chmod(0o600)
    say(f"PostgreSQL {server.url('flynn', with_password=False)} (data in {directory})")
    return server, [
        "--database-url",
        server.url("flynn", with_password=False),
        "--database-password-file",
        str(password_file),
    ]


def _planned_services(ns: argparse.Namespace, paths: MeshPaths) -> list[ServicePlan] | None:
    """The processes `up` starts, after checking the arguments (None, said why, when they are wrong)."""
    only = [s.strip() for s in ns.only.split(",") if s.strip()] or None
    unknown = [s for s in only or () if s not in PROCESS_NAMES]
    if unknown:
        say(f"unknown service(s) {', '.join(unknown)}; known: {', '.join(PROCESS_NAMES)}")
        return None
    if ns.replicas < 1 or ns.replicas > 5:
        say("--replicas must be between 1 and 5")
        return None
    if ns.replicas > 1 and not ns.postgres:
        say("--replicas needs --postgres: replicas of a stateful service share one database")
        return None
    services = plan(paths, ns.host, ns.base_port, only, replicas=ns.replicas)
    missing = [s for s in services if not module_available(s.module)]
    if missing and not ns.skip_missing:
        names = ", ".join(f"{s.name} ({s.module})" for s in missing)
        say(
            f"not implemented yet: {names}. Start the others with "
            f"--only {','.join(s.name for s in services if s not in missing)} (or --skip-missing)"
        )
        return None
    services = [s for s in services if s not in missing]
    if not services:
        say("nothing to start")
        return None
    for s in missing:
        say(f"skipping {s.name}: {s.module} does not exist yet")
    return services


def up(ns: argparse.Namespace) -> int:
    paths = MeshPaths(ns.data_dir)
    services = _planned_services(ns, paths)
    if services is None:
        return 2
    paths.logs.mkdir(parents=True, exist_ok=True)
    tokens = ensure_tokens(paths)
    # Services left out (--only, or missing) are not deployed: the mesh reports them so, not as failing.
    deployed = frozenset(s.of for s in services)
    database: LocalPostgres | None = None
    db_args: list[str] = []
    if ns.postgres:
        try:
            database, db_args = start_postgres(paths)
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            say(f"cannot start PostgreSQL: {e}")
            return 1
    credentials = None
    if ns.tls:
        make_certs(paths, ns.host, [s.name for s in services])
        credentials = launcher_credentials(paths.tls)
    addresses = backend_addresses(services, ns.host, ns.base_port)
    children = [
        Child(
            s,
            command(
                s,
                paths,
                ns.host,
                ns.base_port,
                ns.grace_seconds,
                _seed_args(s, ns.seed_file),
                deployed,
                tls=ns.tls,
                addresses=addresses,
            )  # fmt: skip
            + (db_args if topology.SERVICES.get(s.of) and topology.SERVICES[s.of].stateful else []),
        )
        for s in services
    ]
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    sup = Supervisor(
        children,
        paths,
        child_env(ROOT),
        stop,
        ns.grace_seconds,
        credentials=credentials,
        tls_dir=paths.tls if ns.tls else None,
    )
    try:
        try:
            sup.start_all(ns.health_timeout)
        except StartupError as err:
            if not stop.is_set():
                say(str(err))
                return 1
            return 0
        _print_banner(paths, children, tokens, ns.host, ns.base_port, use_tls=ns.tls)
        sup.supervise()
        return 0
    finally:
        sup.stop_all()
        if database is not None:
            database.stop("fast")
            say("PostgreSQL stopped")
        say("stopped")


Rows = list[tuple[str, ...]]


def _status_rows(ns: argparse.Namespace, paths: MeshPaths) -> tuple[Rows, int, bool, Rows]:
    """(rows, head revision, all serving, replica rows) via the gateway's System.GetStatus, else
    direct health checks (and no replica rows)."""
    state: dict[str, object] = {}
    if paths.state_file.exists():
        state = json.loads(paths.state_file.read_text())
    listed = state.get("services", [])
    services: list[dict[str, object]] = list(listed) if isinstance(listed, list) else []
    started = {str(s["name"]): str(s["address"]) for s in services}
    pids = {str(s["name"]): str(s.get("pid") or "-") for s in services}
    kinds = {str(s["name"]): str(s.get("readiness", "grpc")) for s in services}
    addresses = started or {n: f"{ns.host}:{ns.base_port + port_offset(n)}" for n in topology.START_ORDER}
    if not started:
        addresses[CONSOLE] = f"{ns.host}:{ns.base_port + CONSOLE_OFFSET}"
        kinds[CONSOLE] = "http"
    # Processes System.GetStatus does not report (the console is HTTP, not a gRPC service): checked here.
    http_only = {n: a for n, a in addresses.items() if kinds.get(n) == "http"}
    token = read_token(paths, "operator")
    credentials = launcher_credentials(Path(str(state["tls_dir"]))) if state.get("tls_dir") else None
    if "gateway" in addresses and token:
        channel = (
            grpc.insecure_channel(addresses["gateway"])
            if credentials is None
            else grpc.secure_channel(addresses["gateway"], credentials)
        )
        with channel as ch:
            try:
                resp = system_pb2_grpc.SystemStub(ch).GetStatus(
                    system_pb2.GetStatusRequest(),
                    metadata=(("authorization", f"Bearer {token}"),),
                    timeout=5,
                )
            except grpc.RpcError as err:
                say(f"gateway GetStatus failed ({err.code().name}); checking each service directly")
            else:
                rows: list[tuple[str, ...]] = []
                ok = True
                for s in resp.services:
                    health = short_name(system_pb2.ServiceHealth, s.health, lower=False)
                    # NOT_DEPLOYED (left out on purpose) is not a failure.
                    if s.service in addresses and health not in ("SERVING", "NOT_DEPLOYED"):
                        ok = False
                    rev = str(s.applied_revision) if s.applied_revision else "-"
                    pid = pids.get(s.service, "-")
                    rows.append((s.service, s.address or "-", pid, health, rev, s.version or "-", s.detail))
                # Replicas beyond the first ("config-2", …): the gateway reports each service once
                # (its calls are spread over the replicas), so each replica is checked here.
                reported = {s.service for s in resp.services}
                for name, addr in addresses.items():
                    if name in reported or name in http_only:
                        continue
                    health = check_ready(addr, "grpc", credentials=credentials)
                    ok = ok and health == "SERVING"
                    rows.append((name, addr, pids.get(name, "-"), health, "-", "-", "replica"))
                for name, addr in http_only.items():
                    health = check_ready(addr, "http")
                    ok = ok and health == "SERVING"
                    rows.append(
                        (name, addr, pids.get(name, "-"), health, "-", "-", f"GET http://{addr}/healthz")
                    )
                processes = {addr: name for name, addr in addresses.items()}  # "config-2" for its replica
                return rows, resp.head_revision, ok, replica_rows(resp, processes)
    direct: list[tuple[str, ...]] = []
    ok = True
    for name, addr in addresses.items():
        kind = kinds.get(name, "grpc")
        health = check_ready(addr, kind, credentials=credentials)
        ok = ok and health == "SERVING"
        direct.append((name, addr, pids.get(name, "-"), health, "?" if kind == "grpc" else "-", "-", ""))
    return direct, 0, ok, []


def status(ns: argparse.Namespace) -> int:
    paths = MeshPaths(ns.data_dir)
    rows, head, ok, replicas = _status_rows(ns, paths)
    print_table([("service", "address", "pid", "health", "config rev", "version", "detail"), *rows])
    print(f"config head revision: {head if head else 'unknown'}")
    if replicas:
        # Informational: a GONE replica (killed, restarted under a new id) stays listed for an hour.
        print("\nreplicas, as each recorded itself in its database (GONE: no heartbeat within its lease):")
        print_table([REPLICA_HEADER, *replicas])
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> None:
    ns = _parser().parse_args(argv)
    if ns.command == "up":
        raise SystemExit(up(ns))
    raise SystemExit(status(ns))


if __name__ == "__main__":
    main()
