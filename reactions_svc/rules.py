"""Reaction rules: validation (field paths named) and compilation into a form the engine evaluates fast.

A rule list is compiled once per config revision. Everything an evaluation needs is precomputed here:
the evaluation order (priority desc, id asc), per event type the rules listening to it, scope sets,
a keyword index (word -> rules) and RE2 regexes (linear time, never backtracking), condition closures,
and the skip traces that never change (disabled, wrong event type), so an evaluation allocates only for
the rules actually listening to the event.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import re2
from flynn.v1 import config_pb2

from flynn_runtime.errors import FieldViolation

MAX_RULES = 5000
MAX_KEYWORDS = 200
MAX_REGEX_LEN = 4096
MAX_ACTIONS = 16
MAX_TEXT_BYTES = 32 * 1024
REGEX_MAX_MEM = 8 << 20

_RULE_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
# Words of a text for keyword matching: letters, digits and underscore (Unicode-aware).
WORD_RE = re.compile(r"\w+")
_WORD_ONLY_RE = re.compile(r"^\w+$")

ACTION_KINDS = ("reply", "ack", "submit", "invoke_node", "put_canvas", "speak")
PLACEHOLDERS = ("text", "sender", "session_key", "channel", "run_id", "error_kind", "node_id")
_PLACEHOLDER_RE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")

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

EVENT_TYPE_NAMES: dict[int, str] = {
    v: k.removeprefix("REACTION_EVENT_TYPE_").lower() for k, v in config_pb2.ReactionEventType.items()
}


def event_type_name(value: int) -> str:
    return EVENT_TYPE_NAMES.get(value, str(value))


def _re2_options(max_mem: int = REGEX_MAX_MEM) -> re2.Options:
    o = re2.Options()
    o.log_errors = False
    o.max_mem = max_mem
    return o


def compile_regex(pattern: str) -> re2._Regexp:
    """Compile an RE2 pattern over UTF-8 bytes (the engine searches the text encoded once)."""
    return re2.compile(pattern.encode("utf-8"), _re2_options())


def _regex_error(pattern: str) -> str | None:
    try:
        compile_regex(pattern)
    except Exception as e:  # re2.error carries the RE2 message as bytes
        msg = e.args[0] if e.args else e
        if isinstance(msg, bytes):
            msg = msg.decode("utf-8", "replace")
        return f"is not a valid RE2 expression: {msg}"
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
    known_types = set(config_pb2.ReactionEventType.values()) - {0}
    for i, r in enumerate(rules):
        p = f"{prefix}[{i}]"
        if not _RULE_ID_RE.match(r.id):
            bad(f"{p}.id", "is required: 1..128 characters of letters, digits and . _ : -")
        elif r.id in seen:
            bad(f"{p}.id", f"duplicates the id of {prefix}[{seen[r.id]}]")
        else:
            seen[r.id] = i
        t = r.trigger
        if t.event not in known_types:
            bad(f"{p}.trigger.event", "must name an event type (message_received, run_completed, …)")
        for name in ("channels", "sessions", "senders"):
            for j, v in enumerate(getattr(t, name)):
                if not v or len(v) > 256:
                    bad(f"{p}.trigger.{name}[{j}]", "must be 1..256 characters")
        if len(t.keywords) > MAX_KEYWORDS:
            bad(f"{p}.trigger.keywords", f"has {len(t.keywords)} keywords; at most {MAX_KEYWORDS} allowed")
        for j, kw in enumerate(t.keywords):
            if not kw.strip() or len(kw) > 256:
                bad(f"{p}.trigger.keywords[{j}]", "must be 1..256 non-blank characters")
        if t.regex:
            if len(t.regex) > MAX_REGEX_LEN:
                bad(f"{p}.trigger.regex", f"is {len(t.regex)} characters; at most {MAX_REGEX_LEN} allowed")
            else:
                err = _regex_error(t.regex)
                if err:
                    bad(f"{p}.trigger.regex", err)
        for j, c in enumerate(r.conditions):
            cp = f"{p}.conditions[{j}]"
            if not (c.field in CONDITION_FIELDS or (c.field.startswith("attributes.") and len(c.field) > 11)):
                bad(
                    f"{cp}.field",
                    f"unknown field {c.field!r}; one of {', '.join(CONDITION_FIELDS)} or attributes.<name>",
                )
            if c.operator not in set(config_pb2.ConditionOperator.values()) - {0}:
                bad(
                    f"{cp}.operator",
                    "must be equals, not_equals, contains, greater_than, less_than or exists",
                )
            elif c.operator in (
                config_pb2.CONDITION_OPERATOR_GREATER_THAN,
                config_pb2.CONDITION_OPERATOR_LESS_THAN,
            ):
                try:
                    float(c.value)
                except ValueError:
                    bad(
                        f"{cp}.value", f"must be a number for {config_pb2.ConditionOperator.Name(c.operator)}"
                    )
        if r.priority < -1_000_000 or r.priority > 1_000_000:
            bad(f"{p}.priority", "must be between -1000000 and 1000000")
        if r.cooldown.seconds < 0 or r.cooldown.nanos < 0 or r.cooldown.seconds > 7 * 86400:
            bad(f"{p}.cooldown", "must be between 0 and 7 days")
        if r.cooldown_key not in config_pb2.CooldownKey.values():
            bad(f"{p}.cooldown_key", f"unknown value {r.cooldown_key}")
        if r.fire_cap.max_fires < 0 or r.fire_cap.max_fires > 100_000:
            bad(f"{p}.fire_cap.max_fires", "must be between 0 and 100000")
        if r.fire_cap.max_fires > 0:
            w = r.fire_cap.window.seconds + r.fire_cap.window.nanos / 1e9
            if w <= 0 or w > 7 * 86400:
                bad(f"{p}.fire_cap.window", "must be between 0 (exclusive) and 7 days when max_fires is set")
        if r.HasField("rollout") and not 0 <= r.rollout.basis_points <= 10000:
            bad(f"{p}.rollout.basis_points", "must be between 0 and 10000")
        if r.max_depth < 0 or r.max_depth > 16:
            bad(f"{p}.max_depth", "must be between 0 and 16")
        if not r.actions:
            bad(f"{p}.actions", "at least one action is required")
        if len(r.actions) > MAX_ACTIONS:
            bad(f"{p}.actions", f"has {len(r.actions)} actions; at most {MAX_ACTIONS} allowed")
        for j, a in enumerate(r.actions):
            _validate_action(a, f"{p}.actions[{j}]", bad)
    return out


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
        for m in _PLACEHOLDER_RE.finditer(value):
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
                json.loads(_PLACEHOLDER_RE.sub("x", a.invoke_node.args_json))
            except ValueError as e:
                bad(f"{ap}.invoke_node.args_json", f"is not JSON: {e}")
        t = a.invoke_node.timeout
        if t.seconds < 0 or t.seconds > 300:
            bad(f"{ap}.invoke_node.timeout", "must be between 0 and 300 s")
    elif kind == "put_canvas":
        texty(f"{ap}.put_canvas.name", a.put_canvas.name)
        if not a.put_canvas.content_type:
            bad(f"{ap}.put_canvas.content_type", "is required")
        texty(f"{ap}.put_canvas.content", a.put_canvas.content, required=False)
    elif kind == "speak":
        texty(f"{ap}.speak.text", a.speak.text)


# Compilation -------------------------------------------------------------------------------------

EventView = Callable[[str], str]


@dataclass(frozen=True, slots=True)
class Condition:
    field: str
    describe: str
    test: Callable[[str], bool]


def _compile_condition(c: config_pb2.ReactionCondition) -> Condition:
    op = c.operator
    v = c.value
    name = config_pb2.ConditionOperator.Name(op).removeprefix("CONDITION_OPERATOR_").lower()
    describe = (
        f"{c.field} {name} {v!r}" if op != config_pb2.CONDITION_OPERATOR_EXISTS else f"{c.field} exists"
    )
    test: Callable[[str], bool]
    if op == config_pb2.CONDITION_OPERATOR_EQUALS:
        test = v.__eq__
    elif op == config_pb2.CONDITION_OPERATOR_NOT_EQUALS:
        test = v.__ne__
    elif op == config_pb2.CONDITION_OPERATOR_CONTAINS:
        lowered = v.lower()
        test = lambda s: lowered in s.lower()  # noqa: E731
    elif op in (config_pb2.CONDITION_OPERATOR_GREATER_THAN, config_pb2.CONDITION_OPERATOR_LESS_THAN):
        num = float(v)
        gt = op == config_pb2.CONDITION_OPERATOR_GREATER_THAN

        def test(s: str) -> bool:
            try:
                x = float(s)
            except ValueError:
                return False
            return x > num if gt else x < num
    else:
        test = bool
    return Condition(c.field, describe, test)


@dataclass(slots=True)
class CompiledRule:
    index: int  # position in evaluation order
    rule: config_pb2.ReactionRule
    id: str
    enabled: bool
    event_type: int
    channels: frozenset[str]
    sessions: frozenset[str]
    senders: frozenset[str]
    words: tuple[str, ...]  # single-word keywords, lower-cased (matched against the word set)
    phrases: tuple[str, ...]  # other keywords, lower-cased (substring of the lower-cased text)
    regex: re2._Regexp | None
    conditions: tuple[Condition, ...]
    priority: int
    cooldown_s: float
    cooldown_key: int
    max_fires: int
    window_s: float
    exclusive: bool
    has_rollout: bool
    allow_reaction_origin: bool
    max_depth: int
    action_kinds: tuple[str, ...]
    # Filled by RuleSet: the rule's position among the regex rules of its event type.
    regex_slot: int = -1
    # Rollout decisions by (session, channel); bounded, cleared when full.
    rollout_cache: dict[tuple[str, str], tuple[bool, str]] = field(default_factory=dict)


@dataclass(slots=True)
class TypeIndex:
    """Rules listening to one event type, and what their text scope needs."""

    rules: list[CompiledRule] = field(default_factory=list)
    keyword_index: dict[str, list[int]] = field(default_factory=dict)  # word -> rule indexes
    any_keywords: bool = False
    regex_rules: list[CompiledRule] = field(default_factory=list)
    # FilteredRE2 over every regex of the type: literal atoms select the candidates, RE2 confirms them,
    # so many regexes cost about one pass plus the few candidates (a RE2::Set DFA blows up on `a.*b`).
    regex_filter: re2.Filter | None = None


def _duration_s(d: object) -> float:
    return float(getattr(d, "seconds", 0)) + float(getattr(d, "nanos", 0)) / 1e9


def compile_rule(r: config_pb2.ReactionRule, index: int) -> CompiledRule:
    words: list[str] = []
    phrases: list[str] = []
    for kw in r.trigger.keywords:
        k = kw.strip().lower()
        (words if _WORD_ONLY_RE.match(k) else phrases).append(k)
    return CompiledRule(
        index=index,
        rule=r,
        id=r.id,
        enabled=r.enabled,
        event_type=r.trigger.event,
        channels=frozenset(r.trigger.channels),
        sessions=frozenset(r.trigger.sessions),
        senders=frozenset(r.trigger.senders),
        words=tuple(words),
        phrases=tuple(phrases),
        regex=compile_regex(r.trigger.regex) if r.trigger.regex else None,
        conditions=tuple(_compile_condition(c) for c in r.conditions),
        priority=r.priority,
        cooldown_s=_duration_s(r.cooldown),
        cooldown_key=r.cooldown_key or config_pb2.COOLDOWN_KEY_SESSION,
        max_fires=r.fire_cap.max_fires,
        window_s=_duration_s(r.fire_cap.window),
        exclusive=r.exclusive,
        has_rollout=r.HasField("rollout"),
        allow_reaction_origin=r.allow_reaction_origin,
        max_depth=r.max_depth or 1,
        action_kinds=tuple(a.WhichOneof("action") or "" for a in r.actions),
    )


def evaluation_order(rules: Iterable[config_pb2.ReactionRule]) -> list[config_pb2.ReactionRule]:
    """Higher priority first; ties by rule id."""
    return sorted(rules, key=lambda r: (-r.priority, r.id))


class RuleSet:
    """A compiled rule list of one config revision. Immutable once built; swapped whole on change."""

    def __init__(self, rules: Sequence[config_pb2.ReactionRule], revision: int = 0) -> None:
        self.revision = revision
        ordered = evaluation_order(rules)
        self.rules: list[CompiledRule] = [compile_rule(r, i) for i, r in enumerate(ordered)]
        self.by_id = {c.id: c for c in self.rules}
        self.by_type: dict[int, TypeIndex] = {}
        for c in self.rules:
            if not c.enabled:
                continue
            ti = self.by_type.setdefault(c.event_type, TypeIndex())
            ti.rules.append(c)
            for w in c.words:
                ti.keyword_index.setdefault(w, []).append(c.index)
            if c.words or c.phrases:
                ti.any_keywords = True
            if c.regex is not None:
                c.regex_slot = len(ti.regex_rules)
                ti.regex_rules.append(c)
        for ti in self.by_type.values():
            if len(ti.regex_rules) > 1:
                ti.regex_filter = _regex_filter([c.rule.trigger.regex for c in ti.regex_rules])

    def __len__(self) -> int:
        return len(self.rules)


def _regex_filter(patterns: list[str]) -> re2.Filter | None:
    """A FilteredRE2 over the patterns (indexes in order), or None when RE2 refuses it (per-rule search then)."""
    try:
        f = re2.Filter()
        for p in patterns:
            f.Add(p.encode("utf-8"), _re2_options())
        f.Compile()
        return f
    except Exception:
        return None


def substitute(template: str, values: dict[str, str], *, json_escape: bool = False) -> str:
    """Replace {name} placeholders; unknown names stay as they are."""

    def repl(m: re.Match[str]) -> str:
        name = m.group(1)
        if name not in values:
            return m.group(0)
        v = values[name]
        return json.dumps(v)[1:-1] if json_escape else v

    return _PLACEHOLDER_RE.sub(repl, template)
