"""flynn.v1.Nodes servicer: validate, call the registry, relay. Connect is authenticated in-band."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import re
from collections.abc import AsyncIterator
from typing import Any

from flynn.v1 import nodes_pb2, nodes_pb2_grpc
from grpc.aio import ServicerContext

from flynn_runtime import auth, errors
from flynn_runtime.errors import FlynnError
from flynn_runtime.server import Runtime
from flynn_runtime.validation import Violations, page_size
from nodes_svc.invoke_forwarder import FORWARDED_BY, InvokeForwarder
from nodes_svc.node_registry import PROTOCOL_VERSION, NodeRegistry, NodeSession, SessionClose, event_proto
from nodes_svc.presence import Presence

NODE_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
ROLE_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
COMMAND_RE = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
MAX_CAPABILITIES = 256
MAX_ARGS_BYTES = 64 * 1024
DEFAULT_INVOKE_TIMEOUT = 10.0
MAX_INVOKE_TIMEOUT_MS = 300_000
DEADLINE_MARGIN = 0.005
REGISTER_WITHIN = 10.0

Ctx = ServicerContext[Any, Any]


def _pattern(v: Violations, field: str, value: str, rx: re.Pattern[str], what: str) -> None:
    if not value:
        v.add(field, "is required")
    elif not rx.match(value):
        v.add(field, f"must be {what}")


def validate_register(reg: nodes_pb2.NodeRegister) -> None:
    v = Violations()
    _pattern(v, "register.node_id", reg.node_id, NODE_ID_RE, "1..128 characters of A-Z a-z 0-9 . _ -")
    v.text("register.token", reg.token, required=True, max_bytes=512)
    _pattern(v, "register.role", reg.role, ROLE_RE, "1..64 characters of A-Z a-z 0-9 . _ -")
    if len(reg.capabilities) > MAX_CAPABILITIES:
        v.add("register.capabilities", f"at most {MAX_CAPABILITIES} commands")
    for i, cap in enumerate(reg.capabilities[:MAX_CAPABILITIES]):
        _pattern(v, f"register.capabilities[{i}]", cap, COMMAND_RE, "1..128 characters of A-Z a-z 0-9 . _ -")
    if reg.protocol_version != PROTOCOL_VERSION:
        v.add(
            "register.protocol_version",
            f"unsupported version {reg.protocol_version}; this server speaks {PROTOCOL_VERSION}",
        )
    v.text("register.display_name", reg.display_name, max_bytes=200)
    v.text("register.platform", reg.platform, max_bytes=64)
    v.raise_if_any()


def encode_page_token(last: str) -> str:
    return base64.urlsafe_b64encode(last.encode("utf-8")).decode("ascii")


def decode_page_token(token: str) -> str:
    if not token:
        return ""
    try:
        return base64.urlsafe_b64decode(token.encode("ascii")).decode("utf-8")
    except (binascii.Error, UnicodeError, ValueError):
        raise errors.invalid_argument("page_token", "is not a token from a previous response") from None


class NodesServicer(nodes_pb2_grpc.NodesServicer):
    def __init__(
        self,
        runtime: Runtime,
        registry: NodeRegistry,
        presence: Presence | None = None,
        forwarder: InvokeForwarder | None = None,
    ) -> None:
        self.runtime = runtime
        self.registry = registry
        #: Set with several replicas on one database: invokes for a node whose stream is on another
        #: replica are forwarded there.
        self.presence = presence
        self.forwarder = forwarder

    # Connect ------------------------------------------------------------------------------

    async def Connect(
        self, request_iterator: AsyncIterator[nodes_pb2.ConnectRequest], context: Ctx
    ) -> AsyncIterator[nodes_pb2.ConnectResponse]:
        if self.runtime.stopping.is_set():
            raise self.runtime.shutting_down_error()
        try:
            first = await asyncio.wait_for(anext(aiter(request_iterator)), REGISTER_WITHIN)
        except StopAsyncIteration:
            raise errors.invalid_argument("register", "the stream ended before a Register message") from None
        except TimeoutError:
            raise errors.invalid_argument(
                "register", f"no Register message within {REGISTER_WITHIN:.0f} s"
            ) from None
        if first.WhichOneof("message") != "register":
            raise errors.invalid_argument("register", "the first message on Connect must be a Register")
        validate_register(first.register)
        session, registered = await self.registry.register(
            first.register, auth.client_address() or context.peer() or ""
        )
        if self.runtime.stopping.is_set():  # registered while the stop hook was closing streams
            session.close("shutdown", "the nodes service is shutting down")
        reader = asyncio.create_task(self._read(request_iterator, session))
        try:
            yield nodes_pb2.ConnectResponse(registered=registered)
            while True:
                msg = await session.outbound.get()
                if isinstance(msg, SessionClose):
                    yield nodes_pb2.ConnectResponse(
                        close=nodes_pb2.NodeClose(
                            reason=msg.reason, reconnect=msg.reconnect, message=msg.message
                        )
                    )
                    raise FlynnError(
                        msg.code,
                        f"stream closed: {msg.message}",
                        reason=msg.reason.upper(),
                        metadata={"node_id": session.node_id, "reconnect": str(msg.reconnect).lower()},
                    )
                yield msg
        finally:
            reader.cancel()
            self.registry.end_session(session)

    async def _read(self, requests: AsyncIterator[nodes_pb2.ConnectRequest], session: NodeSession) -> None:
        reg = self.registry
        try:
            async for req in requests:
                kind = req.WhichOneof("message")
                if kind == "heartbeat":
                    reg.on_heartbeat(session)
                elif kind == "result":
                    reg.on_result(session, req.result)
                elif kind == "progress":
                    reg.on_progress(session, req.progress)
                elif kind == "register":
                    session.close("protocol_error", "Register may only be sent once per stream")
                    return
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - the peer went away; the stream ends below
            pass
        session.close("stream_closed", "the node closed its side of the stream")

    # Invoke -------------------------------------------------------------------------------

    async def InvokeNode(
        self, request: nodes_pb2.InvokeNodeRequest, context: Ctx
    ) -> AsyncIterator[nodes_pb2.InvokeNodeResponse]:
        v = Violations()
        _pattern(v, "node_id", request.node_id, NODE_ID_RE, "1..128 characters of A-Z a-z 0-9 . _ -")
        _pattern(v, "command", request.command, COMMAND_RE, "1..128 characters of A-Z a-z 0-9 . _ -")
        if v.text("args_json", request.args_json, max_bytes=MAX_ARGS_BYTES) and request.args_json:
            try:
                json.loads(request.args_json)
            except ValueError as e:
                v.add("args_json", f"is not valid JSON: {e}")
        v.int_range("timeout_ms", request.timeout_ms, 0, MAX_INVOKE_TIMEOUT_MS)
        v.text("idempotency_key", request.idempotency_key, max_bytes=128)
        v.raise_if_any()
        timeout = request.timeout_ms / 1000 if request.timeout_ms else DEFAULT_INVOKE_TIMEOUT
        remaining = context.time_remaining()
        if remaining is not None:
            caller = remaining - DEADLINE_MARGIN
            timeout = min(timeout, caller) if request.timeout_ms else caller
        timeout = max(timeout, 0.001)
        if (
            self.presence is not None
            and self.forwarder is not None
            and not self.registry.has_stream(request.node_id)
        ):
            forwarded = any(k == FORWARDED_BY for k, _ in (context.invocation_metadata() or ()))
            owner = None if forwarded else await self.presence.owner_of(request.node_id)
            if owner is not None:
                async for item in self.forwarder.invoke(owner.address, request.node_id, request, timeout):
                    yield item
                return
        async for item in self.registry.invoke(
            request.node_id,
            request.command,
            request.args_json or "{}",
            timeout_s=timeout,
            idempotency_key=request.idempotency_key,
        ):
            yield item

    # Reads --------------------------------------------------------------------------------

    async def ListNodes(
        self, request: nodes_pb2.ListNodesRequest, context: Ctx
    ) -> nodes_pb2.ListNodesResponse:
        v = Violations()
        v.enum_known("status", request.status, nodes_pb2.NodeStatus.values())
        v.raise_if_any()
        size = page_size(request.page_size, default=100, maximum=1000)
        after = decode_page_token(request.page_token)
        nodes = await self.registry.list_nodes(after, size + 1, request.status)
        more = len(nodes) > size
        nodes = nodes[:size]
        return nodes_pb2.ListNodesResponse(
            nodes=nodes, next_page_token=encode_page_token(nodes[-1].node_id) if more and nodes else ""
        )

    async def GetNode(self, request: nodes_pb2.GetNodeRequest, context: Ctx) -> nodes_pb2.GetNodeResponse:
        v = Violations()
        _pattern(v, "node_id", request.node_id, NODE_ID_RE, "1..128 characters of A-Z a-z 0-9 . _ -")
        v.raise_if_any()
        return nodes_pb2.GetNodeResponse(node=await self.registry.get_node(request.node_id))

    # Tokens -------------------------------------------------------------------------------

    async def IssueNodeToken(
        self, request: nodes_pb2.IssueNodeTokenRequest, context: Ctx
    ) -> nodes_pb2.IssueNodeTokenResponse:
        v = Violations()
        _pattern(v, "node_id", request.node_id, NODE_ID_RE, "1..128 characters of A-Z a-z 0-9 . _ -")
        _pattern(v, "role", request.role, ROLE_RE, "1..64 characters of A-Z a-z 0-9 . _ -")
        v.text("description", request.description, max_bytes=512)
        v.raise_if_any()
        issued = await self.registry.issue_token(request.node_id, request.role, request.description)
        return nodes_pb2.IssueNodeTokenResponse(
            token_id=issued.token_id, token=issued.token, node_id=issued.node_id, role=issued.role
        )

    async def RevokeNodeToken(
        self, request: nodes_pb2.RevokeNodeTokenRequest, context: Ctx
    ) -> nodes_pb2.RevokeNodeTokenResponse:
        v = Violations()
        v.identifier("token_id", request.token_id, max_len=128)
        v.text("reason", request.reason, max_bytes=512)
        v.raise_if_any()
        already, closed = await self.registry.revoke_token(request.token_id, request.reason)
        return nodes_pb2.RevokeNodeTokenResponse(already_revoked=already, closed_streams=closed)

    # Events -------------------------------------------------------------------------------

    async def WatchNodeEvents(
        self, request: nodes_pb2.WatchNodeEventsRequest, context: Ctx
    ) -> AsyncIterator[nodes_pb2.WatchNodeEventsResponse]:
        if request.after_seq < 0:
            raise errors.invalid_argument("after_seq", "must be >= 0")
        async for item in self.registry.watch_events(request.after_seq, self.runtime.stopping):
            yield nodes_pb2.WatchNodeEventsResponse(event=event_proto(item))
        raise self.runtime.shutting_down_error()  # the service is stopping: reconnect with the cursor
