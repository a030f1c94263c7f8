"""flynn.v1.Replicas: the replicas of this service, from its ReplicaRegistry (thin: no logic here)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flynn.v1 import system_pb2, system_pb2_grpc
from grpc.aio import ServicerContext

from flynn_runtime import topology
from flynn_runtime.replica_registry import ReplicaRegistry, ReplicaRow
from flynn_runtime.timestamps import timestamp

SERVICE_NAME = topology.REPLICA_SERVICES[0]

_STATES = {
    "ready": system_pb2.REPLICA_STATE_READY,
    "not_ready": system_pb2.REPLICA_STATE_NOT_READY,
    "gone": system_pb2.REPLICA_STATE_GONE,
}


def replica_status(row: ReplicaRow) -> system_pb2.ReplicaStatus:
    out = system_pb2.ReplicaStatus(
        replica_id=row.replica_id,
        address=row.address,
        state=_STATES[row.state],
        start_time=timestamp(row.started_at),
        heartbeat_time=timestamp(row.heartbeat_at),
        heartbeat_age_seconds=round(row.heartbeat_age, 3),
        gone_after_seconds=row.gone_after,
        database_reachable=row.database_reachable,
        lease_held=row.lease_held,
        detail=row.detail,
        version=row.version,
    )
    for name, n in row.holdings:
        out.holdings.add(name=name, value=n)
    return out


class ReplicasServicer(system_pb2_grpc.ReplicasServicer):
    def __init__(self, registry: Callable[[], ReplicaRegistry | None]) -> None:
        self._registry = registry  # set by the service's start(), before it serves

    async def ListReplicas(
        self, request: system_pb2.ListReplicasRequest, context: ServicerContext[Any, Any]
    ) -> system_pb2.ListReplicasResponse:
        registry = self._registry()
        if registry is None:  # the service sets it in start(), before serving: never seen in practice
            return system_pb2.ListReplicasResponse()
        rows = await registry.list()
        return system_pb2.ListReplicasResponse(
            replicas=[replica_status(r) for r in rows], answered_by=registry.replica_id
        )
