"""The figures of a window: the difference of two System.GetMetrics answers.

Counters and histogram buckets are subtracted; a counter that went down means its process restarted
and counted from zero, so the later value is the delta. Without a `before` the window is everything
since each process started. The `before` answer's own totals are the baseline the error_rate gate
compares the window with.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from flynn.v1 import system_pb2

Buckets = list[tuple[float, float]]  # cumulative (upper bound in ms, count)


@dataclass(frozen=True)
class Rates:
    """Error rates: runs ending in error over runs finished, gateway server-side failures over calls."""

    runs_errored: float = 0.0
    runs_finished: float = 0.0
    server_errors: float = 0.0
    calls: float = 0.0

    @property
    def run_error_rate(self) -> float | None:
        return self.runs_errored / self.runs_finished if self.runs_finished > 0 else None

    @property
    def server_error_rate(self) -> float | None:
        return self.server_errors / self.calls if self.calls > 0 else None


@dataclass(frozen=True)
class Window:
    unavailable: tuple[str, ...] = ()
    unavailable_details: tuple[str, ...] = ()
    cancel_to_ack: Buckets = field(default_factory=list)
    cancel_to_cancelled: Buckets = field(default_factory=list)
    finals: float = 0.0
    duplicates_delivered: float = 0.0
    duplicates_suppressed: float = 0.0
    matches: float = 0.0
    false_positives: float = 0.0
    reconnects: dict[str, float] = field(default_factory=dict)
    tts_fallbacks: float = 0.0
    replies_by_mode: dict[str, float] = field(default_factory=dict)
    errors: Rates = field(default_factory=Rates)
    caller_errors: float = 0.0
    failures_by_code: dict[str, float] = field(default_factory=dict)
    baseline: Rates | None = None  # the before answer's totals (None: no before)


def named(items: Iterable[system_pb2.NamedCount]) -> dict[str, float]:
    return {i.name: i.value for i in items}


def delta(before: float, after: float) -> float:
    """A counter's increase; a decrease means the process restarted and counted from zero."""
    return after - before if after >= before else after


def delta_named(
    before: Iterable[system_pb2.NamedCount], after: Iterable[system_pb2.NamedCount]
) -> dict[str, float]:
    b, a = named(before), named(after)
    return {k: delta(b.get(k, 0.0), v) for k, v in a.items()}


def delta_buckets(before: system_pb2.Percentiles, after: system_pb2.Percentiles) -> Buckets:
    b = {x.upper_bound_ms: x.count for x in before.buckets}
    a = sorted((x.upper_bound_ms, x.count) for x in after.buckets)
    if a and b and a[-1][1] < b.get(a[-1][0], 0.0):  # restarted: the after histogram is the window
        return a
    return [(le, max(c - b.get(le, 0.0), 0.0)) for le, c in a]


def rates(m: system_pb2.GetMetricsResponse) -> Rates:
    """The totals of one answer (since each process started)."""
    calls = named(m.gateway.calls_by_class)
    return Rates(
        m.runs.runs_errored, m.runs.runs_finished, calls.get("server_error", 0.0), sum(calls.values())
    )


def window(
    before: system_pb2.GetMetricsResponse | None,
    after: system_pb2.GetMetricsResponse,
    baseline: system_pb2.GetMetricsResponse | None = None,
) -> Window:
    """The window from `before` (None: since start) to `after`; the baseline defaults to `before`."""
    b = before if before is not None else system_pb2.GetMetricsResponse()
    base = baseline if baseline is not None else before
    missing = set(after.unavailable_services) | (set(b.unavailable_services) if before else set())
    calls = delta_named(b.gateway.calls_by_class, after.gateway.calls_by_class)
    return Window(
        unavailable=tuple(sorted(missing)),
        unavailable_details=tuple(after.unavailable_details),
        cancel_to_ack=delta_buckets(b.runs.cancel_to_ack, after.runs.cancel_to_ack),
        cancel_to_cancelled=delta_buckets(b.runs.cancel_to_cancelled, after.runs.cancel_to_cancelled),
        finals=delta(b.runs.finals, after.runs.finals),
        duplicates_delivered=delta(b.runs.duplicate_finals_delivered, after.runs.duplicate_finals_delivered),
        duplicates_suppressed=delta(
            b.runs.duplicate_finals_suppressed, after.runs.duplicate_finals_suppressed
        ),
        matches=delta(b.reactions.matches, after.reactions.matches),
        false_positives=delta(b.reactions.false_positives, after.reactions.false_positives),
        reconnects=delta_named(b.nodes.reconnects, after.nodes.reconnects),
        tts_fallbacks=delta(b.voice.tts_fallbacks, after.voice.tts_fallbacks),
        replies_by_mode=delta_named(b.runs.replies_by_mode, after.runs.replies_by_mode),
        errors=Rates(
            delta(b.runs.runs_errored, after.runs.runs_errored),
            delta(b.runs.runs_finished, after.runs.runs_finished),
            calls.get("server_error", 0.0),
            sum(calls.values()),
        ),
        caller_errors=calls.get("caller_error", 0.0),
        failures_by_code=delta_named(b.gateway.failures_by_code, after.gateway.failures_by_code),
        baseline=rates(base) if base is not None else None,
    )
