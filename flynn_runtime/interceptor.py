"""One server interceptor for every service: call limits, authentication, metrics, and error mapping.

Handlers raise FlynnError (from domain code) and the interceptor aborts the RPC with the rich
status; any other exception is logged with its traceback and returned as a bare INTERNAL, so no
traceback ever reaches a caller. Streaming handlers are async generators.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from grpc.aio import ServicerContext

from flynn_runtime import metrics
from flynn_runtime.auth import Authenticator, current_principal
from flynn_runtime.errors import Code, FlynnError
from flynn_runtime.ids import ulid
from flynn_runtime.limits import (
    REFLECTION_POLICY_METHOD,
    CallLimiter,
    Limits,
    is_public_stream,
    is_reflection,
)
from flynn_runtime.rich_status import to_grpc_status

log = logging.getLogger(__name__)


def _split(method: str) -> tuple[str, str]:
    _, service, name = method.split("/", 2) if method.count("/") >= 2 else ("", "unknown", method)
    return service, name


def _rpc_type(handler: grpc.RpcMethodHandler[Any, Any]) -> str:
    if handler.request_streaming and handler.response_streaming:
        return "bidi_stream"
    if handler.request_streaming:
        return "client_stream"
    if handler.response_streaming:
        return "server_stream"
    return "unary"


async def abort_with(context: ServicerContext[Any, Any], err: FlynnError) -> None:
    status = to_grpc_status(err)
    await context.abort(status.code, status.details, trailing_metadata=status.trailing_metadata)


class _MethodMetrics:
    """The metric children of one method, resolved once (labels() costs a locked dict lookup per call)."""

    def __init__(self, method: str, rpc_type: str) -> None:
        self.service, self.name = _split(method)
        self.rpc_type = rpc_type
        self.public = is_public_stream(method)
        self.reflection = is_reflection(method)
        self.started = metrics.GRPC_STARTED.labels(self.service, self.name, rpc_type)
        self.handling = metrics.GRPC_HANDLING.labels(self.service, self.name, rpc_type)
        self.sent = metrics.GRPC_MSG_SENT.labels(self.service, self.name, rpc_type)
        self._handled: dict[grpc.StatusCode, Any] = {}

    def handled(self, code: grpc.StatusCode) -> Any:
        child = self._handled.get(code)
        if child is None:
            child = self._handled[code] = metrics.GRPC_HANDLED.labels(
                self.service, self.name, self.rpc_type, code.name
            )
        return child


class _Call:
    """Bookkeeping of one RPC: auth before, metrics after, error mapping around."""

    __slots__ = ("interceptor", "method", "m", "start", "code", "slot")

    def __init__(self, interceptor: ServerInterceptor, method: str, m: _MethodMetrics) -> None:
        self.interceptor = interceptor
        self.method = method
        self.m = m
        self.start = time.perf_counter()
        self.code = grpc.StatusCode.OK
        self.slot = False

    def begin(self, context: ServicerContext[Any, Any]) -> None:
        self.m.started.inc()
        ic = self.interceptor
        ic.limiter.acquire(self.m.public)
        self.slot = True
        md = {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
        policy_method = self.method
        if self.m.reflection and ic.limiter.limits.reflection_requires_token:
            policy_method = REFLECTION_POLICY_METHOD
        principal = ic.authenticator.authenticate(policy_method, md, context.peer() or "")
        current_principal.set(principal)

    async def fail(self, context: ServicerContext[Any, Any], exc: BaseException) -> None:
        if isinstance(exc, FlynnError):
            self.code = getattr(grpc.StatusCode, exc.code.value)
            await abort_with(context, exc)
        incident = ulid()
        log.error(
            "unhandled error in %s (incident %s)",
            self.method,
            incident,
            exc_info=exc,
            extra={"incident": incident},
        )
        self.code = grpc.StatusCode.INTERNAL
        await context.abort(grpc.StatusCode.INTERNAL, f"internal error (incident {incident})")

    def finish(self, context: ServicerContext[Any, Any], exc: BaseException | None) -> None:
        if self.slot:
            self.slot = False
            self.interceptor.limiter.release(self.m.public)
        if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
            self.code = grpc.StatusCode.CANCELLED
        elif isinstance(exc, grpc.aio.AbortError) or exc is None:
            code = context.code()
            if isinstance(code, grpc.StatusCode):
                self.code = code
            elif code is not None and exc is not None:
                self.code = next((c for c in grpc.StatusCode if c.value[0] == code), grpc.StatusCode.UNKNOWN)
        self.m.handled(self.code).inc()
        self.m.handling.observe(time.perf_counter() - self.start)


class _Undecodable:
    """Stands in for a request whose bytes do not parse as the method's message type."""

    __slots__ = ("error",)

    def __init__(self, error: str) -> None:
        self.error = error


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """A deserializer that never raises: grpc would turn a parse error into UNKNOWN with the
    exception text; the handler wrapper turns the stand-in into INVALID_ARGUMENT instead."""
    if deserializer is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as e:  # noqa: BLE001 - DecodeError or whatever the parser raises
            return _Undecodable(str(e) or type(e).__name__)

    return parse


def _malformed(method: str, u: _Undecodable) -> FlynnError:
    return FlynnError(
        Code.INVALID_ARGUMENT,
        f"the request is not a valid {method} request message: {u.error}",
        reason="MALFORMED_REQUEST",
    )


async def _checked(method: str, requests: Any) -> AsyncIterator[Any]:
    async for item in requests:
        if isinstance(item, _Undecodable):
            raise _malformed(method, item)
        yield item


def _check(method: str, request: Any, streaming: bool) -> Any:
    if streaming:
        return _checked(method, request) if hasattr(request, "__aiter__") else request
    if isinstance(request, _Undecodable):
        raise _malformed(method, request)
    return request


class ServerInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    def __init__(self, authenticator: Authenticator, limits: Limits | None = None) -> None:
        self.authenticator = authenticator
        self.limiter = CallLimiter(limits or Limits())
        # method -> (the handler we wrapped, its wrapper): handlers are long-lived objects, so the
        # wrapper is built once per method instead of once per call.
        self._wrapped: dict[str, tuple[Any, grpc.RpcMethodHandler[Any, Any]]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None  # type: ignore[return-value]
        method = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(method, handler)
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler[Any, Any]) -> grpc.RpcMethodHandler[Any, Any]:
        rpc_type = _rpc_type(handler)
        m = _MethodMetrics(method, rpc_type)
        kw = {
            "request_deserializer": _tolerant(handler.request_deserializer),
            "response_serializer": handler.response_serializer,
        }
        if rpc_type == "unary":
            return grpc.unary_unary_rpc_method_handler(self._unary(method, m, handler.unary_unary), **kw)
        if rpc_type == "client_stream":
            return grpc.stream_unary_rpc_method_handler(self._unary(method, m, handler.stream_unary), **kw)
        if rpc_type == "server_stream":
            return grpc.unary_stream_rpc_method_handler(self._stream(method, m, handler.unary_stream), **kw)
        return grpc.stream_stream_rpc_method_handler(self._stream(method, m, handler.stream_stream), **kw)

    def _unary(self, method: str, m: _MethodMetrics, inner: Any) -> Any:
        client_stream = m.rpc_type == "client_stream"

        async def wrapper(request: Any, context: ServicerContext[Any, Any]) -> Any:
            call = _Call(self, method, m)
            exc: BaseException | None = None
            try:
                call.begin(context)
                return await inner(_check(method, request, client_stream), context)
            except grpc.aio.AbortError as e:
                exc = e
                raise
            except (asyncio.CancelledError, GeneratorExit) as e:
                exc = e
                raise
            except Exception as e:  # noqa: BLE001 - mapped to a status, never leaked
                exc = e
                await call.fail(context, e)
            finally:
                call.finish(context, exc)

        return wrapper

    def _stream(self, method: str, m: _MethodMetrics, inner: Any) -> Any:
        bidi = m.rpc_type == "bidi_stream"

        async def wrapper(request: Any, context: ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            call = _Call(self, method, m)
            exc: BaseException | None = None
            sent = m.sent
            try:
                call.begin(context)
                result = inner(_check(method, request, bidi), context)
                if hasattr(result, "__aiter__"):
                    async for item in result:
                        sent.inc()
                        yield item
                else:  # handler wrote with context.write and returned a coroutine
                    await result
            except grpc.aio.AbortError as e:
                exc = e
                raise
            except (asyncio.CancelledError, GeneratorExit) as e:
                exc = e
                raise
            except Exception as e:  # noqa: BLE001
                exc = e
                await call.fail(context, e)
            finally:
                call.finish(context, exc)

        return wrapper
