"""The pass-through: a generic handler that forwards each internal method, as raw bytes, to its owner.

What crosses the hop unchanged: request and response bytes (never re-serialised), request metadata
(authorization included; hop-by-hop and pseudo headers dropped; with tracing on, `traceparent` names
the gateway's span of the call instead of the caller's), the caller's remaining deadline,
cancellation (a cancelled caller cancels the downstream call), and the backend's status code,
message and trailing metadata (so rich error details such as BadRequest survive). A backend that
cannot be reached becomes UNAVAILABLE naming the service (never its host or port), with ErrorInfo
reason BACKEND_UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, cast

import grpc
from flynn.v1 import nodes_pb2
from grpc.aio import ServicerContext

from flynn_runtime import rich_status, tracing
from flynn_runtime.auth import HOP_BY_HEADER, HOP_CLIENT_HEADER
from flynn_runtime.channels import downstream_timeout
from flynn_runtime.delivery_trace import DELIVERY_SPAN_HEADER
from flynn_runtime.errors import Code, FlynnError, shutting_down, unavailable
from flynn_runtime.interceptor import abort_with
from gateway.backends import Backends
from gateway.routes import Route

log = logging.getLogger(__name__)

# Unary calls without a caller deadline still get one; streams may stay open for as long as the caller.
UNARY_DEFAULT_TIMEOUT = 300.0
_DEADLINE_MARGIN = 0.005

_HOP_BY_HOP = frozenset(
    {
        "connection",
        "content-type",
        "host",
        "keep-alive",
        "proxy-connection",
        "te",
        "transfer-encoding",
        "upgrade",
        "user-agent",
    }
)
# Headers only the gateway sets on a forwarded call (a caller's are dropped): the client address it
# vouches for, and that it records the delivered spans of a reply stream (flynn_runtime/delivery_trace.py).
_HOP_HEADERS = frozenset(
    {HOP_BY_HEADER, HOP_CLIENT_HEADER, "x-forwarded-for", "x-real-ip", "forwarded", DELIVERY_SPAN_HEADER}
)

# What a stream is told, in its own protocol, before the gateway ends it on SIGTERM.
SHUTDOWN_FAREWELLS: dict[str, bytes] = {
    "/flynn.v1.Nodes/Connect": nodes_pb2.ConnectResponse(
        close=nodes_pb2.NodeClose(
            reason="shutdown", reconnect=True, message="the gateway is shutting down; reconnect"
        )
    ).SerializeToString(),
}

Ctx = ServicerContext[Any, Any]
if TYPE_CHECKING:
    Handler = grpc.RpcMethodHandler[Any, Any]
else:
    Handler = grpc.RpcMethodHandler


def forward_metadata(
    context: Ctx, hop: tuple[tuple[str, str], ...] = ()
) -> tuple[tuple[str, str | bytes], ...]:
    """The caller's metadata minus pseudo, reserved (grpc-*), hop-by-hop and client-address headers
    (a caller never asserts its own address to a backend), plus the gateway's `hop` headers (the real
    client address, vouched for). With tracing on, the caller's traceparent is replaced by the
    gateway's own span (the hop is in the trace)."""
    kept = tuple(
        (k, v)
        for k, v in cast(Iterable[tuple[str, str | bytes]], context.invocation_metadata() or ())
        if not (k.startswith(":") or k.startswith("grpc-") or k in _HOP_BY_HOP or k in _HOP_HEADERS)
    )
    if tracing.ENABLED:
        kept = tuple(tracing.inject_metadata(kept))
    return kept + hop


def stream_timeout(context: Ctx) -> float | None:
    remaining = context.time_remaining()
    if remaining is None:
        return None
    return max(remaining - _DEADLINE_MARGIN, 0.001)


def backend_down(backend: str, address: str, err: grpc.aio.AioRpcError) -> FlynnError:
    """UNAVAILABLE naming the service only: the channel's own message names internal hosts and ports
    ("failed to connect to all addresses; last error: ... 10.0.3.7:50052"), so it is logged here and
    never sent past the edge."""
    log.warning(
        "backend unavailable",
        extra={"backend": backend, "address": address, "detail": err.details() or err.code().name},
    )
    return unavailable(
        f"the {backend} service is unavailable; retry later",
        reason="BACKEND_UNAVAILABLE",
        retry_after=1.0,
        service=backend,
    )


async def relay_error(context: Ctx, err: grpc.aio.AioRpcError, backend: str, address: str) -> None:
    """Abort the served call with the backend's status, message and trailing metadata, unchanged;
    a failure of the channel itself (no backend status) becomes BACKEND_UNAVAILABLE naming it."""
    trailing = cast(tuple[tuple[str, str | bytes], ...], tuple(err.trailing_metadata() or ()))
    code = err.code()
    if code == grpc.StatusCode.UNAVAILABLE and not rich_status.answered(err):
        await abort_with(context, backend_down(backend, address, err))
    await context.abort(code, err.details() or "", trailing_metadata=trailing)


class Forwarder(grpc.GenericRpcHandler):  # type: ignore[type-arg]
    """Generic handler for every routed method; unknown methods fall through (None)."""

    def __init__(
        self,
        backends: Backends,
        routes: Mapping[str, Route],
        external: Mapping[str, Route],
        stopping: asyncio.Event,
    ) -> None:
        self._backends = backends
        self._stopping = stopping
        self._handlers: dict[str, Handler] = {}
        for path, route in routes.items():
            if backends.deployed(route.backend):
                self._handlers[path] = self._make_handler(route)
            else:
                self._handlers[path] = self._refusing_handler(route, not_deployed(route))
        for path, route in external.items():
            self._handlers[path] = self._refusing_handler(route, not_routed(route))

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Handler | None:
        return self._handlers.get(handler_call_details.method)

    # --- errors -------------------------------------------------------------------------------

    async def _relay_error(self, route: Route, context: Ctx, err: grpc.aio.AioRpcError) -> None:
        await relay_error(context, err, route.backend, self._backends.address(route.backend))

    def _shutting_down(self) -> bool:
        """A cancelled downstream stream: true when our SIGTERM cancelled it, not the caller."""
        task = asyncio.current_task()
        return self._stopping.is_set() and (task is None or task.cancelling() == 0)

    # --- handlers -----------------------------------------------------------------------------

    def _make_handler(self, route: Route) -> Handler:
        ch = self._backends.channel(route.backend)
        path = route.method
        if route.kind == "unary":
            return grpc.unary_unary_rpc_method_handler(self._unary(route, ch.unary_unary(path, None, None)))
        if route.kind == "client_stream":
            return grpc.stream_unary_rpc_method_handler(self._unary(route, ch.stream_unary(path, None, None)))
        if route.kind == "server_stream":
            return grpc.unary_stream_rpc_method_handler(
                self._stream(route, ch.unary_stream(path, None, None))
            )
        return grpc.stream_stream_rpc_method_handler(self._stream(route, ch.stream_stream(path, None, None)))

    def _unary(self, route: Route, multicallable: Callable[..., Any]) -> Callable[[Any, Ctx], Any]:
        # Serves unary and client-stream methods: the request (or request iterator) is passed through.
        async def forward(request: Any, context: Ctx) -> bytes:
            try:
                response: bytes = await multicallable(
                    request,
                    timeout=downstream_timeout(context, UNARY_DEFAULT_TIMEOUT, _DEADLINE_MARGIN),
                    metadata=forward_metadata(context, self._backends.hop_metadata()),
                )
                return response
            except grpc.aio.AioRpcError as err:
                await self._relay_error(route, context, err)
                raise  # unreachable: abort raised

        return forward

    def _stream(self, route: Route, multicallable: Callable[..., Any]) -> Callable[[Any, Ctx], Any]:
        # Serves server-stream and bidi methods.
        # On the gateway's own SIGTERM, a stream whose protocol has a goodbye message gets it before
        # UNAVAILABLE/SHUTTING_DOWN, as if the owning service had stopped (NODES.md: NodeClose{shutdown}).
        farewell = SHUTDOWN_FAREWELLS.get(route.method)

        async def forward(request: Any, context: Ctx) -> AsyncIterator[bytes]:
            call = multicallable(
                request,
                timeout=stream_timeout(context),
                metadata=forward_metadata(context, self._backends.hop_metadata()),
            )
            # On SIGTERM the gateway ends open streams (UNAVAILABLE/SHUTTING_DOWN) so callers reconnect.
            watcher = asyncio.ensure_future(self._stopping.wait())
            watcher.add_done_callback(lambda _f: call.cancel())
            try:
                async for response in call:
                    yield response
            except grpc.aio.AioRpcError as err:
                if err.code() == grpc.StatusCode.CANCELLED and self._shutting_down():
                    if farewell is not None:
                        yield farewell
                    await abort_with(context, shutting_down("gateway"))
                await self._relay_error(route, context, err)
            except asyncio.CancelledError:
                if self._shutting_down():
                    if farewell is not None:
                        yield farewell
                    await abort_with(context, shutting_down("gateway"))
                raise
            finally:
                watcher.cancel()
                call.cancel()

        return forward

    def _refusing_handler(self, route: Route, err: FlynnError) -> Handler:
        async def refuse(request: Any, context: Ctx) -> Any:
            await abort_with(context, err)

        async def refuse_stream(request: Any, context: Ctx) -> AsyncIterator[bytes]:
            await abort_with(context, err)
            yield b""  # pragma: no cover - makes this an async generator

        if route.kind == "unary":
            return grpc.unary_unary_rpc_method_handler(refuse)
        if route.kind == "client_stream":
            return grpc.stream_unary_rpc_method_handler(refuse)
        if route.kind == "server_stream":
            return grpc.unary_stream_rpc_method_handler(refuse_stream)
        return grpc.stream_stream_rpc_method_handler(refuse_stream)


def not_routed(route: Route) -> FlynnError:
    service = route.method.split("/")[1]
    message = (
        f"{service} is implemented by external agents and called by run control directly; "
        "the gateway does not route it"
    )
    return FlynnError(Code.UNIMPLEMENTED, message, reason="NOT_ROUTED")


def not_deployed(route: Route) -> FlynnError:
    service = route.method.split("/")[1]
    return FlynnError(
        Code.UNIMPLEMENTED,
        f"{service} is not deployed here (the {route.backend} service is left out of this mesh)",
        reason="NOT_DEPLOYED",
        metadata={"service": route.backend},
    )
