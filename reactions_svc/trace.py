"""One (event, rule) outcome of the rules engine."""

from __future__ import annotations

from dataclasses import dataclass

from flynn.v1 import reactions_pb2


@dataclass(slots=True)
class Trace:
    """One (event, rule) outcome. Static skips (disabled, other event type) are shared between events."""

    rule_id: str
    matched: bool
    reason: reactions_pb2.SkipReason.ValueType
    detail: str
    # False when the rule does not listen to this event type (or is disabled): noise for per-rule views.
    listening: bool = True
    cooldown_key: str = ""
