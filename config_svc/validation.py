"""Validation of a whole FlynnConfig before it is committed: every violated field, with its path.

Paths are config-relative dotted paths with list indexes (`automation.reactions[2].trigger.regex`).
Generic checks walk every field (known enum values, non-negative durations and counts, rollout
basis points); semantic checks cover what the types cannot say (roles, lists, the queue rollout).

One owner per field, so an invalid field is reported once: reaction rules (`automation.reactions[i]`
and everything under them) are owned by config_svc/reaction_rules.py, which the reactions service
shares; the generic walk does not enter them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from flynn.v1 import config_pb2
from google.protobuf import descriptor as pb_descriptor
from google.protobuf import duration_pb2
from google.protobuf import message as pb_message

from config_svc.reaction_rules import validate_rules
from flynn_runtime.config_yaml import enum_choices, field_path_error
from flynn_runtime.errors import FieldViolation
from flynn_runtime.histograms import CANCEL_DEADLINE_MAX_S
from flynn_runtime.rollout import BASIS_POINTS_MAX
from flynn_runtime.timestamps import duration_value

FD = pb_descriptor.FieldDescriptor
# Descriptor stubs mark nested types Optional; field handling code works on them untyped.
Field = Any

# int fields that may be negative (everything else is a count, a cap or a size).
_SIGNED_INT_FIELDS = frozenset({"priority"})


def validate_config(cfg: config_pb2.FlynnConfig) -> list[FieldViolation]:
    out: list[FieldViolation] = []
    _walk(cfg, "", out)
    _check_queue(cfg.server.queue, "server.queue", out)
    _check_nonempty_list(cfg.server.nodes.allowed_roles, "server.nodes.allowed_roles", "role name", out)
    _check_nonempty_list(cfg.tts.enabled_channels, "tts.enabled_channels", "channel", out)
    _check_nonempty_list(cfg.tts.engines, "tts.engines", "engine name", out)
    _check_nonempty_list(cfg.audio.engines, "audio.engines", "engine name", out)
    _check_rules(cfg.automation.reactions, "automation.reactions", out)
    return _dedupe(out)


def validate_mask(paths: Iterable[str], field: str = "update_mask") -> list[FieldViolation]:
    """Every mask path must name a field of FlynnConfig (map keys and list items are not addressable)."""
    out: list[FieldViolation] = []
    items = list(paths)
    if not items:
        out.append(
            FieldViolation(field, "is required: list the dotted paths to replace, e.g. server.queue.mode")
        )
    for i, p in enumerate(items):
        why = field_path_error(config_pb2.FlynnConfig.DESCRIPTOR, p)
        if why is not None:
            out.append(FieldViolation(f"{field}.paths[{i}]", f"unknown field path {p!r}: {why}"))
    return out


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _walk(msg: pb_message.Message, path: str, out: list[FieldViolation]) -> None:
    if isinstance(msg, config_pb2.ReactionRule):
        return  # owned by reaction_rules.validate_rules (_check_rules)
    if isinstance(msg, duration_pb2.Duration):
        if msg.seconds < 0 or msg.nanos < 0:
            out.append(FieldViolation(path, "must not be negative"))
        return
    if isinstance(msg, config_pb2.Rollout):
        if not 0 <= msg.basis_points <= BASIS_POINTS_MAX:
            out.append(
                FieldViolation(
                    _join(path, "basis_points"),
                    f"must be between 0 and {BASIS_POINTS_MAX}, got {msg.basis_points}",
                )
            )
    for f, value in msg.ListFields():
        fd: Field = f
        p = _join(path, fd.name)
        is_map = fd.type == FD.TYPE_MESSAGE and fd.message_type.GetOptions().map_entry
        if is_map:
            vfd = fd.message_type.fields_by_name["value"]
            for k, v in value.items():
                kp = f"{p}[{k}]"
                if not k:
                    out.append(FieldViolation(kp, "key must not be empty"))
                if vfd.type == FD.TYPE_MESSAGE:
                    _walk(v, kp, out)
                else:
                    _scalar(vfd, v, kp, out, required_enum=True)
        elif fd.is_repeated:
            for i, v in enumerate(value):
                if fd.type == FD.TYPE_MESSAGE:
                    _walk(v, f"{p}[{i}]", out)
                else:
                    _scalar(fd, v, f"{p}[{i}]", out)
        elif fd.type == FD.TYPE_MESSAGE:
            _walk(value, p, out)
        else:
            _scalar(fd, value, p, out)


def _scalar(
    fd: Field, value: object, path: str, out: list[FieldViolation], required_enum: bool = False
) -> None:
    if fd.type == FD.TYPE_ENUM:
        assert isinstance(value, int)
        if value not in fd.enum_type.values_by_number:
            out.append(
                FieldViolation(
                    path, f"unknown value {value}; expected one of {', '.join(enum_choices(fd.enum_type))}"
                )
            )
        elif required_enum and value == 0:
            out.append(
                FieldViolation(path, f"must be set; expected one of {', '.join(enum_choices(fd.enum_type))}")
            )
    elif fd.type in (FD.TYPE_INT32, FD.TYPE_INT64) and fd.name not in _SIGNED_INT_FIELDS:
        assert isinstance(value, int)
        if value < 0:
            out.append(FieldViolation(path, f"must not be negative, got {value}"))


def _check_queue(q: config_pb2.QueueConfig, path: str, out: list[FieldViolation]) -> None:
    if q.HasField("rollout") and q.rollout.rollout.basis_points > 0 and q.rollout.mode == 0:
        out.append(FieldViolation(f"{path}.rollout.mode", "is required when the rollout has basis points"))
    deadline = duration_value(q.cancel_deadline)
    if deadline > CANCEL_DEADLINE_MAX_S:
        # The cancel histograms' buckets end past this, so a forced cancel is always measured.
        out.append(
            FieldViolation(
                f"{path}.cancel_deadline", f"must be at most {CANCEL_DEADLINE_MAX_S:.0f}s, got {deadline:g}s"
            )
        )


def _check_nonempty_list(items: Iterable[str], path: str, what: str, out: list[FieldViolation]) -> None:
    seen: set[str] = set()
    for i, v in enumerate(items):
        if not v.strip():
            out.append(FieldViolation(f"{path}[{i}]", f"empty {what}"))
        elif v in seen:
            out.append(FieldViolation(f"{path}[{i}]", f"duplicate {what} {v!r}"))
        seen.add(v)


def _check_rules(rules: Iterable[config_pb2.ReactionRule], path: str, out: list[FieldViolation]) -> None:
    out.extend(validate_rules(list(rules), prefix=path))


def _dedupe(items: list[FieldViolation]) -> list[FieldViolation]:
    seen: set[tuple[str, str]] = set()
    out = []
    for v in items:
        if (v.field, v.description) not in seen:
            seen.add((v.field, v.description))
            out.append(v)
    return out
