"""Validation of reaction rules (automation.reactions): the one place that knows what a valid rule is.

The config service runs it before committing a revision (so a bad rule never gets a revision), and
the reactions service runs it on proposed rules (EvaluateEvent dry runs) and, defensively, on every
revision it applies. Every problem names its field (`automation.reactions[2].trigger.regex`).
No gRPC here.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Sequence

import re2
from flynn.v1 import config_pb2

from flynn_runtime.errors import FieldViolation
from flynn_runtime.timestamps import duration_value

MAX_RULES = 5000
MAX_KEYWORDS = 200
MAX_REGEX_LEN = 4096
MAX_ACTIONS = 16
MAX_TEXT_BYTES = 32 * 1024
REGEX_MAX_MEM = 8 << 20
# All regexes of the rule list together: each is compiled with max_mem = its share of this budget
# (reactions compiles each twice: alone and in the FilteredRE2 prefilter), so RE2 itself keeps their
# programs and DFA caches within it. A pattern that does not fit its share is refused, naming it.
REGEX_MEMORY_BUDGET = int(os.environ.get("FLYNN_REGEX_MEMORY_BUDGET_BYTES", str(128 << 20)))

RULE_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

ACTION_KINDS = ("reply", "ack", "submit", "invoke_node", "put_canvas", "speak")
PLACEHOLDERS = ("text", "sender", "session_key", "channel", "run_id", "error_kind", "node_id")
PLACEHOLDER_RE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")

CONDITION_FIELDS = (
    "text",
    "sender",
    "channel",
    "session_key",
    "run_id",
    "error_kind",
    "node_id",
    "node_role",
    "artifact_name",
    "text_length",
    "message_id",
)


def re2_options(max_mem: int = REGEX_MAX_MEM) -> re2.Options:
    o = re2.Options()
    o.log_errors = False
    o.max_mem = max_mem
    return o


def regex_share(count: int, budget: int | None = None) -> int:
    """max_mem of each of `count` regexes sharing the budget (two compilations each), at most REGEX_MAX_MEM."""
    total = REGEX_MEMORY_BUDGET if budget is None else budget
    return max(1, min(REGEX_MAX_MEM, total // max(2 * count, 1)))


def compile_regex(pattern: str, max_mem: int = REGEX_MAX_MEM) -> re2._Regexp:
    """Compile an RE2 pattern over UTF-8 bytes (the engine searches the text encoded once)."""
    return re2.compile(pattern.encode("utf-8"), re2_options(max_mem))


def _re2_message(e: Exception) -> str:
    msg = e.args[0] if e.args else e
    if isinstance(msg, bytes):
        msg = msg.decode("utf-8", "replace")
    return str(msg)


def regex_error(pattern: str, max_mem: int = REGEX_MAX_MEM, count: int = 1) -> str | None:
    try:
        compile_regex(pattern, max_mem)
    except Exception as e:  # re2.error carries the RE2 message as bytes
        if max_mem < REGEX_MAX_MEM:
            try:
                compile_regex(pattern)
            except Exception:  # noqa: BLE001 - invalid on its own: report that below
                pass
            else:
                return (
                    f"needs more than its {max_mem} bytes: the {count} regexes of the rule list share a "
                    f"memory budget of {REGEX_MEMORY_BUDGET} bytes (FLYNN_REGEX_MEMORY_BUDGET_BYTES); "
                    "simplify it or use fewer regexes"
                )
        return f"is not a valid RE2 expression: {_re2_message(e)}"
    return None


def validate_rules(
    rules: Sequence[config_pb2.ReactionRule], prefix: str = "automation.reactions"
) -> list[FieldViolation]:
    """Every problem of a rule list, each naming its field (for config validation and proposed rules)."""
    out: list[FieldViolation] = []

    def bad(path: str, desc: str) -> None:
        out.append(FieldViolation(path, desc))

    if len(rules) > MAX_RULES:
        bad(prefix, f"has {len(rules)} rules; at most {MAX_RULES} allowed")
    seen: dict[str, int] = {}
    regex_count = sum(1 for r in rules if r.trigger.regex)
    share = regex_share(regex_count)
    for i, r in enumerate(rules):
        p = f"{prefix}[{i}]"
        if not RULE_ID_RE.match(r.id):
            bad(f"{p}.id", "is required: 1..128 characters of letters, digits and . _ : -")
        elif r.id in seen:
            bad(f"{p}.id", f"duplicates the id of {prefix}[{seen[r.id]}]")
        else:
            seen[r.id] = i
        _validate_trigger(r.trigger, f"{p}.trigger", bad, share=share, regex_count=regex_count)
        for j, c in enumerate(r.conditions):
            _validate_condition(c, f"{p}.conditions[{j}]", bad)
        _validate_limits(r, p, bad)
        if not r.actions:
            bad(f"{p}.actions", "at least one action is required")
        if len(r.actions) > MAX_ACTIONS:
            bad(f"{p}.actions", f"has {len(r.actions)} actions; at most {MAX_ACTIONS} allowed")
        for j, a in enumerate(r.actions):
            _validate_action(a, f"{p}.actions[{j}]", bad)
    return out


def _validate_trigger(
    t: config_pb2.ReactionTrigger, tp: str, bad: Callable[[str, str], None], *, share: int, regex_count: int
) -> None:
    if t.event not in set(config_pb2.ReactionEventType.values()) - {0}:
        bad(f"{tp}.event", "must name an event type (message_received, run_completed, …)")
    for name in ("channels", "sessions", "senders"):
        for j, v in enumerate(getattr(t, name)):
            if not v or len(v) > 256:
                bad(f"{tp}.{name}[{j}]", "must be 1..256 characters")
    if len(t.keywords) > MAX_KEYWORDS:
        bad(f"{tp}.keywords", f"has {len(t.keywords)} keywords; at most {MAX_KEYWORDS} allowed")
    for j, kw in enumerate(t.keywords):
        if not kw.strip() or len(kw) > 256:
            bad(f"{tp}.keywords[{j}]", "must be 1..256 non-blank characters")
    if t.regex:
        if len(t.regex) > MAX_REGEX_LEN:
            bad(f"{tp}.regex", f"is {len(t.regex)} characters; at most {MAX_REGEX_LEN} allowed")
        else:
            err = regex_error(t.regex, share, regex_count)
            if err:
                bad(f"{tp}.regex", err)


def _validate_condition(c: config_pb2.ReactionCondition, cp: str, bad: Callable[[str, str], None]) -> None:
    if not (c.field in CONDITION_FIELDS or (c.field.startswith("attributes.") and len(c.field) > 11)):
        bad(
            f"{cp}.field",
            f"unknown field {c.field!r}; one of {', '.join(CONDITION_FIELDS)} or attributes.<name>",
        )
    if c.operator not in set(config_pb2.ConditionOperator.values()) - {0}:
        bad(f"{cp}.operator", "must be equals, not_equals, contains, greater_than, less_than or exists")
    elif c.operator in (config_pb2.CONDITION_OPERATOR_GREATER_THAN, config_pb2.CONDITION_OPERATOR_LESS_THAN):
        try:
            float(c.value)
        except ValueError:
            bad(f"{cp}.value", f"must be a number for {config_pb2.ConditionOperator.Name(c.operator)}")


def _validate_limits(r: config_pb2.ReactionRule, p: str, bad: Callable[[str, str], None]) -> None:
    """Priority, cooldown, fire cap, rollout and recursion depth."""
    if r.priority < -1_000_000 or r.priority > 1_000_000:
        bad(f"{p}.priority", "must be between -1000000 and 1000000")
    if r.cooldown.seconds < 0 or r.cooldown.nanos < 0 or r.cooldown.seconds > 7 * 86400:
        bad(f"{p}.cooldown", "must be between 0 and 7 days")
    if r.cooldown_key not in config_pb2.CooldownKey.values():
        bad(f"{p}.cooldown_key", f"unknown value {r.cooldown_key}")
    if r.fire_cap.max_fires < 0 or r.fire_cap.max_fires > 100_000:
        bad(f"{p}.fire_cap.max_fires", "must be between 0 and 100000")
    w = duration_value(r.fire_cap.window)
    if r.fire_cap.max_fires > 0 and (w <= 0 or w > 7 * 86400):
        bad(f"{p}.fire_cap.window", "must be between 0 (exclusive) and 7 days when max_fires is set")
    elif w < 0 or r.fire_cap.window.nanos < 0:
        bad(f"{p}.fire_cap.window", "must not be negative")
    if r.HasField("rollout") and not 0 <= r.rollout.basis_points <= 10000:
        bad(f"{p}.rollout.basis_points", "must be between 0 and 10000")
    if r.rollout.stickiness not in config_pb2.Stickiness.values():
        bad(f"{p}.rollout.stickiness", f"unknown value {r.rollout.stickiness}")
    if r.max_depth < 0 or r.max_depth > 16:
        bad(f"{p}.max_depth", "must be between 0 and 16")


def _validate_action(a: config_pb2.ReactionAction, ap: str, bad: Callable[[str, str], None]) -> None:
    kind = a.WhichOneof("action")
    if kind is None:
        bad(ap, f"unknown or missing action; exactly one of {', '.join(ACTION_KINDS)}")
        return

    def texty(path: str, value: str, required: bool = True) -> None:
        if required and not value.strip():
            bad(path, "is required")
        elif len(value.encode("utf-8")) > MAX_TEXT_BYTES:
            bad(path, f"is longer than {MAX_TEXT_BYTES} bytes")
        for m in PLACEHOLDER_RE.finditer(value):
            if m.group(1) not in PLACEHOLDERS:
                bad(path, f"unknown placeholder {{{m.group(1)}}}; known: {', '.join(PLACEHOLDERS)}")
                break

    if kind == "reply":
        texty(f"{ap}.reply.text", a.reply.text)
    elif kind == "ack":
        if not a.ack.emoji or len(a.ack.emoji) > 32:
            bad(f"{ap}.ack.emoji", "must be 1..32 characters")
    elif kind == "submit":
        texty(f"{ap}.submit.text", a.submit.text)
    elif kind == "invoke_node":
        if not a.invoke_node.command or len(a.invoke_node.command) > 128:
            bad(f"{ap}.invoke_node.command", "must be 1..128 characters")
        if a.invoke_node.args_json:
            texty(f"{ap}.invoke_node.args_json", a.invoke_node.args_json, required=False)
            try:
                # Placeholders are substituted JSON-escaped, so the template must parse with them blanked.
                json.loads(PLACEHOLDER_RE.sub("x", a.invoke_node.args_json))
            except ValueError as e:
                bad(f"{ap}.invoke_node.args_json", f"is not JSON: {e}")
        t = a.invoke_node.timeout
        if t.seconds < 0 or t.nanos < 0 or t.seconds > 300:
            bad(f"{ap}.invoke_node.timeout", "must be between 0 and 300 s")
    elif kind == "put_canvas":
        texty(f"{ap}.put_canvas.name", a.put_canvas.name)
        if not a.put_canvas.content_type:
            bad(f"{ap}.put_canvas.content_type", "is required")
        texty(f"{ap}.put_canvas.content", a.put_canvas.content, required=False)
    elif kind == "speak":
        texty(f"{ap}.speak.text", a.speak.text)
