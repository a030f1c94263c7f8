"""Validation of rule lists outside the config service (EvaluateEvent proposed_rules, the replay tool).

The config service's own validator (config_svc.validation.validate_config) is applied first, so a rule
is refused here for the same reasons it would be refused by UpdateConfig; the engine's stricter checks
(condition fields, placeholders, ranges) are added on top. Paths are renamed to the caller's prefix.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from flynn.v1 import config_pb2

from config_svc.reaction_rules import validate_rules
from flynn_runtime.errors import FieldViolation

_config_validate: Callable[[config_pb2.FlynnConfig], list[FieldViolation]] | None
try:
    from config_svc.validation import validate_config as _config_validate
except ImportError:  # the reactions service can run without the config service's package
    _config_validate = None

_CONFIG_PREFIX = "automation.reactions"


def validate_rule_list(
    rules: Sequence[config_pb2.ReactionRule], prefix: str = _CONFIG_PREFIX
) -> list[FieldViolation]:
    out: list[FieldViolation] = []
    if _config_validate is not None:
        cfg = config_pb2.FlynnConfig()
        cfg.automation.reactions.extend(rules)
        for v in _config_validate(cfg):
            if v.field.startswith(_CONFIG_PREFIX):
                out.append(FieldViolation(prefix + v.field[len(_CONFIG_PREFIX) :], v.description))
    seen_fields = {v.field for v in out}
    for v in validate_rules(rules, prefix=prefix):
        # One message per field: the config service's wording wins where both object.
        if v.field not in seen_fields:
            out.append(v)
    return out
