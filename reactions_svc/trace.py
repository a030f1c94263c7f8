"""One (event, rule) outcome of the rules engine, and the skip reasons it names."""

from __future__ import annotations

from dataclasses import dataclass

from flynn.v1 import reactions_pb2

MATCHED = reactions_pb2.SKIP_REASON_UNSPECIFIED
SKIP_SCOPE = reactions_pb2.SKIP_REASON_SCOPE
SKIP_CONDITION = reactions_pb2.SKIP_REASON_CONDITION
SKIP_COOLDOWN = reactions_pb2.SKIP_REASON_COOLDOWN
SKIP_MAX_FIRES = reactions_pb2.SKIP_REASON_MAX_FIRES
SKIP_RECURSION = reactions_pb2.SKIP_REASON_RECURSION_GUARD
SKIP_DISABLED = reactions_pb2.SKIP_REASON_DISABLED
SKIP_ROLLOUT = reactions_pb2.SKIP_REASON_ROLLOUT
SKIP_EXCLUSIVE = reactions_pb2.SKIP_REASON_EXCLUSIVE
SKIP_ACTION_ERROR = reactions_pb2.SKIP_REASON_ACTION_ERROR


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
