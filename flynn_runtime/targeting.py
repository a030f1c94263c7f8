"""Effective gate values for a target (session, channel, node): the one function every service uses.

Precedence (DESIGN.md §3): session override, then channel override, then percentage rollout,
then the global value. Rollout buckets come from rollout.bucket (MurmurHash3, sticky).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

from flynn.v1 import config_pb2

from flynn_runtime import rollout

T = TypeVar("T")

Source = config_pb2.ValueSource


@dataclass(frozen=True)
class Target:
    session_key: str = ""
    channel: str = ""
    node_id: str = ""


@dataclass(frozen=True)
class Decision(Generic[T]):
    value: T
    source: config_pb2.ValueSource.ValueType
    bucket: int = -1
    basis_points: int = 0
    hashed_key: str = ""
    explanation: str = ""


def rollout_key(r: config_pb2.Rollout, target: Target, default_key: str = "session") -> str:
    if r.stickiness == config_pb2.STICKINESS_CHANNEL:
        return target.channel
    if default_key == "node":
        return target.node_id
    return target.session_key


def rollout_decision(
    r: config_pb2.Rollout, gate: str, target: Target, default_key: str = "session"
) -> Decision[bool]:
    """Whether `target` is inside rollout `r` of the gate named `gate` (its salt defaults to the gate name)."""
    salt = r.salt or gate
    key = rollout_key(r, target, default_key)
    b = rollout.bucket(salt, key)
    inside = r.basis_points > 0 and (r.basis_points >= rollout.BASIS_POINTS_MAX or b < r.basis_points)
    return Decision(
        inside,
        Source.VALUE_SOURCE_ROLLOUT if inside else Source.VALUE_SOURCE_GLOBAL,
        bucket=b,
        basis_points=r.basis_points,
        hashed_key=rollout.hashed_key(salt, key),
        explanation=f"bucket {b} {'<' if inside else '>='} {r.basis_points} basis points of {gate}",
    )


def queue_mode(
    cfg: config_pb2.FlynnConfig,
    target: Target,
    message_override: config_pb2.QueueMode.ValueType = config_pb2.QUEUE_MODE_UNSPECIFIED,
) -> Decision[config_pb2.QueueMode.ValueType]:
    q = cfg.server.queue
    if message_override != config_pb2.QUEUE_MODE_UNSPECIFIED:
        return Decision(
            message_override, Source.VALUE_SOURCE_MESSAGE_OVERRIDE, explanation="per-message override"
        )
    if target.session_key in q.overrides.sessions:
        return Decision(
            q.overrides.sessions[target.session_key],
            Source.VALUE_SOURCE_SESSION_OVERRIDE,
            explanation=f"server.queue.overrides.sessions[{target.session_key}]",
        )
    if target.channel in q.overrides.channels:
        return Decision(
            q.overrides.channels[target.channel],
            Source.VALUE_SOURCE_CHANNEL_OVERRIDE,
            explanation=f"server.queue.overrides.channels[{target.channel}]",
        )
    if q.HasField("rollout") and q.rollout.mode != config_pb2.QUEUE_MODE_UNSPECIFIED:
        d = rollout_decision(q.rollout.rollout, "server.queue.mode", target)
        if d.value:
            return Decision(q.rollout.mode, d.source, d.bucket, d.basis_points, d.hashed_key, d.explanation)
        base = _global_mode(q)
        return Decision(base.value, base.source, d.bucket, d.basis_points, d.hashed_key, d.explanation)
    return _global_mode(q)


def _global_mode(q: config_pb2.QueueConfig) -> Decision[config_pb2.QueueMode.ValueType]:
    if q.mode == config_pb2.QUEUE_MODE_UNSPECIFIED:
        return Decision(
            config_pb2.QUEUE_MODE_COLLECT, Source.VALUE_SOURCE_DEFAULT, explanation="default collect"
        )
    return Decision(q.mode, Source.VALUE_SOURCE_GLOBAL, explanation="server.queue.mode")


def _bool_gate(
    enabled: bool, r: config_pb2.Rollout | None, gate: str, target: Target, key: str = "session"
) -> Decision[bool]:
    if enabled:
        return Decision(True, Source.VALUE_SOURCE_GLOBAL, explanation=f"{gate} is true")
    if r is not None and r.basis_points > 0:
        d = rollout_decision(r, gate, target, key)
        return (
            d
            if d.value
            else Decision(
                False, Source.VALUE_SOURCE_GLOBAL, d.bucket, d.basis_points, d.hashed_key, d.explanation
            )
        )
    return Decision(False, Source.VALUE_SOURCE_GLOBAL, explanation=f"{gate} is false")


def tts_enabled(cfg: config_pb2.FlynnConfig, target: Target) -> Decision[bool]:
    """Speech for replies: the channel must be listed in tts.enabled_channels, then tts.enabled or its rollout."""
    t = cfg.tts
    if target.channel not in t.enabled_channels:
        return Decision(
            False,
            Source.VALUE_SOURCE_GLOBAL,
            explanation=f"channel {target.channel!r} not in tts.enabled_channels",
        )
    return _bool_gate(t.enabled, t.rollout if t.HasField("rollout") else None, "tts.enabled", target)


def audio_enabled(cfg: config_pb2.FlynnConfig, target: Target) -> Decision[bool]:
    a = cfg.audio
    return _bool_gate(a.enabled, a.rollout if a.HasField("rollout") else None, "audio.enabled", target)


def canvas_enabled(cfg: config_pb2.FlynnConfig, target: Target) -> Decision[bool]:
    ui = cfg.server.nodes.feature_gates.ui
    r = ui.canvas_rollout if ui.HasField("canvas_rollout") else None
    return _bool_gate(ui.canvas, r, "server.nodes.feature_gates.ui.canvas", target, key="node")


def rule_in_rollout(rule: config_pb2.ReactionRule, target: Target) -> Decision[bool]:
    """A rule without a rollout applies to everyone; with one, to the keys inside it."""
    if not rule.HasField("rollout"):
        return Decision(True, Source.VALUE_SOURCE_GLOBAL, explanation="no rollout")
    return rollout_decision(rule.rollout, f"automation.reactions.{rule.id}", target)
