"""Client channels between services: bearer token, TLS, trace context, keepalive, size limits, and deadline propagation.

gRPC propagates cancellation between aio calls but not deadlines, so a handler that calls another
service passes `downstream_timeout(context)`: the caller's remaining time, capped by a default.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import grpc
from grpc.aio import ServicerContext

from flynn_runtime import tracing

KEEPALIVE_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]

#: The longest a channel waits between attempts to reconnect to a service that went away. gRPC's
#: default grows to 120 s, so after a long outage a restarted service could be ignored for two
#: minutes; inside the mesh a peer is back within seconds (a restarted pod), so retry every 2 s at most.
MAX_RECONNECT_BACKOFF_S = 2.0
RECONNECT_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", int(MAX_RECONNECT_BACKOFF_S * 1000)),
]

# Retry only when the call never reached a handler (UNAVAILABLE), a few times, with backoff.
_RETRY_SERVICE_CONFIG = json.dumps(
    {
        "methodConfig": [
            {
                "name": [{}],
                "retryPolicy": {
                    "maxAttempts": 3,
                    "initialBackoff": "0.05s",
                    "maxBackoff": "0.5s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    }
)


#: Calls (not connections) are spread over every address a target resolves to: a list of replicas
#: ("10.0.0.1:7002,10.0.0.2:7002") or a headless Service ("dns:///flynn-queue-headless:7002").
BALANCING_OPTIONS: list[tuple[str, Any]] = [("grpc.lb_policy_name", "round_robin")]


def balancing_options(address: str) -> list[tuple[str, Any]]:
    """round_robin for an address that may name several replicas (a list, dns:///, ipv4:/ipv6:);
    one `host:port` keeps gRPC's default pick_first, whose reconnect after a restart of that one
    process is immediate (round_robin fails calls fast while its only subchannel reconnects)."""
    several = "," in address or ":///" in address or address.startswith(("ipv4:", "ipv6:", "dns:"))
    return BALANCING_OPTIONS if several else []


def grpc_target(address: str) -> str:
    """The gRPC target for an address setting: `host:port`, `dns:///name:port` (every A record, kept
    up to date), or a comma-separated list of `ip:port` replicas (the `ipv4:`/`ipv6:` scheme)."""
    if "," not in address or ":///" in address or address.startswith(("ipv4:", "ipv6:")):
        return address
    parts = [a.strip() for a in address.split(",") if a.strip()]
    scheme = "ipv6" if all(p.startswith("[") for p in parts) else "ipv4"
    return f"{scheme}:{','.join(parts)}"


def server_options(
    max_message_bytes: int, max_pending: int, streams_per_connection: int = 1000
) -> list[tuple[str, Any]]:
    return [
        # HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS: streams one connection may have open (flynn_runtime.limits).
        ("grpc.max_concurrent_streams", streams_per_connection),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        # Many nodes and watchers connect at once: raise the pending-request limit (DESIGN.md §12).
        ("grpc.server.max_pending_requests", max_pending),
        ("grpc.server.max_pending_requests_hard_limit", max_pending * 2),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_ping_strikes", 0),
    ]


def auth_metadata(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


class _AuthDetails:
    """Adds the service's bearer token unless the call already carries an authorization header, and
    (tracing on) the current trace context unless the call already carries a traceparent."""

    def __init__(self, token: str, trace: bool = False) -> None:
        self._md = auth_metadata(token)
        self._trace = trace

    def _details(self, d: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        md = list(d.metadata or ())
        if self._md and not any(k == "authorization" for k, _ in md):
            md.extend(self._md)
        if self._trace and not any(k == tracing.TRACEPARENT for k, _ in md):
            md = tracing.inject_metadata(md)
        return grpc.aio.ClientCallDetails(
            d.method, d.timeout, grpc.aio.Metadata(*md), d.credentials, d.wait_for_ready
        )


# grpc.aio files each interceptor under the FIRST call kind it implements (an if/elif chain), so one
# class implementing all four kinds would only ever see unary-unary calls: one class per kind.
class _AuthUnaryUnary(_AuthDetails, grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[type-arg]
    async def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await continuation(self._details(client_call_details), request)


class _AuthUnaryStream(_AuthDetails, grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[type-arg]
    async def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await continuation(self._details(client_call_details), request)


class _AuthStreamUnary(_AuthDetails, grpc.aio.StreamUnaryClientInterceptor):  # type: ignore[type-arg]
    async def intercept_stream_unary(
        self, continuation: Any, client_call_details: Any, request_iterator: Any
    ) -> Any:
        return await continuation(self._details(client_call_details), request_iterator)


class _AuthStreamStream(_AuthDetails, grpc.aio.StreamStreamClientInterceptor):  # type: ignore[type-arg]
    async def intercept_stream_stream(
        self, continuation: Any, client_call_details: Any, request_iterator: Any
    ) -> Any:
        return await continuation(self._details(client_call_details), request_iterator)


def client_channel(
    target: str,
    token: str = "",
    *,
    max_message_bytes: int = 16 * 1024 * 1024,
    retries: bool = True,
    extra_options: Sequence[tuple[str, Any]] = (),
    credentials: grpc.ChannelCredentials | None = None,
) -> grpc.aio.Channel:
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.enable_retries", 1 if retries else 0),
        *KEEPALIVE_OPTIONS,
        *RECONNECT_OPTIONS,
        *balancing_options(target),
        *extra_options,
    ]
    if retries:
        options.append(("grpc.service_config", _RETRY_SERVICE_CONFIG))
    interceptors: list[Any] | None = None
    trace = tracing.ENABLED  # off: no interceptor for tracing at all
    if token or trace:
        interceptors = [
            _AuthUnaryUnary(token, trace),
            _AuthUnaryStream(token, trace),
            _AuthStreamUnary(token, trace),
            _AuthStreamStream(token, trace),
        ]
    return open_channel(target, options, credentials, interceptors)


def open_channel(
    target: str,
    options: Sequence[tuple[str, Any]],
    credentials: grpc.ChannelCredentials | None,
    interceptors: Sequence[Any] | None = None,
) -> grpc.aio.Channel:
    """The one place a channel to a mesh service is opened: TLS (mutual when the credentials carry a
    client certificate, flynn_runtime.tls.channel_credentials) or plaintext when `credentials` is None."""
    target = grpc_target(target)
    if credentials is None:
        return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)
    return grpc.aio.secure_channel(target, credentials, options=options, interceptors=interceptors)


def downstream_timeout(
    context: ServicerContext[Any, Any] | None, default: float, margin: float = 0.005
) -> float:
    """Timeout for a call made while serving `context`: its remaining time less a margin, at most `default`."""
    if context is None:
        return default
    remaining = context.time_remaining()
    if remaining is None:
        return default
    return max(min(default, remaining - margin), 0.001)
