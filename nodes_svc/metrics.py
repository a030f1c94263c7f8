"""Domain metrics of the nodes process (nodes and canvas); the gRPC server figures come from the runtime."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from flynn_runtime.metrics import LATENCY_BUCKETS

REGISTRATIONS = Counter(
    "nodes_registrations_total",
    "Register attempts on Nodes.Connect, by result (ok, refused) and reason (new, resumed, or the refusal reason).",
    ["result", "reason"],
)
RECONNECTS = Counter(
    "nodes_reconnects_total",
    "Register attempts by nodes that had registered before, by result (success, failure) and reason.",
    ["result", "reason"],
)
# The successful kinds exist from the start (at 0), so Prometheus' increase() over a window counts a
# first reconnect of either kind too, as `flynn gates check` does (node_reconnect_success gate).
for _reason in ("resumed", "replaced"):
    RECONNECTS.labels("success", _reason)
DISCONNECTS = Counter("nodes_disconnects_total", "Node streams ended, by reason.", ["reason"])
ONLINE = Gauge("nodes_online", "Nodes with a live Connect stream in this process.")
INVOKES = Counter(
    "nodes_invokes_total",
    "InvokeNode calls by result (ok, error, deadline_exceeded, unavailable, refused, cached).",
    ["result"],
)
INVOKE_LATENCY = Histogram(
    "nodes_invoke_latency_seconds",
    "InvokeNode latency from dispatch to the node's result.",
    buckets=LATENCY_BUCKETS,
)
CANVAS_OPS = Counter(
    "canvas_ops_total", "Canvas operations by op (put, get, list, delete) and result.", ["op", "result"]
)
CANVAS_LATENCY = Histogram(
    "canvas_op_latency_seconds", "Canvas operation latency by op.", ["op"], buckets=LATENCY_BUCKETS
)
CANVAS_BYTES = Gauge("canvas_stored_bytes", "Bytes of artifact content stored (all kept versions).")
INVOKES_FORWARDED = Counter(
    "nodes_invokes_forwarded_total",
    "InvokeNode calls forwarded to the replica holding the node's stream, by outcome.",
    ["outcome"],
)
STREAMS_FENCED = Counter(
    "nodes_streams_fenced_total", "Streams closed because the node registered again on another replica."
)
