"""Every flynn.v1 protobuf module, imported so the default descriptor pool (and reflection) knows them all."""

from __future__ import annotations

from types import ModuleType

from flynn.v1 import (
    agent_pb2,
    canvas_pb2,
    common_pb2,
    config_pb2,
    gateway_pb2,
    nodes_pb2,
    principals_pb2,
    reactions_pb2,
    run_control_pb2,
    system_pb2,
    voice_pb2,
)
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import ServiceDescriptor

PB2_MODULES: tuple[ModuleType, ...] = (
    agent_pb2,
    canvas_pb2,
    common_pb2,
    config_pb2,
    gateway_pb2,
    nodes_pb2,
    principals_pb2,
    reactions_pb2,
    run_control_pb2,
    system_pb2,
    voice_pb2,
)


def flynn_services() -> list[ServiceDescriptor]:
    """Every flynn.v1 service in the pool, in file then declaration order."""
    out: list[ServiceDescriptor] = []
    for module in PB2_MODULES:
        out.extend(module.DESCRIPTOR.services_by_name.values())
    return out


def find_service(full_name: str) -> ServiceDescriptor:
    return descriptor_pool.Default().FindServiceByName(full_name)
