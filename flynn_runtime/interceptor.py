"""One server interceptor for every service: call limits, authentication, metrics, traces, and error mapping.

Handlers raise FlynnError (from domain code) and the interceptor aborts the RPC with the rich
status; any other exception is logged with its traceback and returned as a bare INTERNAL, so no
traceback ever reaches a caller. Streaming handlers are async generators (plain functions and
generators work too). What a handler meant without a FlynnError is honoured, never turned into
INTERNAL: NotImplementedError (a contract method without implementation) is UNIMPLEMENTED, and a code
the handler set on the context before raising is answered as set.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from grpc.aio import ServicerContext

from flynn_runtime import errors, metrics, tracing
from flynn_runtime.auth import Authenticator, Principal, current_principal
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

    def __init__(self, method: str, rpc_type: str, by_class: bool = False) -> None:
        self.service, self.name = _split(method)
        self.rpc_type = rpc_type
        self.by_class = by_class
        self.public = is_public_stream(method)
        self.reflection = is_reflection(method)
        self.started = metrics.GRPC_STARTED.labels(self.service, self.name, rpc_type)
        self.handling = metrics.GRPC_HANDLING.labels(self.service, self.name, rpc_type)
        self.sent = metrics.GRPC_MSG_SENT.labels(self.service, self.name, rpc_type)
        self._handled: dict[grpc.StatusCode, tuple[Any, ...]] = {}

    def handled(self, code: grpc.StatusCode) -> tuple[Any, ...]:
        """The counters one call with this code increments (the per-class one only on the gateway)."""
        children = self._handled.get(code)
        if children is None:
            children = (metrics.GRPC_HANDLED.labels(self.service, self.name, self.rpc_type, code.name),)
            if self.by_class:
                children += (metrics.GATEWAY_CALLS.labels(code.name, metrics.code_class(code.name)),)
            self._handled[code] = children
        return children


class _Call:
    """Bookkeeping of one RPC: auth before, metrics after, error mapping around."""

    __slots__ = ("interceptor", "method", "m", "start", "code", "span", "slot")

    def __init__(self, interceptor: ServerInterceptor, method: str, m: _MethodMetrics) -> None:
        self.interceptor = interceptor
        self.method = method
        self.m = m
        self.start = time.perf_counter()
        self.code = grpc.StatusCode.OK
        self.span: Any = None
        self.slot = False

    def begin(self, context: ServicerContext[Any, Any]) -> Principal | None:
        self.m.started.inc()
        ic = self.interceptor
        ic.limiter.acquire(self.m.public)
        self.slot = True
        raw = context.invocation_metadata() or ()
        if tracing.ENABLED:  # the RPC's SERVER span, child of the caller's traceparent, current from here
            self.span = tracing.server_span(self.method, raw)
        md = {k: v for k, v in raw if isinstance(v, str)}
        policy_method = self.method
        if self.m.reflection and ic.limiter.limits.reflection_requires_token:
            policy_method = REFLECTION_POLICY_METHOD
        principal = ic.authenticator.authenticate(policy_method, md, context.peer() or "")
        current_principal.set(principal)
        return principal

    async def fail(self, context: ServicerContext[Any, Any], exc: BaseException) -> None:
        if isinstance(exc, FlynnError):
            self.code = getattr(grpc.StatusCode, exc.code.value)
            await abort_with(context, exc)
        expected = _unexpected_but_meant(self.method, context, exc)
        if expected is not None:
            self.code = getattr(grpc.StatusCode, expected.code.value)
            await abort_with(context, expected)
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
        for counter in self.m.handled(self.code):
            counter.inc()
        self.m.handling.observe(time.perf_counter() - self.start)
        if self.span is not None:
            tracing.end_server_span(self.span, self.code.name)


def _preset_code(context: ServicerContext[Any, Any]) -> grpc.StatusCode | None:
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    if isinstance(code, int):
        return next((c for c in grpc.StatusCode if c.value[0] == code), None)
    return None


def _unexpected_but_meant(
    method: str, context: ServicerContext[Any, Any], exc: BaseException
) -> FlynnError | None:
    """A handler that failed in a way the interceptor did not ask for, but meant a status: a method
    with no implementation (NotImplementedError, as every generated servicer base raises) or a
    handler that set a non-OK code on the context before raising. Neither is a bug of the call, so
    neither becomes INTERNAL; the code the handler chose (or UNIMPLEMENTED) is answered instead."""
    preset = _preset_code(context)
    if preset is not None and preset not in (grpc.StatusCode.OK, grpc.StatusCode.UNKNOWN):
        if preset is not grpc.StatusCode.INTERNAL and preset.name in Code.__members__:
            details = context.details() if hasattr(context, "details") else None
            text = details.decode() if isinstance(details, bytes) else str(details or "")
            return FlynnError(Code[preset.name], text or f"{method}: {preset.name.lower()}")
    if isinstance(exc, NotImplementedError):
        return FlynnError(
            Code.UNIMPLEMENTED, f"{method} is not implemented by this server", reason="NOT_IMPLEMENTED"
        )
    return None


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
    def __init__(
        self, authenticator: Authenticator, limits: Limits | None = None, count_calls_by_class: bool = False
    ) -> None:
        self.authenticator = authenticator
        self.limiter = CallLimiter(limits or Limits())
        # The gateway counts every call it answers by status class (flynn_gateway_calls_total).
        self.count_calls_by_class = count_calls_by_class
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
            return None
        method = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(method, handler)
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler[Any, Any]) -> grpc.RpcMethodHandler[Any, Any]:
        rpc_type = _rpc_type(handler)
        m = _MethodMetrics(method, rpc_type, self.count_calls_by_class)
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
                result = inner(_check(method, request, client_stream), context)
                # A plain function (not a coroutine function) is a handler too: never INTERNAL for that.
                return await result if inspect.isawaitable(result) else result
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
            auth = self.authenticator
            principal: Principal | None = None
            task: asyncio.Task[object] | None = None
            try:
                principal = call.begin(context)
                task = auth.stream_opened(principal)
                result = inner(_check(method, request, bidi), context)
                if hasattr(result, "__aiter__"):
                    async for item in result:
                        sent.inc()
                        yield item
                elif hasattr(result, "__iter__"):  # a plain generator is a streaming handler too
                    for item in result:
                        sent.inc()
                        yield item
                elif inspect.isawaitable(result):  # handler wrote with context.write and returned a coroutine
                    await result
            except grpc.aio.AbortError as e:
                exc = e
                raise
            except asyncio.CancelledError as e:
                if auth.was_cut(task):
                    # The credential was revoked (Authenticator.cut_streams cancelled this task): end
                    # with UNAUTHENTICATED; finish() then reads the code from the context.
                    revoked = errors.unauthenticated(
                        "the credential of this stream was revoked", "TOKEN_REVOKED"
                    )
                    await abort_with(context, revoked)
                exc = e
                raise
            except GeneratorExit as e:
                exc = e
                raise
            except Exception as e:  # noqa: BLE001
                exc = e
                await call.fail(context, e)
            finally:
                auth.stream_closed(principal, task)
                call.finish(context, exc)

        return wrapper
