"""The figure gates as Prometheus recording rules and alerts, from the same Limits as checks.py.

Each gate records its value and its sample over the window (`increase()` of the same counters
System.GetMetrics reads, summed over every pod), then `flynn:gate_status{gate}`: 0 pass, 1 fail,
2 inconclusive (below the gate's minimum sample, or no data at all), decided in the same order as
checks.py. An alert per gate fires when its status is 1; one info alert when a gate stays
inconclusive. scripts/gen_prometheus_rules.py writes charts/flynn/files/prometheus-rules.yaml from
this; tests/observability checks the committed file equals the generated one, runs promtool on it
and compares a live Prometheus with `flynn gates check`.

Counts read through `increase()` are extrapolated to the window's edges, so a count gate breaks at
more than half an event ("> 0.5"), which for whole events is the checks' "> 0".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flynn_runtime.gates.limits import TITLES, Limits

PASS, FAIL, INCONCLUSIVE = 0, 1, 2
STATUS = "flynn:gate_status"
BASELINE_RANGE = "1d"
COMPLETED = 'flynn_runs_total{state="completed"}'
ERRORED = 'flynn_runs_total{state="error"}'
FINISHED = 'flynn_runs_total{state=~"completed|cancelled|error"}'
RECONNECT_OK = 'nodes_reconnects_total{result="success"}'
AS_TEXT = 'flynn_replies_delivered_total{mode="text_after_fallback"}'
FALLBACKS = "flynn_tts_fallbacks_total"
DELIVERED = "flynn_replies_delivered_total"
SERVER_ERRORS = 'flynn_gateway_calls_total{code_class="server_error"}'


@dataclass(frozen=True)
class GateRule:
    """One gate in PromQL: its recorded figures, its sample, and the expression that breaks it."""

    gate: str
    records: tuple[tuple[str, str], ...]  # (record name, expression) in dependency order
    sample: str  # the record holding the sample size
    breach: str  # PromQL over the records: a sample when the gate fails
    counts: bool  # the breach is judged before the sample (a count gate; or a breach with its own guard)
    description: str


def _inc(selector: str, w: str) -> str:
    return f"sum(increase({selector}[{w}]))"


def _inc0(selector: str, w: str) -> str:
    """As _inc, but 0 when no such series exists (a term of a sum must not empty the sum)."""
    return f"({_inc(selector, w)} or vector(0))"


def gate_rules(limits: Limits, w: str) -> list[GateRule]:
    """The five seed gates and error_rate over window w (a Prometheus duration such as 10m)."""
    return [
        GateRule(
            "cancel_to_ack_p95",
            (
                (
                    "flynn:gate_cancel_to_ack_p95:seconds",
                    f"histogram_quantile(0.95, sum by (le) (increase(flynn_cancel_to_ack_seconds_bucket[{w}])))",
                ),
                ("flynn:gate_cancel_to_ack_sample:count", _inc("flynn_cancel_to_ack_seconds_count", w)),
            ),
            "flynn:gate_cancel_to_ack_sample:count",
            f"flynn:gate_cancel_to_ack_p95:seconds > {limits.cancel_to_ack_p95_ms / 1000:g}",
            False,
            f"p95 of CancelRun to cancel_requested durable above {limits.cancel_to_ack_p95_ms:.0f} ms",
        ),
        GateRule(
            "duplicate_finals",
            (
                ("flynn:gate_duplicate_finals:count", _inc("flynn_duplicate_finals_delivered_total", w)),
                ("flynn:gate_finals_sample:count", _inc(COMPLETED, w)),
            ),
            "flynn:gate_finals_sample:count",
            "flynn:gate_duplicate_finals:count > 0.5",
            True,
            "a second final reply was delivered for a run",
        ),
        GateRule(
            "reaction_false_positives",
            (
                ("flynn:gate_reaction_matches_sample:count", _inc("reactions_matches_total", w)),
                (
                    "flynn:gate_reaction_false_positive_rate:ratio",
                    f"{_inc('reactions_false_positives_total', w)} / {_inc('reactions_matches_total', w)}",
                ),
            ),
            "flynn:gate_reaction_matches_sample:count",
            f"flynn:gate_reaction_false_positive_rate:ratio > {limits.false_positive_rate_max:g}",
            False,
            f"reaction matches flagged as false positives above {limits.false_positive_rate_max:.0%}",
        ),
        GateRule(
            "node_reconnect_success",
            (
                ("flynn:gate_node_reconnect_sample:count", _inc("nodes_reconnects_total", w)),
                (
                    "flynn:gate_node_reconnect_success:ratio",
                    f"{_inc(RECONNECT_OK, w)} / {_inc('nodes_reconnects_total', w)}",
                ),
            ),
            "flynn:gate_node_reconnect_sample:count",
            f"flynn:gate_node_reconnect_success:ratio < {limits.reconnect_success_min:g}",
            False,
            f"companion node reconnects succeeding less than {limits.reconnect_success_min:.0%}",
        ),
        GateRule(
            "tts_no_dropped_replies",
            (
                (
                    "flynn:gate_tts_replies_dropped:count",
                    f"clamp_min({_inc0(FALLBACKS, w)} - {_inc0(AS_TEXT, w)}, 0)"
                    f" + clamp_min({_inc0(COMPLETED, w)} - {_inc0(DELIVERED, w)}, 0)",
                ),
            ),
            "flynn:gate_finals_sample:count",
            "flynn:gate_tts_replies_dropped:count > 0.5",
            True,
            "a reply was dropped: a TTS fallback not sent as text, or a final never delivered",
        ),
        _error_rate_rule(limits, w),
    ]


def _error_rate_rule(limits: Limits, w: str) -> GateRule:
    """Each side breaks only on its own minimum sample; a break wins over too few runs (as checks.py)."""
    n, margin = limits.minimum("error_rate"), f"{limits.error_rate_margin:g}"
    runs = (
        f"flynn:gate_run_error_rate:ratio > ({_baseline('flynn:gate_run_error_rate:baseline')}) + {margin}"
        f" and on() flynn:gate_runs_finished_sample:count >= {n}"
    )
    gateway = (
        f"flynn:gate_gateway_server_error_rate:ratio > "
        f"({_baseline('flynn:gate_gateway_server_error_rate:baseline')}) + {margin}"
        f" and on() flynn:gate_gateway_calls_sample:count >= {n}"
    )
    return GateRule(
        "error_rate",
        _error_records(w),
        "flynn:gate_runs_finished_sample:count",
        f"({runs})\nor ({gateway})",
        True,
        f"runs ending in error, or the gateway's server-side failures, more than "
        f"{limits.error_rate_margin:.0%} above the rate of the day before the window",
    )


def _baseline(record: str) -> str:
    return f"{record} or vector(0)"


def _error_records(w: str) -> tuple[tuple[str, str], ...]:
    finished, server = FINISHED, SERVER_ERRORS
    base = f"[{BASELINE_RANGE}] offset {w}"
    return (
        ("flynn:gate_runs_finished_sample:count", _inc(finished, w)),
        ("flynn:gate_run_error_rate:ratio", f"{_inc(ERRORED, w)} / {_inc(finished, w)}"),
        ("flynn:gate_gateway_calls_sample:count", _inc("flynn_gateway_calls_total", w)),
        ("flynn:gate_gateway_server_error_rate:ratio", f"{_inc(server, w)} / {_inc('flynn_gateway_calls_total', w)}"),
        # The rate before the window (what `flynn gates check` takes from its before snapshot);
        # ">= 0" drops the NaN of an empty day so that the breach falls back to a baseline of 0.
        ("flynn:gate_run_error_rate:baseline",
         f"(sum(increase({ERRORED}{base})) / sum(increase({finished}{base}))) >= 0"),
        ("flynn:gate_gateway_server_error_rate:baseline",
         f"(sum(increase({server}{base})) / sum(increase(flynn_gateway_calls_total{base}))) >= 0"),
    )  # fmt: skip


def status_expr(rule: GateRule, minimum: int) -> str:
    """0 pass, 1 fail, 2 inconclusive: the first clause that has a sample wins (PromQL `or`)."""
    fail = f"({rule.breach}) * 0 + {FAIL}"
    short = f"({rule.sample} < {minimum}) * 0 + {INCONCLUSIVE}"
    clauses = [fail, short] if rule.counts else [short, fail]
    return "\n  or ".join([*clauses, f"({rule.sample} >= 0) * 0 + {PASS}", f"vector({INCONCLUSIVE})"])


def _alert_name(gate: str) -> str:
    return "FlynnGate" + "".join(p.capitalize() for p in gate.split("_")) + "Failed"


def rule_groups(limits: Limits | None = None, window: str = "10m", alert_for: str = "5m") -> dict[str, Any]:
    """The rules file (a `groups:` document, as promtool and a PrometheusRule's spec take it)."""
    lim = limits or Limits()
    rules = gate_rules(lim, window)
    records: list[dict[str, Any]] = []
    for r in rules:
        records += [{"record": name, "expr": expr} for name, expr in r.records]
    statuses = [
        {"record": STATUS, "expr": status_expr(r, lim.minimum(r.gate)), "labels": {"gate": r.gate}}
        for r in rules
    ]
    alerts: list[dict[str, Any]] = [
        {
            "alert": _alert_name(r.gate),
            "expr": f'{STATUS}{{gate="{r.gate}"}} == {FAIL}',
            "for": alert_for,
            "labels": {"severity": "critical", "gate": r.gate},
            "annotations": {
                "summary": f"Rollout gate {r.gate} ({TITLES[r.gate]}) failed",
                "description": f"Over the last {window}: {r.description}. `flynn gates check --window {window}` "
                "judges the same gate; roll the change back (docs/operations/ROLLOUT.md).",
            },
        }
        for r in rules
    ]
    alerts.append(
        {
            "alert": "FlynnGateInconclusive",
            "expr": f"{STATUS} == {INCONCLUSIVE}",
            "for": "1h",
            "labels": {"severity": "info"},
            "annotations": {
                "summary": "Rollout gate {{ $labels.gate }} has had too little traffic to judge for an hour",
                "description": f"Below its minimum sample over {window}: neither promote nor roll back on it.",
            },
        }
    )
    # Figures and statuses in one group: a group's rules run in order, so each status reads the
    # figures of the same evaluation.
    return {
        "groups": [
            {"name": "flynn-gates", "rules": records + statuses},
            {"name": "flynn-gates-alerts", "rules": alerts},
        ]
    }
