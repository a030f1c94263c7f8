"""InvokeNode forwarded to the nodes replica that holds the node's Connect stream.

The replica that received the call found no stream here; presence (nodes_svc/presence.py) named the
live replica that has it. The same request goes there over gRPC with the caller's remaining time
(capped by the invoke timeout) and a marker header, so the owner never forwards again (it answers
from its own streams or fails). The owner's answer, progress and result and any rich error, is relayed
as it is. A replica that cannot be reached fails fast with UNAVAILABLE / NODE_OWNER_UNREACHABLE:
its lease expires within the presence TTL and the node, reconnecting, lands on a live replica.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict
from collections.abc import AsyncIterator

import grpc
from flynn.v1 import nodes_pb2, nodes_pb2_grpc

from flynn_runtime import errors
from flynn_runtime.channels import client_channel
from flynn_runtime.errors import Code, FlynnError
from flynn_runtime.rich_status import from_rpc_error
from nodes_svc import metrics

#: Metadata key set on a forwarded call (value: the forwarding replica's id).
# Not the gateway's x-flynn-forwarded-by (flynn_runtime/auth.py), which every call through the gateway carries.
FORWARDED_BY = "x-flynn-nodes-forwarded-from"
#: Extra time the forwarding hop gives the owner beyond the invoke's own deadline, so the owner's
#: INVOKE_DEADLINE_EXCEEDED (naming the node) arrives rather than a bare hop deadline.
HOP_MARGIN = 0.25
MAX_CHANNELS = 32


class InvokeForwarder:
    def __init__(self, token: str, replica_id: str, max_message_bytes: int = 16 * 1024 * 1024) -> None:
        self.token = token
        self.replica_id = replica_id
        self.max_message_bytes = max_message_bytes
        self._channels: OrderedDict[str, grpc.aio.Channel] = OrderedDict()
        self.forwarded = 0

    def _channel(self, address: str) -> grpc.aio.Channel:
        ch = self._channels.get(address)
        if ch is None:
            # No retries: an UNAVAILABLE owner must surface at once, not after three attempts.
            ch = client_channel(address, self.token, max_message_bytes=self.max_message_bytes, retries=False)
            self._channels[address] = ch
            while len(self._channels) > MAX_CHANNELS:
                _, old = self._channels.popitem(last=False)
                self._close_later(old)
        else:
            self._channels.move_to_end(address)
        return ch

    @staticmethod
    def _close_later(ch: grpc.aio.Channel) -> None:
        asyncio.get_running_loop().create_task(ch.close(grace=1.0))

    async def invoke(
        self, address: str, node_id: str, request: nodes_pb2.InvokeNodeRequest, timeout_s: float
    ) -> AsyncIterator[nodes_pb2.InvokeNodeResponse]:
        req = nodes_pb2.InvokeNodeRequest()
        req.CopyFrom(request)
        req.timeout_ms = max(1, int(timeout_s * 1000))
        stub = nodes_pb2_grpc.NodesStub(self._channel(address))
        self.forwarded += 1
        call = stub.InvokeNode(
            req, timeout=timeout_s + HOP_MARGIN, metadata=((FORWARDED_BY, self.replica_id),)
        )
        outcome = "ok"
        try:
            async for item in call:
                yield item
        except grpc.aio.AioRpcError as e:
            outcome = e.code().name.lower()
            rich = from_rpc_error(e)
            if rich is not None:
                raise rich from None
            if e.code() == grpc.StatusCode.UNAVAILABLE:
                raise errors.unavailable(
                    f"node {node_id!r} is connected to replica {address}, which cannot be reached: {e.details()}",
                    reason="NODE_OWNER_UNREACHABLE",
                    retry_after=1.0,
                    node_id=node_id,
                    owner=address,
                ) from None
            if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise FlynnError(
                    Code.DEADLINE_EXCEEDED,
                    f"invoke on node {node_id!r} (via replica {address}) missed its deadline",
                    reason="INVOKE_DEADLINE_EXCEEDED",
                    metadata={"node_id": node_id},
                ) from None
            raise FlynnError(
                Code(e.code().name) if e.code().name in Code.__members__ else Code.UNAVAILABLE,
                f"forwarded invoke failed: {e.details()}",
                reason="FORWARD_FAILED",
                metadata={"node_id": node_id, "owner": address},
            ) from None
        finally:
            call.cancel()
            metrics.INVOKES_FORWARDED.labels(outcome).inc()

    async def close(self) -> None:
        for ch in self._channels.values():
            with contextlib.suppress(Exception):
                await ch.close(grace=0.5)
        self._channels.clear()
