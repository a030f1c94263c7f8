"""Prometheus metrics: the standard gRPC server figures and the metrics HTTP port."""

from __future__ import annotations

import logging
import threading

from prometheus_client import Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

GRPC_STARTED = Counter(
    "grpc_server_started_total", "RPCs started on the server.", ["grpc_service", "grpc_method", "grpc_type"]
)
GRPC_HANDLED = Counter(
    "grpc_server_handled_total",
    "RPCs completed on the server, by status code.",
    ["grpc_service", "grpc_method", "grpc_type", "grpc_code"],
)
GRPC_HANDLING = Histogram(
    "grpc_server_handling_seconds",
    "Time from RPC start to completion on the server.",
    ["grpc_service", "grpc_method", "grpc_type"],
    buckets=LATENCY_BUCKETS,
)
GRPC_MSG_SENT = Counter(
    "grpc_server_msg_sent_total",
    "Stream messages sent by the server.",
    ["grpc_service", "grpc_method", "grpc_type"],
)
GATEWAY_CALLS = Counter(
    "flynn_gateway_calls_total",
    "Calls the gateway answered, by status code and class (ok, caller_error, server_error).",
    ["grpc_code", "code_class"],
)
AUTH_REFUSED = Counter(
    "flynn_auth_refused_total",
    "Calls refused by authentication or authorization, by reason (MISSING_TOKEN, INVALID_TOKEN, "
    "AUTH_RATE_LIMITED, ROLE_NOT_ALLOWED, TOKEN_REVOKED).",
    ["reason"],
)
SERVICE_INFO = Gauge("flynn_service_info", "Static information about this process.", ["service", "version"])
CONFIG_APPLIED_REVISION = Gauge("config_applied_revision", "Config revision this process applied last.")
CONFIG_STALENESS = Gauge(
    "config_staleness_seconds", "Seconds since this process last heard from the config service."
)

# Failures the server owns (an operator must look); every other non-OK code is the caller's doing:
# bad input, missing or refused credentials, unknown ids, limits, a caller that gave up.
SERVER_ERROR_CODES = frozenset(
    {"UNKNOWN", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "DEADLINE_EXCEEDED", "UNIMPLEMENTED"}
)
CODE_CLASSES = ("ok", "caller_error", "server_error")


def code_class(code_name: str) -> str:
    """A gRPC status code name's class: ok, caller_error or server_error (the error_rate gate)."""
    if code_name == "OK":
        return "ok"
    return "server_error" if code_name in SERVER_ERROR_CODES else "caller_error"


_started_lock = threading.Lock()


def start_metrics_server(listen: str) -> int:
    """Serve /metrics on host:port (port 0 picks one); returns the bound port, or 0 when disabled."""
    if not listen:
        return 0
    host, _, port = listen.rpartition(":")
    with _started_lock:
        server, _thread = start_http_server(int(port), addr=host or "0.0.0.0")
    bound = int(server.server_port)
    log.info("metrics listening", extra={"address": f"{host}:{bound}"})
    return bound
