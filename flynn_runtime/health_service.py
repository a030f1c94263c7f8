"""grpc.health.v1.Health with every method of the contract: Check and Watch (grpcio-health-checking)
plus List, which the library does not implement (its base would raise NotImplementedError)."""

from __future__ import annotations

from typing import Any

from grpc.aio import ServicerContext
from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]


class HealthServicer(health_aio.HealthServicer):  # type: ignore[misc]
    """The library's asyncio servicer, plus List: the status of every service this process reports."""

    async def List(
        self, request: health_pb2.HealthListRequest, context: ServicerContext[Any, Any]
    ) -> health_pb2.HealthListResponse:
        statuses: dict[str, int] = dict(self._server_status)
        return health_pb2.HealthListResponse(
            statuses={name: health_pb2.HealthCheckResponse(status=s) for name, s in statuses.items()}
        )
