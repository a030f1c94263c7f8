"""flynn.v1.Gateway: the channel adapters' door, in front of run control (text messages for now).

The caller's own authorization travels on to run control (which checks the role again and records
the real actor); the caller's deadline and cancellation do too. Voice notes (`audio`) come later,
with transcription through the voice service.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, cast

import grpc
from flynn.v1 import gateway_pb2, gateway_pb2_grpc, run_control_pb2, run_control_pb2_grpc
from grpc.aio import ServicerContext

from flynn_runtime.channels import downstream_timeout
from flynn_runtime.errors import Code, FlynnError
from flynn_runtime.server import Runtime, until_stopping
from flynn_runtime.validation import Violations
from gateway.backends import Backends
from gateway.forwarder import forward_metadata, relay_error, stream_timeout

Ctx = ServicerContext[Any, Any]
RUN_CONTROL = "queue"
UNARY_TIMEOUT = 30.0


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    def __init__(self, runtime: Runtime, backends: Backends) -> None:
        self._runtime = runtime
        self._backends = backends
        self._stub = run_control_pb2_grpc.RunControlStub(backends.channel(RUN_CONTROL))

    async def _fail(self, context: Ctx, err: grpc.aio.AioRpcError) -> None:
        await relay_error(context, err, RUN_CONTROL, self._backends.address(RUN_CONTROL))

    async def SendMessage(
        self, request: gateway_pb2.SendMessageRequest, context: Ctx
    ) -> gateway_pb2.SendMessageResponse:
        v = Violations()
        v.text("channel", request.channel, required=True, max_bytes=64)
        v.text("session_key", request.session_key, required=True, max_bytes=256)
        v.text("idempotency_key", request.idempotency_key, required=True, max_bytes=256)
        if not request.text and not request.HasField("audio"):
            v.add("text", "is required unless audio is given")
        v.raise_if_any()
        if not request.text:
            raise FlynnError(
                Code.UNIMPLEMENTED,
                "voice notes are not supported by the gateway yet; send text",
                reason="NOT_IMPLEMENTED",
            )
        submit = run_control_pb2.SubmitMessageRequest(
            session_key=request.session_key,
            channel=request.channel,
            sender=request.sender,
            text=request.text,
            idempotency_key=request.idempotency_key,
            mode_override=request.mode_override,
        )
        try:
            resp = await self._stub.SubmitMessage(
                submit, timeout=downstream_timeout(context, UNARY_TIMEOUT), metadata=forward_metadata(context)
            )
        except grpc.aio.AioRpcError as err:
            await self._fail(context, err)
            raise
        return gateway_pb2.SendMessageResponse(
            message_id=resp.message_id,
            disposition=resp.disposition,
            run_id=resp.run_id,
            effective_mode=resp.effective_mode,
        )

    async def StreamReplies(  # type: ignore[override]
        self, request: gateway_pb2.GatewayStreamRepliesRequest, context: Ctx
    ) -> AsyncIterator[gateway_pb2.GatewayStreamRepliesResponse]:
        call = self._stub.StreamReplies(
            run_control_pb2.StreamRepliesRequest(
                after_cursor=request.after_cursor, channels=request.channels
            ),
            timeout=stream_timeout(context),
            metadata=forward_metadata(context),
        )

        async def replies() -> AsyncIterator[gateway_pb2.GatewayStreamRepliesResponse]:
            async for resp in cast(AsyncIterator[run_control_pb2.StreamRepliesResponse], call):
                yield gateway_pb2.GatewayStreamRepliesResponse(reply=resp.reply)

        try:
            async for item in until_stopping(self._runtime, replies()):
                yield cast(gateway_pb2.GatewayStreamRepliesResponse, item)
        except grpc.aio.AioRpcError as err:
            await self._fail(context, err)
        finally:
            call.cancel()

    async def CancelRun(
        self, request: gateway_pb2.GatewayCancelRunRequest, context: Ctx
    ) -> gateway_pb2.GatewayCancelRunResponse:
        cancel = run_control_pb2.CancelRunRequest(
            run_id=request.run_id, session_key=request.session_key, scope=request.scope, reason=request.reason
        )
        try:
            resp = await self._stub.CancelRun(
                cancel, timeout=downstream_timeout(context, UNARY_TIMEOUT), metadata=forward_metadata(context)
            )
        except grpc.aio.AioRpcError as err:
            await self._fail(context, err)
            raise
        return gateway_pb2.GatewayCancelRunResponse(
            outcome=resp.outcome, run_id=resp.run_id, state=resp.state, dropped_messages=resp.dropped_messages
        )
