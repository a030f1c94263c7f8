"""Run-control metrics (Prometheus). Names are what System.GetMetrics and the rollout gates read."""

from __future__ import annotations

from flynn.v1 import config_pb2
from prometheus_client import Counter, Gauge, Histogram

from flynn_runtime.enum_names import short_names
from flynn_runtime.exemplar_pacing import ExemplarPacing
from flynn_runtime.histograms import CANCEL_BUCKETS

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

RUNS = Counter("flynn_runs_total", "Run-state transitions, by the state entered.", ["state"])
# Every state and reply mode is exported from the start (at 0), so Prometheus' increase() over a
# window sees the first run of each kind too, as `flynn gates check` does.
for _state in ("queued", "started", "cancel_requested", "cancelled", "completed", "error"):
    RUNS.labels(_state)
RUNS_ACTIVE = Gauge("flynn_runs_active", "Runs started and not yet terminal.")
MESSAGES = Counter("flynn_messages_total", "Messages submitted, by disposition.", ["disposition"])
MESSAGES_BY_MODE = Counter(
    "flynn_messages_by_mode_total", "Messages submitted, by the queue mode that applied to them.", ["mode"]
)
QUEUE_MODE_NAMES = short_names(config_pb2.QueueMode, with_zero=False)
for _name in QUEUE_MODE_NAMES.values():
    MESSAGES_BY_MODE.labels(_name)
MESSAGES_DROPPED = Counter("flynn_messages_dropped_total", "Queued messages dropped, by reason.", ["reason"])
QUEUE_DEPTH = Gauge(
    "flynn_queue_depth", "Entries waiting in session queues (queued runs and collect buffers)."
)
CANCEL_TO_ACK = Histogram(
    "flynn_cancel_to_ack_seconds", "CancelRun received to cancel_requested durable.", buckets=CANCEL_BUCKETS
)
CANCEL_TO_CANCELLED = Histogram(
    "flynn_cancel_to_cancelled_seconds",
    "Cancel requested to the run reaching cancelled.",
    buckets=CANCEL_BUCKETS,
)
SUBMIT_TO_FINAL = Histogram(
    "flynn_submit_to_final_seconds",
    "Message accepted to its run's final reply written.",
    buckets=LATENCY_BUCKETS,
)
# Observed for every message: a trace exemplar at most once per bucket per second.
SUBMIT_TO_FINAL_EXEMPLARS = ExemplarPacing(LATENCY_BUCKETS)
DUPLICATE_FINALS_SUPPRESSED = Counter(
    "flynn_duplicate_finals_suppressed_total", "Second finals for a run refused by the outbox."
)
DUPLICATE_FINALS_DELIVERED = Counter(
    "flynn_duplicate_finals_delivered_total", "Second finals for a run published (must stay 0)."
)
REPLIES_DELIVERED = Counter(
    "flynn_replies_delivered_total", "Replies published to StreamReplies, by delivery mode.", ["mode"]
)
for _mode in ("text", "audio", "text_after_fallback"):
    REPLIES_DELIVERED.labels(_mode)
TTS_FALLBACKS = Counter(
    "flynn_tts_fallbacks_total", "Replies sent as text because speech failed, by reason.", ["reason"]
)
COMMIT_SECONDS = Histogram(
    "flynn_queue_commit_seconds",
    "Duration of one group commit (one fsync) of the run-control store.",
    buckets=LATENCY_BUCKETS,
)
BATCH_WAIT = Histogram(
    "flynn_queue_batch_wait_seconds",
    "How long the first operation of a group-commit batch that somebody waits for (not a streamed output "
    "chunk) waited for the batch in flight before its own commit started (zero when the writer was idle).",
    buckets=LATENCY_BUCKETS,
)
COMMIT_BATCH = Histogram(
    "flynn_queue_commit_statements",
    "Statements per group commit.",
    buckets=(1, 5, 10, 25, 50, 100, 250, 500, 1000),
)
SESSIONS_ADOPTED = Counter(
    "flynn_queue_sessions_adopted_total",
    "Sessions this run-control replica took ownership of (first call, or taken over after a lease expired).",
)
SESSIONS_STEPPED_DOWN = Counter(
    "flynn_queue_sessions_stepped_down_total",
    "Sessions this run-control replica stopped owning, by why (lease taken over, write refused: stale epoch…).",
    ["why"],
)
SESSIONS_FORWARDED = Counter(
    "flynn_queue_calls_forwarded_total",
    "Calls this run-control replica forwarded to the session's owner, by method.",
    ["method"],
)
FORWARD_SECONDS = Histogram(
    "flynn_queue_forward_seconds",
    "Time a call forwarded to the session's owner replica took there and back (the forwarding hop), by method.",
    ["method"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
