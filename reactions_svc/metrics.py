"""Prometheus metrics of the reactions service (names from issue 5 / DESIGN.md §5)."""

from __future__ import annotations

from typing import Any

from prometheus_client import Counter, Gauge, Histogram

from reactions_svc.engine import reason_name

MATCHES = Counter("reactions_matches_total", "Reaction rules that fired (actions succeeded).", ["rule"])
SKIPS = Counter(
    "reactions_skips_total",
    "Rules listening to an event type that did not fire for an event, by reason.",
    ["rule", "reason"],
)
FALSE_POSITIVES = Counter("reactions_false_positives_total", "Matches flagged as false positives.", ["rule"])
EVALUATION_SECONDS = Histogram(
    "reactions_evaluation_seconds",
    "Time to evaluate one event against the rule set (engine only, no I/O).",
    buckets=(0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1),
)
FIRE_STATE_CLAIMS_LOST = Counter(
    "reactions_fire_state_claims_lost_total",
    "Evaluations taken again because another replica fired a shared cooldown key first (replicas).",
)
ACTIONS = Counter(
    "reactions_actions_total", "Actions run by fired rules, by kind and outcome.", ["kind", "outcome"]
)
EVENTS = Counter("reactions_events_total", "Events consumed from the streams, by source.", ["source"])
PARTITIONS_HELD = Gauge(
    "reactions_partitions_held", "Event partitions this replica holds (several replicas)."
)
PARTITIONS_FENCED = Counter(
    "reactions_partition_writes_fenced_total",
    "Cursor writes refused because another replica took the partition over (this one steps down).",
)
CURSOR = Counter("reactions_consumer_reconnects_total", "Consumer stream reconnects, by source.", ["source"])


_skip_children: dict[tuple[str, int], Any] = {}


def skip(rule_id: str, reason: int) -> None:
    child = _skip_children.get((rule_id, reason))
    if child is None:
        if len(_skip_children) > 100_000:  # rule ids churn with config changes; stay bounded
            _skip_children.clear()
        child = _skip_children[(rule_id, reason)] = SKIPS.labels(rule_id, reason_name(reason))
    child.inc()
