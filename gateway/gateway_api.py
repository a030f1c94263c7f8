"""flynn.v1.Gateway (the channel adapters' door). Not implemented yet: every method says so clearly."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from flynn.v1 import gateway_pb2, gateway_pb2_grpc
from grpc.aio import ServicerContext

from flynn_runtime.errors import Code, FlynnError


def _later(method: str) -> FlynnError:
    return FlynnError(
        Code.UNIMPLEMENTED,
        f"Gateway.{method} is not implemented yet; call flynn.v1.RunControl through the gateway",
        reason="NOT_IMPLEMENTED",
    )


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    async def SendMessage(
        self, request: gateway_pb2.SendMessageRequest, context: ServicerContext[Any, Any]
    ) -> gateway_pb2.SendMessageResponse:
        raise _later("SendMessage")

    async def StreamReplies(  # type: ignore[override]
        self, request: gateway_pb2.GatewayStreamRepliesRequest, context: ServicerContext[Any, Any]
    ) -> AsyncIterator[gateway_pb2.GatewayStreamRepliesResponse]:
        raise _later("StreamReplies")
        yield gateway_pb2.GatewayStreamRepliesResponse()  # pragma: no cover - async generator

    async def CancelRun(
        self, request: gateway_pb2.GatewayCancelRunRequest, context: ServicerContext[Any, Any]
    ) -> gateway_pb2.GatewayCancelRunResponse:
        raise _later("CancelRun")
