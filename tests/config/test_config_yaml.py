"""Unit tests of the YAML <-> FlynnConfig translation and of validation (no servers)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from flynn.v1 import config_pb2

from config_svc.validation import validate_config, validate_mask
from flynn_runtime import config_yaml as cy

SEED = Path(__file__).resolve().parents[2] / "config" / "flynn.yaml"


def test_seed_file_is_valid_and_has_the_playbook_keys() -> None:
    cfg = cy.yaml_to_config(SEED.read_text())
    assert validate_config(cfg) == []
    assert cfg.server.queue.mode == config_pb2.QUEUE_MODE_COLLECT
    assert cfg.server.nodes.enabled and list(cfg.server.nodes.allowed_roles) == ["desktop", "phone"]
    assert cfg.server.nodes.feature_gates.ui.canvas
    assert cfg.tts.enabled and list(cfg.tts.enabled_channels) == ["voice-demo"]
    assert list(cfg.tts.engines) == ["piper", "espeak-ng"]
    assert cfg.audio.enabled
    assert 3 <= len(cfg.automation.reactions) <= 5
    ack = cfg.automation.reactions[0]
    assert (
        ack.trigger.event == config_pb2.REACTION_EVENT_TYPE_MESSAGE_RECEIVED
        and ack.actions[0].ack.emoji == "👀"
    )
    assert any(r.trigger.event == config_pb2.REACTION_EVENT_TYPE_RUN_ERROR for r in cfg.automation.reactions)


def test_friendly_enums_durations_and_dotted_keys() -> None:
    cfg = cy.dict_to_config(
        {
            "server.queue.mode": "interrupt",
            "server": {"queue": {"drop": "old", "quiet_window": "500ms", "cancel_deadline": "1m30s"}},
            "server.queue.rollout": {
                "mode": "STEER",
                "rollout": {"basis_points": 500, "stickiness": "session"},
            },
            "automation": {
                "reactions": [
                    {
                        "id": "r",
                        "trigger": {"event": "message_received"},
                        "conditions": [{"field": "text", "operator": "equals", "value": "x"}],
                        "cooldown": 2,
                        "actions": [{"reply": {"text": "hi"}}],
                    }
                ]
            },
        }
    )
    q = cfg.server.queue
    assert q.mode == config_pb2.QUEUE_MODE_INTERRUPT and q.drop == config_pb2.DROP_POLICY_OLD
    assert (q.quiet_window.seconds, q.quiet_window.nanos) == (0, 500_000_000)
    assert q.cancel_deadline.seconds == 90
    assert (
        q.rollout.mode == config_pb2.QUEUE_MODE_STEER
        and q.rollout.rollout.stickiness == config_pb2.STICKINESS_SESSION
    )
    rule = cfg.automation.reactions[0]
    assert rule.conditions[0].operator == config_pb2.CONDITION_OPERATOR_EQUALS and rule.cooldown.seconds == 2
    # Round trip: proto -> friendly dict -> proto is the identity.
    back = cy.dict_to_config(cy.config_to_dict(cfg))
    assert back == cfg
    assert cy.config_to_dict(cfg)["server"]["queue"]["mode"] == "interrupt"
    assert cy.config_to_dict(cfg)["server"]["queue"]["quiet_window"] == "500ms"


def test_parse_errors_name_every_path() -> None:
    with pytest.raises(cy.ConfigParseError) as e:
        cy.dict_to_config(
            {
                "server.queue.mode": "sometimes",
                "server": {"queue": {"cap": "many"}},
                "automation": {"reactions": [{"id": "a"}, {"id": "b", "trigger": {"event": "moon_landing"}}]},
                "tts.deadline": "3 parsecs",
                "bogus": 1,
            }
        )
    fields = {v.field for v in e.value.violations}
    assert fields == {
        "server.queue.mode",
        "server.queue.cap",
        "automation.reactions[1].trigger.event",
        "tts.deadline",
        "bogus",
    }


@pytest.mark.parametrize(
    ("text", "ns"),
    [
        ("2s", 2_000_000_000),
        ("500ms", 500_000_000),
        ("1m30s", 90_000_000_000),
        ("1.5s", 1_500_000_000),
        ("250us", 250_000),
        (3, 3_000_000_000),
        ("-1s", -1_000_000_000),
        ("0", 0),
    ],
)
def test_durations(text: object, ns: int) -> None:
    assert cy.parse_duration_ns(text) == ns


def test_diff_is_leaf_paths_with_json_values() -> None:
    old = cy.dict_to_config({"server.queue.mode": "collect", "tts.enabled_channels": ["a"]})
    new = cy.dict_to_config(
        {"server.queue.mode": "interrupt", "tts.enabled_channels": ["a", "b"], "audio.enabled": True}
    )
    d = {p: (a, b) for p, a, b in cy.diff(old, new)}
    assert d == {
        "server.queue.mode": ('"collect"', '"interrupt"'),
        "tts.enabled_channels": ('["a"]', '["a", "b"]'),
        "audio.enabled": ("", "true"),
    }
    assert all(json.loads(b) is not None for _, (_, b) in d.items())


def _rule(**kw: object) -> dict[str, object]:
    base: dict[str, object] = {
        "id": "r",
        "trigger": {"event": "message_received"},
        "actions": [{"reply": {"text": "x"}}],
    }
    base.update(kw)
    return base


def test_validation_reports_every_violated_field() -> None:
    cfg = cy.dict_to_config(
        {
            "server.nodes.allowed_roles": ["desktop", ""],
            "server.queue.cap": -1,
            "server.queue.quiet_window": "-2s",
            "server.queue.overrides.sessions": {"s1": "interrupt"},
            "tts.rollout.basis_points": 10_001,
            "automation.reactions": [
                _rule(id="dup"),
                _rule(id="dup"),
                _rule(id="bad-re", trigger={"event": "message_received", "regex": "(unclosed"}),
                _rule(id=""),
                _rule(id="no-action", actions=[{}]),
                _rule(id="no-event", trigger={"channels": ["x"]}),
                _rule(id="neg", cooldown="-1s", rollout={"basis_points": -5}),
                _rule(id="backref", trigger={"event": "message_received", "regex": r"(a)\1"}),
            ],
        }
    )
    cfg.server.queue.mode = 42  # type: ignore[assignment]  # an unknown enum number, as grpcurl can send
    fields = {v.field for v in validate_config(cfg)}
    assert fields == {
        "server.nodes.allowed_roles[1]",
        "server.queue.cap",
        "server.queue.quiet_window",
        "server.queue.mode",
        "tts.rollout.basis_points",
        "automation.reactions[1].id",
        "automation.reactions[2].trigger.regex",
        "automation.reactions[3].id",
        "automation.reactions[4].actions[0]",
        "automation.reactions[5].trigger.event",
        "automation.reactions[6].cooldown",
        "automation.reactions[6].rollout.basis_points",
        "automation.reactions[7].trigger.regex",
    }


def test_mask_validation() -> None:
    assert validate_mask(["server.queue.mode", "automation.reactions", "tts"]) == []
    bad = {
        v.field: v.description
        for v in validate_mask(["server.queue.nope", "automation.reactions.id", "", "x"])
    }
    assert set(bad) == {
        "update_mask.paths[0]",
        "update_mask.paths[1]",
        "update_mask.paths[2]",
        "update_mask.paths[3]",
    }
    assert [v.field for v in validate_mask([])] == ["update_mask"]


def test_map_keys_keep_their_dots_and_dotted_levels_merge() -> None:
    cfg = cy.dict_to_config(
        {
            "server.queue.overrides.sessions": {"web:user.name@example.com": "steer"},
            "server": {"queue.cap": 3, "queue": {"mode": "followup"}},
            "server.queue.drop": "new",
        }
    )
    q = cfg.server.queue
    assert dict(q.overrides.sessions) == {"web:user.name@example.com": config_pb2.QUEUE_MODE_STEER}
    assert (q.cap, q.mode, q.drop) == (3, config_pb2.QUEUE_MODE_FOLLOWUP, config_pb2.DROP_POLICY_NEW)
    with pytest.raises(cy.ConfigParseError):
        cy.dict_to_config({"server.queue.cap": 1, "server": {"queue": {"cap": 2}}})


@pytest.mark.parametrize(
    ("ns", "text"),
    [
        (600 * 10**9, "10m"),
        (90 * 10**9, "1m30s"),
        (5400 * 10**9, "1h30m"),
        (500 * 10**6, "500ms"),
        (-2 * 10**9, "-2s"),
        (0, "0s"),
    ],
)
def test_duration_formatting_round_trips(ns: int, text: str) -> None:
    from google.protobuf import duration_pb2

    d = duration_pb2.Duration()
    d.FromNanoseconds(ns)
    assert cy.format_duration(d) == text and cy.parse_duration_ns(text) == ns
