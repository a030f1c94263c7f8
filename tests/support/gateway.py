"""Test support for the gateway: a real gateway process in front of real backend processes."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

from flynn_runtime import topology
from tests.support.mesh import ServiceProcess, Tokens, free_port

ECHO_MODULE = "tests.gateway.echo_backend"


def module_exists(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


@dataclass
class GatewayMesh:
    """A gateway process, the echo backend (voice + nodes), and the real config service when it exists."""

    root: Path
    tokens: Tokens
    echo: ServiceProcess | None = None
    config: ServiceProcess | None = None
    gateway: ServiceProcess | None = None
    dead: dict[str, str] = field(default_factory=dict)  # backend -> address where nothing listens

    def start(self, grace: float = 5.0, gateway_grace: float = 5.0) -> GatewayMesh:
        self.echo = ServiceProcess("voice", ECHO_MODULE, self.root / "echo", self.tokens, grace=grace).start()
        addresses = {"voice": self.echo.address, "nodes": self.echo.address}
        if module_exists("config_svc.main"):
            self.config = ServiceProcess(
                "config", "config_svc.main", self.root / "config", self.tokens, grace=grace
            )
            self.config.start()
            addresses["config"] = self.config.address
        else:
            self.dead["config"] = f"127.0.0.1:{free_port()}"
        for backend in ("queue", "reactions"):
            self.dead[backend] = f"127.0.0.1:{free_port()}"
        addresses.update(self.dead)
        self.gateway = ServiceProcess(
            "gateway",
            "gateway.main",
            self.root / "gateway",
            self.tokens,
            addresses=addresses,
            grace=gateway_grace,
        ).start()
        return self

    def stop(self) -> None:
        for proc in (self.gateway, self.config, self.echo):
            if proc is not None:
                proc.stop()


@dataclass
class RealMesh:
    """Every real service that exists (config first, gateway last), on ports chosen up front so each
    knows the others' addresses; services not written yet are addresses where nothing listens."""

    root: Path
    tokens: Tokens
    procs: dict[str, ServiceProcess] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)

    def start(self, grace: float = 5.0) -> RealMesh:
        ports = {name: free_port() for name in topology.START_ORDER}
        addresses = {name: f"127.0.0.1:{port}" for name, port in ports.items() if name != "gateway"}
        for name in topology.START_ORDER:
            module = topology.SERVICES[name].module
            if not module_exists(module):
                self.missing.append(name)
                continue
            proc = ServiceProcess(
                name,
                module,
                self.root / name,
                self.tokens,
                addresses=addresses,
                port=ports[name],
                grace=grace,
            )
            self.procs[name] = proc
            proc.start(timeout=60)
        return self

    @property
    def gateway(self) -> ServiceProcess:
        return self.procs["gateway"]

    def stop(self) -> None:
        for name in reversed(list(self.procs)):
            self.procs[name].stop()
