"""One function per figure gate, each judging a Window against the Limits, and `evaluate` running them.

A gate with a minimum sample answers INCONCLUSIVE below it (never PASS on no data); a count gate
(duplicate finals, dropped replies) fails on its first violation whatever the sample. The canvas
persistence gate writes and reads a probe through the Canvas service, so it lives with the command
(flynn_cli/gates_cmds.py); the figure gates here need nothing but two GetMetrics answers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from flynn.v1 import system_pb2

from flynn_runtime.gates.limits import Limits
from flynn_runtime.gates.verdict import GateResult, Verdict
from flynn_runtime.gates.window import Window, window
from flynn_runtime.histograms import format_ms, quantile, top_bound

REQUIRED_SERVICES = ("queue", "reactions", "nodes", "voice")


def _short(gate: str, sample: float, minimum: int, what: str, threshold: str) -> GateResult | None:
    """INCONCLUSIVE below the minimum sample; with a minimum of 0, an empty window passes as before."""
    if sample < minimum:
        note = f"needs at least {minimum} {what} in the window"
        return GateResult(
            gate, Verdict.INCONCLUSIVE, f"{sample:.0f} {what}", threshold, note, sample, minimum
        )
    if sample <= 0:
        return GateResult(gate, Verdict.PASS, f"no {what}", threshold, "no observations", sample, minimum)
    return None


def _verdict(ok: bool) -> Verdict:
    return Verdict.PASS if ok else Verdict.FAIL


def metrics_available(w: Window, limits: Limits) -> GateResult:
    needed = [s for s in w.unavailable if s in REQUIRED_SERVICES]
    return GateResult(
        "metrics_available",
        _verdict(not needed),
        "unreachable: " + ", ".join(w.unavailable) if w.unavailable else "all services read",
        ", ".join(REQUIRED_SERVICES) + " readable",
        "; ".join(w.unavailable_details),
    )


def cancel_to_ack_p95(w: Window, limits: Limits) -> GateResult:
    gate, minimum = "cancel_to_ack_p95", limits.minimum("cancel_to_ack_p95")
    threshold = f"<= {limits.cancel_to_ack_p95_ms:.0f} ms"
    n = w.cancel_to_ack[-1][1] if w.cancel_to_ack else 0.0
    settled = w.cancel_to_cancelled[-1][1] if w.cancel_to_cancelled else 0.0
    slow = quantile(w.cancel_to_cancelled, 0.95)
    slow_note = f"cancel-to-cancelled p95 {format_ms(slow, top_bound(w.cancel_to_cancelled))}"
    if (short := _short(gate, n, minimum, "cancels", threshold)) is not None:
        short.note += f"; {slow_note}" if settled > 0 else ""  # the slow path, shown however few
        return short
    p95 = quantile(w.cancel_to_ack, 0.95)
    note = f"{n:.0f} cancels; {slow_note}"
    return GateResult(
        gate,
        _verdict(p95 <= limits.cancel_to_ack_p95_ms),
        format_ms(p95, top_bound(w.cancel_to_ack)),
        threshold,
        note,
        n,
        minimum,
    )


def duplicate_finals(w: Window, limits: Limits) -> GateResult:
    gate, minimum = "duplicate_finals", limits.minimum("duplicate_finals")
    # A duplicate delivered is a failure however small the sample; only a clean window needs one.
    if w.duplicates_delivered == 0 and (short := _short(gate, w.finals, minimum, "finals", "== 0")):
        return short
    return GateResult(
        gate,
        _verdict(w.duplicates_delivered == 0),
        f"{w.duplicates_delivered:.0f} delivered",
        "== 0",
        f"{w.duplicates_suppressed:.0f} suppressed by the outbox; {w.finals:.0f} finals",
        w.finals,
        minimum,
    )


def reaction_false_positives(w: Window, limits: Limits) -> GateResult:
    gate, minimum = "reaction_false_positives", limits.minimum("reaction_false_positives")
    threshold = f"<= {limits.false_positive_rate_max:.0%}"
    if (short := _short(gate, w.matches, minimum, "matches", threshold)) is not None:
        return short
    rate = w.false_positives / w.matches
    return GateResult(
        gate,
        _verdict(rate <= limits.false_positive_rate_max),
        f"{rate:.2%}",
        threshold,
        f"{w.false_positives:.0f} flagged of {w.matches:.0f} matches",
        w.matches,
        minimum,
    )


def node_reconnect_success(w: Window, limits: Limits) -> GateResult:
    gate, minimum = "node_reconnect_success", limits.minimum("node_reconnect_success")
    threshold = f">= {limits.reconnect_success_min:.0%}"
    attempts = sum(w.reconnects.values())
    if (short := _short(gate, attempts, minimum, "reconnects", threshold)) is not None:
        return short
    ok = w.reconnects.get("success", 0.0)
    return GateResult(
        gate,
        _verdict(ok / attempts >= limits.reconnect_success_min),
        f"{ok / attempts:.2%}",
        threshold,
        f"{ok:.0f} of {attempts:.0f} reconnects",
        attempts,
        minimum,
    )


def replies_dropped(w: Window) -> float:
    """TTS fallbacks not sent as text, plus finals never delivered (the Prometheus rule's figure too)."""
    as_text = w.replies_by_mode.get("text_after_fallback", 0.0)
    delivered = sum(w.replies_by_mode.values())
    return max(w.tts_fallbacks - as_text, 0.0) + max(w.finals - delivered, 0.0)


def tts_no_dropped_replies(w: Window, limits: Limits) -> GateResult:
    gate, minimum = "tts_no_dropped_replies", limits.minimum("tts_no_dropped_replies")
    threshold = "fallbacks <= text_after_fallback and finals <= delivered"
    if replies_dropped(w) == 0 and (short := _short(gate, w.finals, minimum, "finals", threshold)):
        return short
    as_text = w.replies_by_mode.get("text_after_fallback", 0.0)
    delivered = sum(w.replies_by_mode.values())
    return GateResult(
        gate,
        _verdict(replies_dropped(w) == 0),
        f"{w.tts_fallbacks:.0f} fallbacks, {as_text:.0f} sent as text; "
        f"{w.finals:.0f} finals, {delivered:.0f} replies delivered",
        threshold,
        "replies by mode: " + ", ".join(f"{k}={v:.0f}" for k, v in sorted(w.replies_by_mode.items())),
        w.finals,
        minimum,
    )


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.2%}"


def error_rate(w: Window, limits: Limits) -> GateResult:
    """Runs in error and the gateway's server-side failures, each judged on its own minimum sample:
    either side breaking fails the gate (a gateway failing every call fails it even with no runs
    finishing); too few runs finished, with nothing broken, is inconclusive."""
    gate, minimum = "error_rate", limits.minimum("error_rate")
    base = w.baseline
    run_limit = ((base.run_error_rate if base else None) or 0.0) + limits.error_rate_margin
    gw_limit = ((base.server_error_rate if base else None) or 0.0) + limits.error_rate_margin
    threshold = (
        f"runs <= {run_limit:.2%}, gateway server errors <= {gw_limit:.2%} "
        f"({'baseline' if base else 'no baseline'} + {limits.error_rate_margin:.2%})"
    )
    runs, server = w.errors.run_error_rate or 0.0, w.errors.server_error_rate or 0.0
    runs_bad = w.errors.runs_finished >= minimum and runs > run_limit
    gateway_bad = w.errors.calls >= minimum and server > gw_limit
    if not (runs_bad or gateway_bad):
        short = _short(gate, w.errors.runs_finished, minimum, "runs finished", threshold)
        if short is not None:
            return short
    codes = ", ".join(f"{k}={v:.0f}" for k, v in sorted(w.failures_by_code.items()) if v > 0)
    note = (
        f"{w.errors.runs_errored:.0f} of {w.errors.runs_finished:.0f} runs in error; gateway "
        f"{w.errors.server_errors:.0f} server / {w.caller_errors:.0f} caller errors of {w.errors.calls:.0f} calls"
        + (f" ({codes})" if codes else "")
        + (
            f"; baseline runs {_rate(base.run_error_rate)}, gateway {_rate(base.server_error_rate)}"
            if base
            else ""
        )
    )
    return GateResult(
        gate,
        _verdict(not (runs_bad or gateway_bad)),
        f"runs {runs:.2%}, gateway server errors {server:.2%}",
        threshold,
        note,
        w.errors.runs_finished,
        minimum,
    )


Gate = Callable[[Window, Limits], GateResult]
FIGURE_GATES: dict[str, Gate] = {
    "metrics_available": metrics_available,
    "cancel_to_ack_p95": cancel_to_ack_p95,
    "duplicate_finals": duplicate_finals,
    "reaction_false_positives": reaction_false_positives,
    "node_reconnect_success": node_reconnect_success,
    "tts_no_dropped_replies": tts_no_dropped_replies,
    "error_rate": error_rate,
}


def evaluate(
    before: system_pb2.GetMetricsResponse | None,
    after: system_pb2.GetMetricsResponse,
    skip: Iterable[str] = (),
    limits: Limits | None = None,
    baseline: system_pb2.GetMetricsResponse | None = None,
) -> list[GateResult]:
    """The figure gates between two answers (before None: since each process started)."""
    w = window(before, after, baseline)
    lim = limits or Limits()
    skipped = set(skip)
    return [gate(w, lim) for name, gate in FIGURE_GATES.items() if name not in skipped]
