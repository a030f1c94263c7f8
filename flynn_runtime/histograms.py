"""Quantiles of cumulative (Prometheus-style) histograms, shared by system.metrics and the gates, and
the cancel histograms' buckets, shared by run control (which observes them) and the config service
(which accepts no `server.queue.cancel_deadline` past the top bucket, so the slow path stays visible)."""

from __future__ import annotations

import math

# The largest server.queue.cancel_deadline the config service accepts, in seconds.
CANCEL_DEADLINE_MAX_S = 60.0
# 1 ms to 120 s: a run force-cancelled at the largest accepted deadline still lands in a finite bucket.
CANCEL_BUCKETS = (
    0.001,
    0.002,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
)


def quantile(cumulative: list[tuple[float, float]], q: float) -> float:
    """Quantile q (0..1) of cumulative buckets [(upper bound, count)], in the bound's unit; 0 when empty.

    Linear inside a bucket, as Prometheus' histogram_quantile does. A quantile that lands in the +Inf
    bucket is not known, only that it exceeds the largest finite bound: it is returned as +Inf, and
    shown as "> top" (format_ms), never as the top bound itself.
    """
    if not cumulative or cumulative[-1][1] <= 0:
        return 0.0
    rank = q * cumulative[-1][1]
    prev_bound, prev_count = 0.0, 0.0
    for bound, count in cumulative:
        if count >= rank:
            if math.isinf(bound):
                return math.inf
            if count == prev_count:
                return bound
            return prev_bound + (bound - prev_bound) * (rank - prev_count) / (count - prev_count)
        prev_bound, prev_count = bound, count
    return math.inf


def top_bound(cumulative: list[tuple[float, float]]) -> float:
    """The largest finite upper bound of the buckets (0 when there is none)."""
    finite = [b for b, _ in cumulative if not math.isinf(b)]
    return max(finite, default=0.0)


def format_ms(value: float, top_ms: float) -> str:
    """A latency in milliseconds for people: "12.3 ms", or "> 120000 ms" above the top bucket."""
    if math.isinf(value):
        return f"> {top_ms:.0f} ms" if top_ms > 0 else "> top bucket"
    return f"{value:.1f} ms"
