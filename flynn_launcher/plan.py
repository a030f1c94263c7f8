"""What to start: one entry per service, with its ports, data dir and command line (no processes here)."""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

from flynn_runtime import topology
from flynn_runtime.settings import BACKENDS, DEFAULT_PORTS

METRICS_OFFSET = 100
#: Replica i (from 0) of a stateful service listens on its port + i * REPLICA_PORT_STRIDE (and so
#: does its metrics port); it is named "<service>-<i+1>" from the second one on.
REPLICA_PORT_STRIDE = 1000
# The operator web console (console/): an HTTP process, not a gRPC service, so not in topology.
CONSOLE = "console"
CONSOLE_MODULE = "console.main"
CONSOLE_OFFSET = 30  # its HTTP port: base + 30
PROCESS_NAMES = (*topology.START_ORDER, CONSOLE)


@dataclass(frozen=True)
class ServicePlan:
    name: str
    module: str
    host: str
    port: int
    metrics_port: int
    data_dir: Path
    log_path: Path
    # How the supervisor decides the process is up: "grpc" (grpc.health.v1 on port) or "http"
    # (GET /healthz on port answers 200).
    readiness: str = "grpc"
    #: The service this process is a replica of (its name without the replica suffix).
    service: str = ""

    @property
    def of(self) -> str:
        return self.service or self.name

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"


@dataclass(frozen=True)
class MeshPaths:
    data_dir: Path

    @property
    def secrets(self) -> Path:
        return self.data_dir / "secrets"

    @property
    def tokens_file(self) -> Path:
        return self.secrets / "tokens.yaml"

    @property
    def logs(self) -> Path:
        return self.data_dir / "logs"

    @property
    def state_file(self) -> Path:
        return self.data_dir / "mesh.json"

    @property
    def tls(self) -> Path:
        return self.data_dir / "tls"

    def token_file(self, role: str) -> Path:
        return self.secrets / f"{role}.token"


def port_offset(service: str) -> int:
    return DEFAULT_PORTS[service] - DEFAULT_PORTS["gateway"]


def module_available(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def plan(
    paths: MeshPaths, host: str, base_port: int, only: list[str] | None = None, replicas: int = 1
) -> list[ServicePlan]:
    """The gRPC services in start order (each stateful one `replicas` times: they share a database),
    then the console (it reads everything through the gateway)."""
    names = [n for n in topology.START_ORDER if only is None or n in only]
    services = []
    for n in names:
        count = replicas if topology.SERVICES[n].stateful else 1
        for i in range(count):
            name = n if i == 0 else f"{n}-{i + 1}"
            services.append(
                ServicePlan(
                    name=name,
                    module=topology.SERVICES[n].module,
                    host=host,
                    port=base_port + port_offset(n) + i * REPLICA_PORT_STRIDE,
                    metrics_port=base_port + METRICS_OFFSET + port_offset(n) + i * REPLICA_PORT_STRIDE,
                    data_dir=paths.data_dir / name,
                    log_path=paths.logs / f"{name}.log",
                    service=n,
                )
            )
    if only is None or CONSOLE in only:
        services.append(
            ServicePlan(
                name=CONSOLE,
                module=CONSOLE_MODULE,
                host=host,
                port=base_port + CONSOLE_OFFSET,
                metrics_port=0,  # the console has no Prometheus endpoint
                data_dir=paths.data_dir / CONSOLE,
                log_path=paths.logs / f"{CONSOLE}.log",
                readiness="http",
            )
        )
    return services


def backend_addresses(services: list[ServicePlan], host: str, base_port: int) -> dict[str, str]:
    """--<backend>-addr of every service: its default port, or the comma list of its replicas (gRPC
    round_robin over them, flynn_runtime/channels.py)."""
    out = {b: f"{host}:{base_port + port_offset(b)}" for b in BACKENDS}
    for b in BACKENDS:
        replicas = [s.address for s in services if s.of == b]
        if len(replicas) > 1:
            out[b] = ",".join(replicas)
    return out


def command(
    svc: ServicePlan,
    paths: MeshPaths,
    host: str,
    base_port: int,
    grace_seconds: float,
    extra: list[str],
    deployed: frozenset[str] | None = None,
    tls: bool = False,
    addresses: dict[str, str] | None = None,
) -> list[str]:
    """The command line of one process. `deployed`: the gRPC services this mesh runs (None: all); the
    others get an empty address, so the mesh reports them as not deployed rather than failing.
    `addresses`: --<backend>-addr values (a comma list of a service's replicas), else the defaults."""
    if svc.name == CONSOLE:
        # Its data dir is a sibling of every service's, so its default audit dirs (<mesh data>/*/audit,
        # console/audit_tail.py) are exactly the services' audit logs.
        console = [
            sys.executable, "-m", svc.module,
            "--http-listen", svc.address,
            "--gateway-addr", f"{host}:{base_port + port_offset('gateway')}",
            "--data-dir", str(svc.data_dir),
            "--grace-seconds", str(grace_seconds),
        ]  # fmt: skip
        if tls:  # the gateway's certificate is verified against the local CA
            console += ["--tls-ca-file", str(paths.tls / "ca.pem")]
        return console + extra
    args = [
        sys.executable, "-m", svc.module,
        "--listen", svc.address,
        "--metrics-listen", f"{svc.host}:{svc.metrics_port}",
        "--data-dir", str(svc.data_dir),
        "--tokens-file", str(paths.tokens_file),
        "--service-token-file", str(paths.token_file(f"service-{svc.of}")),
        "--grace-seconds", str(grace_seconds),
    ]  # fmt: skip
    here = [b for b in BACKENDS if deployed is None or b in deployed]
    for backend in BACKENDS:
        default = f"{host}:{base_port + port_offset(backend)}"
        args += [f"--{backend}-addr", (addresses or {}).get(backend, default) if backend in here else ""]
    if svc.of == "queue":
        args += ["--agent-token-file", str(paths.token_file("agent"))]
    if svc.name == "gateway":
        # System.GetMetrics scrapes every deployed backend's Prometheus port.
        scrape = (f"{b}={host}:{base_port + METRICS_OFFSET + port_offset(b)}" for b in here)
        args += ["--metrics-addrs", ",".join(scrape)]
    if tls:
        # Every service serves TLS with its own certificate and, the mesh CA being set, requires and
        # presents client certificates (mutual TLS); the gateway asks its public callers for none.
        args += [
            "--tls-cert-file", str(paths.tls / f"{svc.name}.pem"),
            "--tls-key-file", str(paths.tls / f"{svc.name}.key"),
            "--tls-ca-file", str(paths.tls / "ca.pem"),
        ]  # fmt: skip
    return args + extra
