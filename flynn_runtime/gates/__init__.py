"""The rollout gates, defined once: `flynn gates`, the console's Rollout view and the Prometheus rules
(charts/flynn/files/prometheus-rules.yaml, written by scripts/gen_prometheus_rules.py) all use them.

    window.py   the figures of a window: the difference of two System.GetMetrics answers
    verdict.py  a gate's result (pass, fail, inconclusive, skip) and the command's exit codes
    limits.py   thresholds and minimum samples, one place
    checks.py   one function per gate over a window, and `evaluate` running them in order
    promql.py   the same gates as Prometheus recording rules and alerts
"""

from flynn_runtime.gates.checks import FIGURE_GATES, evaluate
from flynn_runtime.gates.limits import GATE_NAMES, MIN_SAMPLE, TITLES, Limits
from flynn_runtime.gates.verdict import (
    EXIT_FAIL,
    EXIT_INCONCLUSIVE,
    EXIT_PASS,
    EXIT_USAGE,
    GateResult,
    Verdict,
    exit_code,
)
from flynn_runtime.gates.window import Window, window

__all__ = [
    "EXIT_FAIL",
    "EXIT_INCONCLUSIVE",
    "EXIT_PASS",
    "EXIT_USAGE",
    "FIGURE_GATES",
    "GATE_NAMES",
    "MIN_SAMPLE",
    "TITLES",
    "GateResult",
    "Limits",
    "Verdict",
    "Window",
    "evaluate",
    "exit_code",
    "window",
]
