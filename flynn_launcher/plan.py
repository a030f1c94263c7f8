"""What to start: one entry per service, with its ports, data dir and command line (no processes here)."""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

from flynn_runtime import topology
from flynn_runtime.settings import BACKENDS, DEFAULT_PORTS

METRICS_OFFSET = 100


@dataclass(frozen=True)
class ServicePlan:
    name: str
    module: str
    host: str
    port: int
    metrics_port: int
    data_dir: Path
    log_path: Path

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


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

    def token_file(self, role: str) -> Path:
        return self.secrets / f"{role}.token"


def port_offset(service: str) -> int:
    return DEFAULT_PORTS[service] - DEFAULT_PORTS["gateway"]


def module_available(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def plan(paths: MeshPaths, host: str, base_port: int, only: list[str] | None = None) -> list[ServicePlan]:
    names = [n for n in topology.START_ORDER if only is None or n in only]
    return [
        ServicePlan(
            name=n,
            module=topology.SERVICES[n].module,
            host=host,
            port=base_port + port_offset(n),
            metrics_port=base_port + METRICS_OFFSET + port_offset(n),
            data_dir=paths.data_dir / n,
            log_path=paths.logs / f"{n}.log",
        )
        for n in names
    ]


def command(
    svc: ServicePlan,
    paths: MeshPaths,
    host: str,
    base_port: int,
    grace_seconds: float,
    extra: list[str],
) -> list[str]:
    args = [
        sys.executable, "-m", svc.module,
        "--listen", svc.address,
        "--metrics-listen", f"{svc.host}:{svc.metrics_port}",
        "--data-dir", str(svc.data_dir),
        "--tokens-file", str(paths.tokens_file),
        "--service-token-file", str(paths.token_file("service")),
        "--grace-seconds", str(grace_seconds),
    ]  # fmt: skip
    for backend in BACKENDS:
        args += [f"--{backend}-addr", f"{host}:{base_port + port_offset(backend)}"]
    if svc.name == "gateway":
        # System.GetMetrics scrapes every backend's Prometheus port.
        scrape = (f"{b}={host}:{base_port + METRICS_OFFSET + port_offset(b)}" for b in BACKENDS)
        args += ["--metrics-addrs", ",".join(scrape)]
    return args + extra
