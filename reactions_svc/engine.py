"""The rules engine: one event against a compiled rule set, in priority order, one trace per rule.

Pure Python, no I/O: cooldowns and fire windows live in a `FireState` the caller persists. Order of
the checks (the first that fails is the skip reason):

    disabled -> scope (event type, channel, session, sender, keywords, regex) -> condition
    -> recursion_guard -> rollout -> exclusive -> cooldown -> max_fires -> match

so a rule that could never have fired for an event says "scope" or "condition" rather than a
runtime reason, and a runtime reason (cooldown, max_fires) is only given for events the rule wanted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

from flynn.v1 import common_pb2, config_pb2, reactions_pb2

from flynn_runtime.enum_names import short_names
from flynn_runtime.targeting import Target, rule_in_rollout
from reactions_svc.rules import WORD_RE, CompiledRule, RuleSet, StaticTraces, TypeIndex
from reactions_svc.rules import event_type_name as event_type_name
from reactions_svc.trace import Trace

__all__ = [
    "MATCHED",
    "SKIP_ACTION_ERROR",
    "SKIP_CONDITION",
    "SKIP_COOLDOWN",
    "SKIP_DISABLED",
    "SKIP_EXCLUSIVE",
    "SKIP_MAX_FIRES",
    "SKIP_RECURSION",
    "SKIP_ROLLOUT",
    "SKIP_SCOPE",
    "Evaluation",
    "FireState",
    "Trace",
    "bound_text",
    "child_causation",
    "evaluate",
    "event_type_name",
    "reason_name",
]

MAX_EVAL_BYTES = 64 * 1024

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

REASON_NAMES: dict[int, str] = short_names(reactions_pb2.SkipReason, with_zero=False)


def reason_name(reason: int) -> str:
    return REASON_NAMES.get(reason, "match" if reason == 0 else str(reason))


@dataclass(slots=True)
class Evaluation:
    event_id: str
    revision: int
    traces: list[Trace]
    matched: list[CompiledRule]


def bound_text(text: str, limit: int = MAX_EVAL_BYTES) -> str:
    """At most `limit` bytes of UTF-8 (cut on a character boundary); a 1 MB text costs O(limit)."""
    if len(text) <= limit // 4:
        return text
    head = text[:limit]
    raw = head.encode("utf-8", "replace")
    if len(raw) <= limit:
        return head
    return raw[:limit].decode("utf-8", "ignore")


class FireState:
    """Cooldowns and fire windows per (rule id, cooldown key value); `dirty` lists what to persist."""

    def __init__(self) -> None:
        self.last: dict[tuple[str, str], float] = {}
        self.windows: dict[tuple[str, str], list[float]] = {}
        self.dirty: set[tuple[str, str]] = set()
        #: What each dirty key held before this evaluation recorded a fire: the value another replica
        #: must not have moved (`rollback` puts it back when the evaluation is not committed).
        self.prior: dict[tuple[str, str], tuple[float | None, list[float]]] = {}

    def cooldown_left(self, rule_id: str, key: str, cooldown_s: float, now: float) -> float:
        last = self.last.get((rule_id, key))
        if last is None:
            return 0.0
        return max(0.0, last + cooldown_s - now)

    def window_count(self, rule_id: str, key: str, window_s: float, now: float) -> int:
        w = self.windows.get((rule_id, key))
        if not w:
            return 0
        lo = now - window_s
        if w[0] <= lo:
            w[:] = [t for t in w if t > lo]
        return len(w)

    def record(self, c: CompiledRule, key: str, now: float) -> None:
        k = (c.id, key)
        if k not in self.prior:
            self.prior[k] = (self.last.get(k), list(self.windows.get(k, ())))
        self.last[k] = now
        if c.max_fires > 0:
            w = self.windows.setdefault(k, [])
            w.append(now)
            lo = now - c.window_s
            if w[0] <= lo:
                w[:] = [t for t in w if t > lo]
            # Never more than the cap is needed to decide; keep the newest.
            if len(w) > c.max_fires:
                del w[: len(w) - c.max_fires]
        self.dirty.add(k)

    def committed(self) -> None:
        """The dirty keys are in the store: nothing left to write or to take back."""
        self.dirty.clear()
        self.prior.clear()

    def rollback(self) -> None:
        """Forget the fires recorded since the last commit (the evaluation was not stored)."""
        for k, (last, window) in self.prior.items():
            self.put(k, last, window)
        self.committed()

    def put(self, k: tuple[str, str], last: float | None, window: list[float]) -> None:
        """Set one key's state as the store has it (a fire by another replica)."""
        if last is None or last <= 0:
            self.last.pop(k, None)
        else:
            self.last[k] = last
        if window:
            self.windows[k] = list(window)
        else:
            self.windows.pop(k, None)

    def held_keys(self, c: CompiledRule, now: float) -> list[str]:
        """Keys for which the flood breaker holds the rule now."""
        if c.max_fires <= 0:
            return []
        return [
            key
            for (rid, key) in list(self.windows)
            if rid == c.id and self.window_count(rid, key, c.window_s, now) >= c.max_fires
        ]

    def prune(self, rules: RuleSet, now: float) -> list[tuple[str, str, float]]:
        """Forget keys whose cooldown and fire window are over (or whose rule is gone); returns them
        as (rule id, key, last fire), so a store shared by replicas deletes only rows nobody moved since.

        Keys are (rule, session/channel/sender), so without this the state grows with every session seen.
        """
        gone: list[tuple[str, str, float]] = []
        for k, last in list(self.last.items()):
            c = rules.by_id.get(k[0])
            keep_for = max(c.cooldown_s, c.window_s if c.max_fires > 0 else 0.0) if c is not None else 0.0
            if now - last >= keep_for:
                gone.append((k[0], k[1], last))
                del self.last[k]
                self.windows.pop(k, None)
                self.dirty.discard(k)
                self.prior.pop(k, None)
        return gone


def shared_key(key: str) -> bool:
    """A cooldown key that events of several sessions share (channel, sender, global): with replicas
    those events are evaluated on different replicas, so its state is claimed in the store."""
    return not key.startswith("session:")


def cooldown_key_value(c: CompiledRule, ev: reactions_pb2.ReactionEvent) -> str:
    kind = c.cooldown_key
    if kind == config_pb2.COOLDOWN_KEY_CHANNEL:
        return f"channel:{ev.channel}"
    if kind == config_pb2.COOLDOWN_KEY_SENDER:
        return f"sender:{ev.sender}"
    if kind == config_pb2.COOLDOWN_KEY_GLOBAL:
        return "global"
    return f"session:{ev.session_key}"


def _field_getter(ev: reactions_pb2.ReactionEvent, text: str) -> Callable[[str], str]:
    cache: dict[str, str] = {}

    def get(name: str) -> str:
        v = cache.get(name)
        if v is not None:
            return v
        if name == "text":
            v = text
        elif name == "text_length":
            v = str(len(ev.text))
        elif name.startswith("attributes."):
            v = ev.attributes.get(name[11:], "")
        else:
            v = str(getattr(ev, name, ""))
        cache[name] = v
        return v

    return get


_ROLLOUT_CACHE_MAX = 4096


def _in_rollout(c: CompiledRule, session: str, channel: str) -> tuple[bool, str]:
    key = (session, channel)
    got = c.rollout_cache.get(key)
    if got is None:
        d = rule_in_rollout(c.rule, Target(session_key=session, channel=channel))
        got = (bool(d.value), d.explanation)
        if len(c.rollout_cache) >= _ROLLOUT_CACHE_MAX:
            c.rollout_cache.clear()
        c.rollout_cache[key] = got
    return got


class _EventView:
    """What the checks read of one event: its scope fields and causation up front, its text, keyword
    hits, regex hits, fields and cooldown keys computed the first time a rule needs them."""

    __slots__ = (
        "ev",
        "ti",
        "channel",
        "session",
        "sender",
        "depth",
        "reaction_origin",
        "fired_in_chain",
        "chain",
        "in_chain",
        "_text",
        "_lowered",
        "_keyword_hits",
        "_regex_hits",
        "_raw",
        "_get_field",
        "_keys",
    )

    def __init__(self, ev: reactions_pb2.ReactionEvent, ti: TypeIndex) -> None:
        self.ev = ev
        self.ti = ti
        self.channel, self.session, self.sender = ev.channel, ev.session_key, ev.sender
        cz = ev.causation
        self.depth = cz.depth
        self.reaction_origin = cz.origin == common_pb2.ORIGIN_REACTION or cz.depth > 0
        self.fired_in_chain = frozenset(cz.fired_rule_ids) if cz.fired_rule_ids else frozenset()
        self.chain = cz.chain_id or ev.event_id
        # The recursion guard can only skip a rule for an event caused by reactions.
        self.in_chain = self.reaction_origin or bool(self.fired_in_chain)
        self._text: str | None = None
        self._lowered: str | None = None
        self._keyword_hits: set[int] | None = None
        self._regex_hits: set[int] | None = None
        self._raw: bytes | None = None
        self._get_field: Callable[[str], str] | None = None
        self._keys: dict[int, str] | None = None

    def text(self) -> str:
        if self._text is None:
            self._text = bound_text(self.ev.text)
        return self._text

    def lowered(self) -> str:
        if self._lowered is None:
            self._lowered = self.text().lower()
        return self._lowered

    def keyword_hits(self) -> set[int]:
        """Indexes of the rules one of whose single-word keywords is a word of the text."""
        if self._keyword_hits is None:
            self._keyword_hits = set()
            idx = self.ti.keyword_index
            if idx:
                for w in set(WORD_RE.findall(self.lowered())).intersection(idx):
                    self._keyword_hits.update(idx[w])
        return self._keyword_hits

    def raw(self) -> bytes:
        if self._raw is None:
            self._raw = self.text().encode("utf-8", "replace")
        return self._raw

    def regex_hits(self) -> set[int] | None:
        """Regex slots whose regex matches the text, when the type's regexes share a filter."""
        f = self.ti.regex_filter
        if f is None:
            return None
        if self._regex_hits is None:
            self._regex_hits = set(f.Match(self.raw()) or ())
        return self._regex_hits

    def field(self, name: str) -> str:
        if self._get_field is None:
            self._get_field = _field_getter(self.ev, self.text())
        return self._get_field(name)

    def cooldown_key(self, c: CompiledRule) -> str:
        if self._keys is None:
            self._keys = {
                config_pb2.COOLDOWN_KEY_SESSION: f"session:{self.session}",
                config_pb2.COOLDOWN_KEY_CHANNEL: f"channel:{self.channel}",
                config_pb2.COOLDOWN_KEY_SENDER: f"sender:{self.sender}",
                config_pb2.COOLDOWN_KEY_GLOBAL: "global",
            }
        return self._keys[c.cooldown_key]


# The checks, in the order of the module docstring: each returns the skip trace, or None to go on.


def _scope_pass(
    ti: TypeIndex, v: _EventView, statics: StaticTraces, traces: list[Trace]
) -> list[CompiledRule]:
    """The scope check (channel, session, sender, keywords, regex) of every rule listening to the
    event's type, in one pass: out-of-scope rules get their static trace, the others are returned in
    order. Scope depends on nothing but the event, so checking it for all rules first gives the
    same traces as checking rule by rule; most rules stop here, so this loop calls nothing per rule."""
    channel, session, sender = v.channel, v.session, v.sender
    keyword_hits: set[int] | None = None
    lowered = ""
    regex_hits: set[int] | None = None
    in_scope: list[CompiledRule] = []
    for c in ti.rules:
        i = c.index
        if c.channels and channel not in c.channels:
            traces[i] = statics.channel[i]
            continue
        if c.sessions and session not in c.sessions:
            traces[i] = statics.session[i]
            continue
        if c.senders and sender not in c.senders:
            traces[i] = statics.sender[i]
            continue
        if c.words or c.phrases:
            if keyword_hits is None:
                keyword_hits, lowered = v.keyword_hits(), v.lowered()
            if i not in keyword_hits and not (c.phrases and any(p in lowered for p in c.phrases)):
                traces[i] = statics.keyword[i]
                continue
        if c.regex is not None:
            if regex_hits is None:
                regex_hits = v.regex_hits()
            hit = (
                c.regex_slot in regex_hits if regex_hits is not None else c.regex.search(v.raw()) is not None
            )
            if not hit:
                traces[i] = statics.regex[i]
                continue
        in_scope.append(c)
    return in_scope


def _condition(c: CompiledRule, v: _EventView) -> Trace | None:
    for cond in c.conditions:
        got = v.field(cond.field)
        if not cond.test(got):
            shown = got if len(got) <= 40 else got[:40] + "…"
            return Trace(c.id, False, SKIP_CONDITION, f"condition {cond.describe} failed (got {shown!r})")
    return None


def _recursion(c: CompiledRule, v: _EventView) -> Trace | None:
    if v.reaction_origin:
        if not c.allow_reaction_origin:
            return Trace(
                c.id,
                False,
                SKIP_RECURSION,
                f"event caused by a reaction (chain {v.chain}, depth {v.depth}); "
                "rule does not allow reaction origin",
            )
        if v.depth > c.max_depth:
            return Trace(
                c.id,
                False,
                SKIP_RECURSION,
                f"chain {v.chain} depth {v.depth} exceeds max_depth {c.max_depth}",
            )
    if v.fired_in_chain and c.id in v.fired_in_chain:
        return Trace(c.id, False, SKIP_RECURSION, f"rule already fired in chain {v.chain}")
    return None


def _rollout(c: CompiledRule, v: _EventView) -> Trace | None:
    inside, why = _in_rollout(c, v.session, v.channel)
    return None if inside else Trace(c.id, False, SKIP_ROLLOUT, why)


def _exclusive(c: CompiledRule, exclusive_by: str) -> Trace:
    return Trace(c.id, False, SKIP_EXCLUSIVE, f"exclusive rule {exclusive_by!r} fired first")


def _limits(c: CompiledRule, key: str, state: FireState, now: float) -> Trace | None:
    """Cooldown, then the fire cap (flood breaker), for the rule's cooldown key value."""
    if c.cooldown_s > 0:
        left = state.cooldown_left(c.id, key, c.cooldown_s, now)
        if left > 0:
            return Trace(
                c.id, False, SKIP_COOLDOWN, f"cooldown {left:.1f} s left for {key}", cooldown_key=key
            )
    if c.max_fires > 0:
        n = state.window_count(c.id, key, c.window_s, now)
        if n >= c.max_fires:
            return Trace(
                c.id,
                False,
                SKIP_MAX_FIRES,
                f"held by the flood breaker: {n} fires in {c.window_s:g} s for {key} (cap {c.max_fires})",
                cooldown_key=key,
            )
    return None


def evaluate(
    ev: reactions_pb2.ReactionEvent,
    rules: RuleSet,
    state: FireState,
    now: float,
    *,
    dry_run: bool = False,
) -> Evaluation:
    """Evaluate `ev` against every rule, in order; record fires in `state` unless dry_run."""
    statics = rules.statics
    # Rules that cannot fire on this type (disabled, listening to another) have their trace already;
    # the None slots are filled below.
    traces = cast(list[Trace], list(statics.for_type(ev.type)))
    matched: list[CompiledRule] = []
    ti = rules.by_type.get(ev.type)
    if ti is None:
        return Evaluation(ev.event_id, rules.revision, traces, matched)
    v = _EventView(ev, ti)
    exclusive_by = ""
    for c in _scope_pass(ti, v, statics, traces):
        # The later checks in order, each only where it can apply (most rules in scope need few).
        skip = _condition(c, v) if c.conditions else None
        if skip is None and v.in_chain:
            skip = _recursion(c, v)
        if skip is None and c.has_rollout:
            skip = _rollout(c, v)
        if skip is None and exclusive_by:
            skip = _exclusive(c, exclusive_by)
        if skip is not None:
            traces[c.index] = skip
            continue
        key = v.cooldown_key(c)
        skip = _limits(c, key, state, now) if c.cooldown_s > 0 or c.max_fires > 0 else None
        if skip is not None:
            traces[c.index] = skip
            continue
        if not dry_run:
            state.record(c, key, now)
        traces[c.index] = Trace(c.id, True, MATCHED, "fired for " + key, cooldown_key=key)
        matched.append(c)
        if c.exclusive:
            exclusive_by = c.id
    return Evaluation(ev.event_id, rules.revision, traces, matched)


def child_causation(ev: reactions_pb2.ReactionEvent, rule_id: str) -> common_pb2.Causation:
    cz = ev.causation
    return common_pb2.Causation(
        origin=common_pb2.ORIGIN_REACTION,
        chain_id=cz.chain_id or ev.event_id,
        depth=cz.depth + 1,
        fired_rule_ids=[*cz.fired_rule_ids, rule_id],
    )
