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

from flynn.v1 import common_pb2, config_pb2, reactions_pb2

from flynn_runtime.targeting import Target, rule_in_rollout
from reactions_svc.rules import WORD_RE, CompiledRule, RuleSet
from reactions_svc.rules import event_type_name as event_type_name

MAX_EVAL_BYTES = 64 * 1024

SKIP_SCOPE = reactions_pb2.SKIP_REASON_SCOPE
SKIP_CONDITION = reactions_pb2.SKIP_REASON_CONDITION
SKIP_COOLDOWN = reactions_pb2.SKIP_REASON_COOLDOWN
SKIP_MAX_FIRES = reactions_pb2.SKIP_REASON_MAX_FIRES
SKIP_RECURSION = reactions_pb2.SKIP_REASON_RECURSION_GUARD
SKIP_DISABLED = reactions_pb2.SKIP_REASON_DISABLED
SKIP_ROLLOUT = reactions_pb2.SKIP_REASON_ROLLOUT
SKIP_EXCLUSIVE = reactions_pb2.SKIP_REASON_EXCLUSIVE
SKIP_ACTION_ERROR = reactions_pb2.SKIP_REASON_ACTION_ERROR

REASON_NAMES: dict[int, str] = {
    v: k.removeprefix("SKIP_REASON_").lower() for k, v in reactions_pb2.SkipReason.items() if v != 0
}

_COOLDOWN_KEY_NAMES = {
    config_pb2.COOLDOWN_KEY_SESSION: "session",
    config_pb2.COOLDOWN_KEY_CHANNEL: "channel",
    config_pb2.COOLDOWN_KEY_SENDER: "sender",
    config_pb2.COOLDOWN_KEY_GLOBAL: "global",
}


def reason_name(reason: int) -> str:
    return REASON_NAMES.get(reason, "match" if reason == 0 else str(reason))


@dataclass(slots=True)
class Trace:
    """One (event, rule) outcome. Static skips (disabled, other event type) are shared between events."""

    rule_id: str
    matched: bool
    reason: int
    detail: str
    # False when the rule does not listen to this event type (or is disabled): noise for per-rule views.
    listening: bool = True
    cooldown_key: str = ""


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

    def held_keys(self, c: CompiledRule, now: float) -> list[str]:
        """Keys for which the flood breaker holds the rule now."""
        if c.max_fires <= 0:
            return []
        return [
            key
            for (rid, key) in list(self.windows)
            if rid == c.id and self.window_count(rid, key, c.window_s, now) >= c.max_fires
        ]

    def prune(self, rules: RuleSet, now: float) -> list[tuple[str, str]]:
        """Forget keys whose cooldown and fire window are over (or whose rule is gone); returns them.

        Keys are (rule, session/channel/sender), so without this the state grows with every session seen.
        """
        gone: list[tuple[str, str]] = []
        for k, last in list(self.last.items()):
            c = rules.by_id.get(k[0])
            keep_for = max(c.cooldown_s, c.window_s if c.max_fires > 0 else 0.0) if c is not None else 0.0
            if now - last >= keep_for:
                gone.append(k)
                del self.last[k]
                self.windows.pop(k, None)
                self.dirty.discard(k)
        return gone


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


class _StaticTraces:
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


def _statics(rules: RuleSet) -> _StaticTraces:
    st: _StaticTraces | None = getattr(rules, "_statics", None)
    if st is None:
        st = _StaticTraces(rules)
        rules._statics = st  # type: ignore[attr-defined]
    return st


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


def evaluate(
    ev: reactions_pb2.ReactionEvent,
    rules: RuleSet,
    state: FireState,
    now: float,
    *,
    dry_run: bool = False,
) -> Evaluation:
    """Evaluate `ev` against every rule, in order; record fires in `state` unless dry_run."""
    t = ev.type
    statics = _statics(rules)
    traces: list[Trace] = list(statics.for_type(t))  # type: ignore[arg-type]
    matched: list[CompiledRule] = []
    ti = rules.by_type.get(t)
    if ti is None:
        return Evaluation(ev.event_id, rules.revision, traces, matched)

    channel, session, sender = ev.channel, ev.session_key, ev.sender
    cz = ev.causation
    depth = cz.depth
    reaction_origin = cz.origin == 2 or depth > 0  # ORIGIN_REACTION
    fired_in_chain = frozenset(cz.fired_rule_ids) if cz.fired_rule_ids else frozenset()
    chain = cz.chain_id or ev.event_id

    text: str | None = None
    lowered: str | None = None
    keyword_hits: set[int] | None = None
    regex_hits: set[int] | None = None
    raw: bytes | None = None
    get_field: Callable[[str], str] | None = None
    keys: dict[int, str] | None = None
    exclusive_by = ""
    s_channel, s_session, s_sender, s_keyword, s_regex = (
        statics.channel,
        statics.session,
        statics.sender,
        statics.keyword,
        statics.regex,
    )

    for c in ti.rules:
        i = c.index
        if c.channels and channel not in c.channels:
            traces[i] = s_channel[i]
            continue
        if c.sessions and session not in c.sessions:
            traces[i] = s_session[i]
            continue
        if c.senders and sender not in c.senders:
            traces[i] = s_sender[i]
            continue
        if c.words or c.phrases:
            if lowered is None:
                if text is None:
                    text = bound_text(ev.text)
                lowered = text.lower()
            if keyword_hits is None:
                keyword_hits = set()
                idx = ti.keyword_index
                if idx:
                    for w in set(WORD_RE.findall(lowered)).intersection(idx):
                        keyword_hits.update(idx[w])
            if i not in keyword_hits and not (c.phrases and any(p in lowered for p in c.phrases)):
                traces[i] = s_keyword[i]
                continue
        if c.regex is not None:
            if raw is None:
                if text is None:
                    text = bound_text(ev.text)
                raw = text.encode("utf-8", "replace")
            if ti.regex_filter is not None:
                if regex_hits is None:
                    regex_hits = set(ti.regex_filter.Match(raw) or ())
                hit = c.regex_slot in regex_hits
            else:
                hit = c.regex.search(raw) is not None
            if not hit:
                traces[i] = s_regex[i]
                continue
        if c.conditions:
            if get_field is None:
                if text is None:
                    text = bound_text(ev.text)
                get_field = _field_getter(ev, text)
            failed = None
            for cond in c.conditions:
                if not cond.test(get_field(cond.field)):
                    failed = cond
                    break
            if failed is not None:
                got = get_field(failed.field)
                shown = got if len(got) <= 40 else got[:40] + "…"
                traces[i] = Trace(
                    c.id, False, SKIP_CONDITION, f"condition {failed.describe} failed (got {shown!r})"
                )
                continue
        if reaction_origin:
            if not c.allow_reaction_origin:
                traces[i] = Trace(
                    c.id,
                    False,
                    SKIP_RECURSION,
                    f"event caused by a reaction (chain {chain}, depth {depth}); rule does not allow reaction origin",
                )
                continue
            if depth > c.max_depth:
                traces[i] = Trace(
                    c.id,
                    False,
                    SKIP_RECURSION,
                    f"chain {chain} depth {depth} exceeds max_depth {c.max_depth}",
                )
                continue
        if fired_in_chain and c.id in fired_in_chain:
            traces[i] = Trace(c.id, False, SKIP_RECURSION, f"rule already fired in chain {chain}")
            continue
        if c.has_rollout:
            inside, why = _in_rollout(c, session, channel)
            if not inside:
                traces[i] = Trace(c.id, False, SKIP_ROLLOUT, why)
                continue
        if exclusive_by:
            traces[i] = Trace(c.id, False, SKIP_EXCLUSIVE, f"exclusive rule {exclusive_by!r} fired first")
            continue
        if keys is None:
            keys = {
                config_pb2.COOLDOWN_KEY_SESSION: f"session:{session}",
                config_pb2.COOLDOWN_KEY_CHANNEL: f"channel:{channel}",
                config_pb2.COOLDOWN_KEY_SENDER: f"sender:{sender}",
                config_pb2.COOLDOWN_KEY_GLOBAL: "global",
            }
        key = keys[c.cooldown_key]
        if c.cooldown_s > 0:
            left = state.cooldown_left(c.id, key, c.cooldown_s, now)
            if left > 0:
                traces[i] = Trace(
                    c.id, False, SKIP_COOLDOWN, f"cooldown {left:.1f} s left for {key}", cooldown_key=key
                )
                continue
        if c.max_fires > 0:
            n = state.window_count(c.id, key, c.window_s, now)
            if n >= c.max_fires:
                traces[i] = Trace(
                    c.id,
                    False,
                    SKIP_MAX_FIRES,
                    f"held by the flood breaker: {n} fires in {c.window_s:g} s for {key} (cap {c.max_fires})",
                    cooldown_key=key,
                )
                continue
        if not dry_run:
            state.record(c, key, now)
        traces[i] = Trace(c.id, True, 0, "fired for " + key, cooldown_key=key)
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
