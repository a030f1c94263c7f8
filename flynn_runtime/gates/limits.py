"""Thresholds and minimum samples of the gates (docs/operations/ROLLOUT.md), in one place."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

GATE_NAMES = (
    "metrics_available",
    "cancel_to_ack_p95",
    "duplicate_finals",
    "reaction_false_positives",
    "node_reconnect_success",
    "canvas_persistence",
    "tts_no_dropped_replies",
    "error_rate",
)
TITLES = {
    "metrics_available": "Metrics readable",
    "cancel_to_ack_p95": "Cancel-to-ack p95",
    "duplicate_finals": "Duplicate finals delivered",
    "reaction_false_positives": "Reaction false-positive rate",
    "node_reconnect_success": "Node reconnect success",
    "canvas_persistence": "Canvas persistence",
    "tts_no_dropped_replies": "TTS fallback, no dropped replies",
    "error_rate": "Error rate",
}
# Observations a gate needs in its window before its verdict means something; below it the gate
# is INCONCLUSIVE (a canary that got no traffic is neither promoted nor rolled back).
MIN_SAMPLE: Mapping[str, int] = {
    "cancel_to_ack_p95": 20,  # cancels
    "duplicate_finals": 1,  # runs completed
    "reaction_false_positives": 20,  # reaction matches
    "node_reconnect_success": 10,  # reconnect attempts
    "tts_no_dropped_replies": 1,  # runs completed
    "error_rate": 20,  # runs finished (completed, cancelled or error)
}


@dataclass(frozen=True)
class Limits:
    """What each gate compares against. Defaults are the playbook's; the CLI can override them."""

    cancel_to_ack_p95_ms: float = 500.0
    false_positive_rate_max: float = 0.03
    reconnect_success_min: float = 0.99
    # error_rate: the window's rate may exceed the baseline (the before snapshot's rate, 0 without
    # one) by at most this much, for runs ending in error and for the gateway's server-side failures.
    error_rate_margin: float = 0.02
    min_sample: Mapping[str, int] = field(default_factory=lambda: dict(MIN_SAMPLE))

    def minimum(self, gate: str) -> int:
        return int(self.min_sample.get(gate, 0))

    def with_min_samples(self, overrides: Mapping[str, int]) -> Limits:
        return replace(self, min_sample={**self.min_sample, **overrides})
