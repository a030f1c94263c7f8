"""Server reflection that also resolves method symbols (`flynn.v1.RunControl.CancelRun`).

grpcio-reflection answers `file_containing_symbol` with the descriptor pool's FindFileContainingSymbol,
which does not know method names (upstream grpc/grpc#34743), so `grpcurl describe
flynn.v1.RunControl.CancelRun` failed with "Symbol not found". A method lives in its service's file:
when the plain lookup fails and the symbol is `<service>.<method>` of a known service, answer with
that file.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from google.protobuf import descriptor_pool
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha._async import ReflectionServicer as _AioReflectionServicer


def method_owner(pool: descriptor_pool.DescriptorPool, symbol: str) -> str | None:
    """The service's full name when `symbol` is `<package>.<Service>.<Method>`, else None."""
    service, _, method = symbol.rpartition(".")
    if not service or not method:
        return None
    try:
        desc = pool.FindServiceByName(service)
    except KeyError:
        return None
    return service if method in desc.methods_by_name else None


class ReflectionServicer(_AioReflectionServicer):  # type: ignore[misc]
    def _file_containing_symbol(
        self, request: reflection_pb2.ServerReflectionRequest, fully_qualified_name: str
    ) -> reflection_pb2.ServerReflectionResponse:
        response: reflection_pb2.ServerReflectionResponse = super()._file_containing_symbol(
            request, fully_qualified_name
        )
        if response.HasField("error_response"):
            service = method_owner(self._pool, fully_qualified_name)
            if service is not None:
                found: reflection_pb2.ServerReflectionResponse = super()._file_containing_symbol(
                    request, service
                )
                return found
        return response


def enable(service_names: Iterable[str], server: grpc.aio.Server) -> None:
    """Register reflection (v1alpha, which grpcurl uses) for these services on an asyncio server."""
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
        ReflectionServicer(list(service_names), pool=descriptor_pool.Default()), server
    )
