"""Quantiles of cumulative (Prometheus-style) histograms, shared by system.metrics and the gates command."""

from __future__ import annotations

import math


def quantile(cumulative: list[tuple[float, float]], q: float) -> float:
    """Quantile q (0..1) of cumulative buckets [(upper bound, count)], in the bound's unit; 0 when empty.

    Linear inside a bucket, as Prometheus' histogram_quantile does. A quantile that lands in the +Inf
    bucket is reported as the largest finite bound (a lower bound of the truth).
    """
    if not cumulative or cumulative[-1][1] <= 0:
        return 0.0
    rank = q * cumulative[-1][1]
    prev_bound, prev_count = 0.0, 0.0
    for bound, count in cumulative:
        if count >= rank:
            if math.isinf(bound):
                return prev_bound
            if count == prev_count:
                return bound
            return prev_bound + (bound - prev_bound) * (rank - prev_count) / (count - prev_count)
        prev_bound, prev_count = bound, count
    return prev_bound
