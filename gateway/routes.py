"""The routing table: which backend owns each forwarded method, and its streaming kind (from descriptors)."""

from __future__ import annotations

from dataclasses import dataclass

from flynn_runtime import topology
from gateway.descriptors import find_service

# Served by the gateway itself, not forwarded.
LOCAL_SERVICES = topology.SERVICES["gateway"].grpc_services


@dataclass(frozen=True)
class Route:
    method: str  # "/flynn.v1.Voice/Synthesize"
    backend: str  # process name ("voice")
    request_streaming: bool
    response_streaming: bool

    @property
    def kind(self) -> str:
        if self.request_streaming and self.response_streaming:
            return "bidi_stream"
        if self.request_streaming:
            return "client_stream"
        if self.response_streaming:
            return "server_stream"
        return "unary"


def forwarded_services() -> list[str]:
    """Fully-qualified names of the services the gateway forwards, in topology order."""
    return [
        svc for info in topology.SERVICES.values() if info.name != "gateway" for svc in info.grpc_services
    ]


def build_routes() -> dict[str, Route]:
    routes: dict[str, Route] = {}
    for info in topology.SERVICES.values():
        if info.name == "gateway":
            continue
        for svc in info.grpc_services:
            desc = find_service(svc)
            for m in desc.methods:
                path = f"/{svc}/{m.name}"
                routes[path] = Route(path, info.name, m.client_streaming, m.server_streaming)
    return routes


def external_methods() -> dict[str, Route]:
    """Methods of services implemented outside the mesh (Agent): known, but never routed."""
    out: dict[str, Route] = {}
    for svc in topology.EXTERNAL_SERVICES:
        for m in find_service(svc).methods:
            path = f"/{svc}/{m.name}"
            out[path] = Route(path, "", m.client_streaming, m.server_streaming)
    return out
