"""The mesh: which process serves which gRPC services (used by the gateway router, launcher and chart tests)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServiceInfo:
    name: str  # process name, also the settings/env prefix ("queue" -> FLYNN_QUEUE_ADDR)
    module: str  # python -m <module> starts it
    console_script: str  # the same, as an installed command
    grpc_services: tuple[str, ...]
    stateful: bool


SERVICES: dict[str, ServiceInfo] = {
    s.name: s
    for s in (
        ServiceInfo(
            "config",
            "config_svc.main",
            "flynn-config",
            ("flynn.v1.ConfigService", "flynn.v1.Principals"),
            True,
        ),
        ServiceInfo("queue", "queue_svc.main", "flynn-queue", ("flynn.v1.RunControl",), True),
        ServiceInfo("reactions", "reactions_svc.main", "flynn-reactions", ("flynn.v1.Reactions",), True),
        ServiceInfo("nodes", "nodes_svc.main", "flynn-nodes", ("flynn.v1.Nodes", "flynn.v1.Canvas"), True),
        ServiceInfo("voice", "voice_svc.main", "flynn-voice", ("flynn.v1.Voice",), False),
        ServiceInfo(
            "gateway", "gateway.main", "flynn-gateway", ("flynn.v1.Gateway", "flynn.v1.System"), False
        ),
    )
}

# Start order for the launcher: config first (everyone watches it), the gateway last.
START_ORDER = ("config", "queue", "nodes", "voice", "reactions", "gateway")

# Implemented by external agents and called by run control directly; the gateway does not route it.
EXTERNAL_SERVICES = ("flynn.v1.Agent",)

# Served by every stateful service about its own replicas (flynn_runtime/replicas_servicer.py): the
# gateway calls it for System.GetStatus and never forwards it (any replica answers for all of them).
REPLICA_SERVICES = ("flynn.v1.Replicas",)


def owner_of(grpc_service: str) -> str | None:
    """Process that serves a fully-qualified gRPC service name."""
    for info in SERVICES.values():
        if grpc_service in info.grpc_services:
            return info.name
    return None
