"""Reaction rules: compilation (validation lives in config_svc/reaction_rules.py) into a form the engine evaluates fast.

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
from flynn.v1 import config_pb2, reactions_pb2

from config_svc.reaction_rules import PLACEHOLDER_RE, compile_regex, re2_options, regex_share
from flynn_runtime.enum_names import short_name, short_names
from flynn_runtime.timestamps import duration_seconds
from reactions_svc.trace import Trace

# Words of a text for keyword matching: letters, digits and underscore (Unicode-aware).
WORD_RE = re.compile(r"\w+")
_WORD_ONLY_RE = re.compile(r"^\w+$")

EVENT_TYPE_NAMES: dict[int, str] = short_names(config_pb2.ReactionEventType)


def event_type_name(value: int) -> str:
    return EVENT_TYPE_NAMES.get(value, str(value))


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
    name = short_name(config_pb2.ConditionOperator, op)
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


def compile_rule(r: config_pb2.ReactionRule, index: int, regex_mem: int = 8 << 20) -> CompiledRule:
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
        regex=compile_regex(r.trigger.regex, regex_mem) if r.trigger.regex else None,
        conditions=tuple(_compile_condition(c) for c in r.conditions),
        priority=r.priority,
        cooldown_s=duration_seconds(r.cooldown),
        cooldown_key=r.cooldown_key or config_pb2.COOLDOWN_KEY_SESSION,
        max_fires=r.fire_cap.max_fires,
        window_s=duration_seconds(r.fire_cap.window),
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
        # Every regex gets its share of the rule list's regex memory budget (config_svc.reaction_rules).
        share = regex_share(sum(1 for r in ordered if r.trigger.regex))
        self.rules: list[CompiledRule] = [compile_rule(r, i, share) for i, r in enumerate(ordered)]
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
                ti.regex_filter = _regex_filter([c.rule.trigger.regex for c in ti.regex_rules], share)
        self._statics: StaticTraces | None = None

    @property
    def statics(self) -> StaticTraces:
        """The skip traces that never change for this rule set (built on the first evaluation)."""
        if self._statics is None:
            self._statics = StaticTraces(self)
        return self._statics

    def __len__(self) -> int:
        return len(self.rules)


SKIP_SCOPE = reactions_pb2.SKIP_REASON_SCOPE
SKIP_DISABLED = reactions_pb2.SKIP_REASON_DISABLED


class StaticTraces:
    """Traces that never change for a rule set, built once: per event type the rules that cannot fire on
    it (disabled, other type), and per rule its scope skips, so most skips cost no allocation."""

    def __init__(self, rules: RuleSet) -> None:
        self._rules = rules
        self._by_type: dict[int, list[Trace | None]] = {}
        self.channel = [
            Trace(c.id, False, SKIP_SCOPE, "channel not in trigger.channels") for c in rules.rules
        ]
        self.session = [
            Trace(c.id, False, SKIP_SCOPE, "session not in trigger.sessions") for c in rules.rules
        ]
        self.sender = [Trace(c.id, False, SKIP_SCOPE, "sender not in trigger.senders") for c in rules.rules]
        self.keyword = [Trace(c.id, False, SKIP_SCOPE, "no trigger keyword in text") for c in rules.rules]
        self.regex = [
            Trace(c.id, False, SKIP_SCOPE, "trigger.regex did not match the text") for c in rules.rules
        ]

    def for_type(self, t: int) -> list[Trace | None]:
        got = self._by_type.get(t)
        if got is None:
            name = event_type_name(t)
            got = []
            for c in self._rules.rules:
                if not c.enabled:
                    got.append(
                        Trace(c.id, False, SKIP_DISABLED, "rule is disabled", listening=c.event_type == t)
                    )
                elif c.event_type != t:
                    got.append(
                        Trace(
                            c.id,
                            False,
                            SKIP_SCOPE,
                            f"rule listens to {event_type_name(c.event_type)}, event is {name}",
                            listening=False,
                        )
                    )
                else:
                    got.append(None)
            self._by_type[t] = got
        return got


def _regex_filter(patterns: list[str], max_mem: int) -> re2.Filter | None:
    """A FilteredRE2 over the patterns (indexes in order), or None when RE2 refuses it (per-rule search then)."""
    try:
        f = re2.Filter()
        for p in patterns:
            f.Add(p.encode("utf-8"), re2_options(max_mem))
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

    return PLACEHOLDER_RE.sub(repl, template)
