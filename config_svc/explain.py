"""ExplainConfig: the effective value of a key for (session, channel, node) and the rule that produced it.

Gate keys go through flynn_runtime.targeting (the function every service uses); any other field path
reports its global value (or the built-in default when unset).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flynn.v1 import config_pb2

from flynn_runtime import config_yaml, targeting
from flynn_runtime.errors import invalid_argument, not_found

Source = config_pb2.ValueSource


@dataclass(frozen=True)
class Explanation:
    key: str
    value_json: str
    source: config_pb2.ValueSource.ValueType
    bucket: int = 0
    basis_points: int = 0
    hashed_key: str = ""
    explanation: str = ""


def _from_decision(key: str, d: targeting.Decision[Any], value: Any) -> Explanation:
    rollout_applies = bool(d.hashed_key)
    return Explanation(
        key=key,
        value_json=config_yaml.to_json(value),
        source=d.source,
        bucket=d.bucket if rollout_applies else 0,
        basis_points=d.basis_points if rollout_applies else 0,
        hashed_key=d.hashed_key,
        explanation=d.explanation,
    )


def explain(cfg: config_pb2.FlynnConfig, key: str, target: targeting.Target) -> Explanation:
    if not key:
        raise invalid_argument("key", "is required (for example server.queue.mode)")
    if key == "server.queue.mode":
        d = targeting.queue_mode(cfg, target)
        return _from_decision(key, d, config_yaml.enum_to_text(config_pb2.QueueMode.DESCRIPTOR, d.value))
    gates = {
        "tts.enabled": targeting.tts_enabled,
        "audio.enabled": targeting.audio_enabled,
        "server.nodes.feature_gates.ui.canvas": targeting.canvas_enabled,
    }
    if key in gates:
        b = gates[key](cfg, target)
        return _from_decision(key, b, b.value)
    if key.startswith("automation.reactions."):
        rule_id = key[len("automation.reactions.") :]
        rule_id = rule_id.removesuffix(".rollout")
        for rule in cfg.automation.reactions:
            if rule.id == rule_id:
                r = targeting.rule_in_rollout(rule, target)
                if not rule.enabled:
                    return Explanation(
                        key, "false", Source.VALUE_SOURCE_GLOBAL, explanation=f"rule {rule_id} is disabled"
                    )
                return _from_decision(key, r, r.value)
        raise not_found("rule", rule_id, reason="RULE_NOT_FOUND")
    try:
        value = config_yaml.value_at(cfg, key)
    except KeyError:
        raise invalid_argument(
            "key",
            f"{key!r} is not a config key (try server.queue.mode, tts.enabled, automation.reactions.<id>)",
        ) from None
    flat = config_yaml.flatten(cfg)
    is_set = any(p == key or p.startswith(key + ".") or p.startswith(key + "[") for p in flat)
    source = Source.VALUE_SOURCE_GLOBAL if is_set else Source.VALUE_SOURCE_DEFAULT
    why = f"{key} (global value)" if is_set else f"{key} is unset; the built-in default applies"
    return Explanation(key, config_yaml.to_json(value), source, explanation=why)
