"""A mesh whose stateful services (config, run control, reactions, nodes) run as two processes each
on one real PostgreSQL, behind a real gateway, with FlowMesh's clients (tests/replicas)."""

from __future__ import annotations

from typing import ClassVar

import yaml

from tests.support.flow import FLOW_SEED, FlowMesh
from tests.support.gateway import ECHO_MODULE
from tests.support.mesh import ServiceProcess, free_port

STATEFUL = ("config", "queue", "reactions", "nodes")
MODULES = {
    "config": "config_svc.main",
    "queue": "queue_svc.main",
    "reactions": "reactions_svc.main",
    "nodes": "nodes_svc.main",
}


class ReplicaMesh(FlowMesh):
    """FlowMesh's clients over a mesh whose stateful services run as two processes each."""

    database_url: str = ""
    #: The voice backend is an echo server here: it watches nothing.
    watching: ClassVar[frozenset[str]] = frozenset({"queue", "reactions", "nodes", "gateway"})
    replicas: dict[str, list[ServiceProcess]]

    def start(self) -> ReplicaMesh:
        seed = dict(FLOW_SEED)
        seed.pop("tts")  # no speech: the voice backend is an echo server here
        seed.pop("audio")
        seed_path = self.root / "seed.yaml"
        self.root.mkdir(parents=True, exist_ok=True)
        seed_path.write_text(yaml.safe_dump(seed, allow_unicode=True))
        ports = {name: [free_port(), free_port()] for name in STATEFUL}
        voice_port, gateway_port = free_port(), free_port()
        addresses = {name: ",".join(f"127.0.0.1:{p}" for p in ports[name]) for name in STATEFUL}
        addresses["voice"] = f"127.0.0.1:{voice_port}"
        self.replicas = {}
        echo = ServiceProcess("voice", ECHO_MODULE, self.root / "echo", self.tokens, port=voice_port)
        self.procs["voice"] = echo.start()
        for name in STATEFUL:
            self.replicas[name] = []
            for i, port in enumerate(ports[name]):
                extra = ["--database-url", self.database_url]
                if name == "config":
                    extra += ["--seed-file", str(seed_path)]
                proc = ServiceProcess(
                    name, MODULES[name], self.root / f"{name}{i}", self.tokens,
                    addresses=addresses, extra=extra, port=port, grace=5.0,
                )  # fmt: skip
                self.replicas[name].append(proc)
                self.procs[f"{name}{i}"] = proc
                proc.start(timeout=90)
        gw = ServiceProcess(
            "gateway",
            "gateway.main",
            self.root / "gateway",
            self.tokens,
            addresses=addresses,
            port=gateway_port,
        )
        self.procs["gateway"] = gw.start(timeout=90)
        self.wait_watchers_applied(self.head_revision(), timeout=60)
        return self
