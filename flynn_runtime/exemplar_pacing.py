"""Trace exemplars for a histogram observed on every message, at most one per bucket per interval.

Prometheus keeps one exemplar per bucket (the latest) and reads it at each scrape, seconds apart, so
an exemplar set on every observation is almost always overwritten unseen; each one costs the
traceparent's parse, the exemplar's label checks and a lock. `ExemplarPacing` lets an observation
carry one only when its bucket has had none for `interval` seconds: every bucket that sees traffic
still names a recent trace, a slow bucket (rarely hit) names nearly every one of its observations.
Used for run control's submit-to-final histogram; the cancel histograms, observed once per cancel,
carry an exemplar each time (docs/operations/OBSERVABILITY.md, "Exemplars").
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Sequence

from flynn_runtime import tracing


class ExemplarPacing:
    def __init__(self, buckets: Sequence[float], interval: float = 1.0) -> None:
        self._bounds = sorted(float(b) for b in buckets)  # prometheus_client: value <= bound
        self._last = [-interval] * (len(self._bounds) + 1)  # the last slot is +Inf
        self._interval = interval

    def exemplar(self, value: float, make: Callable[[], dict[str, str] | None]) -> dict[str, str] | None:
        """`make()` (the exemplar of this observation) when `value`'s bucket is due one, else None;
        None when tracing is off (nothing is made)."""
        if not tracing.ENABLED:
            return None
        i = bisect.bisect_left(self._bounds, value)
        now = time.monotonic()
        if now - self._last[i] < self._interval:
            return None
        made = make()
        if made is not None:  # an unsampled observation leaves the bucket due
            self._last[i] = now
        return made
