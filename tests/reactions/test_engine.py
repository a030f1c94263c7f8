"""The rules engine itself: order, scope, conditions, recursion guard, cooldown, flood breaker, bounds."""

from __future__ import annotations

from flynn.v1 import common_pb2, config_pb2, reactions_pb2

from reactions_svc import engine
from reactions_svc.engine import FireState, evaluate
from reactions_svc.rules import RuleSet
from tests.support.reactions import rule

MSG = config_pb2.REACTION_EVENT_TYPE_MESSAGE_RECEIVED
R = reactions_pb2


def msg(
    event_id: str,
    text: str = "hello",
    session: str = "s1",
    channel: str = "cli",
    sender: str = "alice",
    causation: common_pb2.Causation | None = None,
) -> reactions_pb2.ReactionEvent:
    return reactions_pb2.ReactionEvent(
        event_id=event_id,
        type=MSG,
        text=text,
        session_key=session,
        channel=channel,
        sender=sender,
        causation=causation,
    )


def by_rule(ev: engine.Evaluation) -> dict[str, engine.Trace]:
    return {t.rule_id: t for t in ev.traces}


def test_priority_order_ties_by_id_and_exclusive() -> None:
    rs = RuleSet(
        [
            rule("low", priority=1),
            rule("b-high", priority=10, exclusive=True, keywords=("deploy",)),
            rule("a-high", priority=10),
            rule("mid", priority=5),
        ]
    )
    assert [c.id for c in rs.rules] == ["a-high", "b-high", "mid", "low"]
    ev = evaluate(msg("e1", "please deploy"), rs, FireState(), 100.0)
    assert [t.rule_id for t in ev.traces] == ["a-high", "b-high", "mid", "low"]
    t = by_rule(ev)
    assert t["a-high"].matched and t["b-high"].matched
    assert t["mid"].reason == engine.SKIP_EXCLUSIVE and "b-high" in t["mid"].detail
    assert t["low"].reason == engine.SKIP_EXCLUSIVE
    # Without the keyword the exclusive rule does not fire and nothing is excluded.
    ev2 = evaluate(msg("e2", "hello"), rs, FireState(), 100.0)
    assert [c.id for c in ev2.matched] == ["a-high", "mid", "low"]
    assert by_rule(ev2)["b-high"].reason == engine.SKIP_SCOPE


def test_cooldown_is_per_session() -> None:
    rs = RuleSet([rule("greet", cooldown_s=30)])
    st = FireState()
    assert evaluate(msg("e1", session="s1"), rs, st, 100.0).matched
    second = evaluate(msg("e2", session="s1"), rs, st, 110.0)
    assert not second.matched
    assert second.traces[0].reason == engine.SKIP_COOLDOWN and "20.0 s left" in second.traces[0].detail
    # Another session has its own cooldown.
    assert evaluate(msg("e3", session="s2"), rs, st, 110.0).matched
    # After the cooldown the first session fires again.
    assert evaluate(msg("e4", session="s1"), rs, st, 131.0).matched


def test_cooldown_keys_channel_sender_global() -> None:
    st = FireState()
    rs = RuleSet(
        [
            rule("per-channel", cooldown_s=60, cooldown_key=config_pb2.COOLDOWN_KEY_CHANNEL),
            rule("per-sender", cooldown_s=60, cooldown_key=config_pb2.COOLDOWN_KEY_SENDER),
            rule("global", cooldown_s=60, cooldown_key=config_pb2.COOLDOWN_KEY_GLOBAL),
        ]
    )
    evaluate(msg("e1", session="s1", channel="c1", sender="a"), rs, st, 0.0)
    t = by_rule(evaluate(msg("e2", session="s2", channel="c1", sender="b"), rs, st, 1.0))
    assert t["per-channel"].reason == engine.SKIP_COOLDOWN
    assert t["per-sender"].matched
    assert t["global"].reason == engine.SKIP_COOLDOWN


def test_flood_breaker_holds_and_says_so() -> None:
    c_rule = rule("flood", max_fires=3, window_s=60)
    rs = RuleSet([c_rule])
    st = FireState()
    fired = [bool(evaluate(msg(f"e{i}"), rs, st, 100.0 + i).matched) for i in range(5)]
    assert fired == [True, True, True, False, False]
    held = evaluate(msg("e9"), rs, st, 105.0).traces[0]
    assert held.reason == engine.SKIP_MAX_FIRES and "held" in held.detail and "cap 3" in held.detail
    assert st.held_keys(rs.rules[0], 105.0) == ["session:s1"]
    # The window slides: after it the rule fires again and is no longer held.
    assert evaluate(msg("e10"), rs, st, 161.0).matched
    assert st.held_keys(rs.rules[0], 161.5) == []


def test_recursion_guard_default_and_self_trigger() -> None:
    rs = RuleSet([rule("echo", keywords=("ping",))])
    st = FireState()
    first = evaluate(msg("e1", "ping"), rs, st, 0.0)
    assert first.matched
    # The message its action submits carries the causation of a reaction: it triggers nothing.
    child = msg("e2", "ping", causation=engine.child_causation(msg("e1", "ping"), "echo"))
    second = evaluate(child, rs, st, 1.0)
    assert not second.matched
    assert second.traces[0].reason == engine.SKIP_RECURSION
    assert "does not allow reaction origin" in second.traces[0].detail


def test_rule_never_fires_twice_in_a_chain_and_max_depth() -> None:
    rs = RuleSet(
        [
            rule("ping", keywords=("ping",), allow_reaction_origin=True, max_depth=5),
            rule("pong", keywords=("pong",), allow_reaction_origin=True, max_depth=5),
        ]
    )
    st = FireState()
    e0 = msg("e0", "ping")
    assert [c.id for c in evaluate(e0, rs, st, 0).matched] == ["ping"]
    e1 = msg("e1", "pong", causation=engine.child_causation(e0, "ping"))
    assert [c.id for c in evaluate(e1, rs, st, 0).matched] == ["pong"]
    e2 = msg("e2", "ping", causation=engine.child_causation(e1, "pong"))
    ev2 = evaluate(e2, rs, st, 0)
    assert not ev2.matched
    assert by_rule(ev2)["ping"].reason == engine.SKIP_RECURSION
    assert "already fired in chain e0" in by_rule(ev2)["ping"].detail
    # With distinct rules per hop, depth is what stops the chain.
    deep = RuleSet([rule(f"hop{i}", allow_reaction_origin=True, max_depth=2) for i in range(1)])
    cz = common_pb2.Causation(origin=common_pb2.ORIGIN_REACTION, chain_id="c", depth=3, fired_rule_ids=["x"])
    t = evaluate(msg("e9", causation=cz), deep, st, 0).traces[0]
    assert t.reason == engine.SKIP_RECURSION and "depth 3 exceeds max_depth 2" in t.detail


def test_scope_keywords_regex_channels_senders() -> None:
    rs = RuleSet(
        [
            rule("kw", keywords=("help", "on call")),
            rule("rx", regex=r"(?i)\bdeploy(ed)?\s+failed"),
            rule("chan", channels=["slack"]),
            rule("who", senders=["bob"]),
            rule("sess", sessions=["s9"]),
        ]
    )
    st = FireState()
    t = by_rule(evaluate(msg("e1", "Deployed  FAILED, who is ON CALL?"), rs, st, 0))
    assert t["kw"].matched  # phrase keyword, case-insensitive
    assert t["rx"].matched
    assert t["chan"].reason == engine.SKIP_SCOPE and "trigger.channels" in t["chan"].detail
    assert t["who"].reason == engine.SKIP_SCOPE and "trigger.senders" in t["who"].detail
    assert t["sess"].reason == engine.SKIP_SCOPE
    # Keywords are words: "helpful" does not contain the word "help".
    t2 = by_rule(evaluate(msg("e2", "that was helpful"), rs, st, 0))
    assert t2["kw"].reason == engine.SKIP_SCOPE and "keyword" in t2["kw"].detail
    assert t2["rx"].reason == engine.SKIP_SCOPE and "regex" in t2["rx"].detail


def test_other_event_types_and_disabled_are_static_skips() -> None:
    rs = RuleSet([rule("on-error", config_pb2.REACTION_EVENT_TYPE_RUN_ERROR), rule("off", enabled=False)])
    ev = evaluate(msg("e1"), rs, FireState(), 0)
    t = by_rule(ev)
    assert t["on-error"].reason == engine.SKIP_SCOPE and not t["on-error"].listening
    assert "listens to run_error, event is message_received" in t["on-error"].detail
    assert t["off"].reason == engine.SKIP_DISABLED and t["off"].listening


def test_conditions() -> None:
    r = rule("long-errors", config_pb2.REACTION_EVENT_TYPE_RUN_ERROR)
    r.conditions.add(field="error_kind", operator=config_pb2.CONDITION_OPERATOR_EQUALS, value="timeout")
    r.conditions.add(field="attributes.tier", operator=config_pb2.CONDITION_OPERATOR_NOT_EQUALS, value="free")
    r.conditions.add(field="text_length", operator=config_pb2.CONDITION_OPERATOR_GREATER_THAN, value="3")
    rs = RuleSet([r])

    def ev(kind: str, tier: str, text: str) -> reactions_pb2.ReactionEvent:
        e = reactions_pb2.ReactionEvent(
            event_id="x", type=config_pb2.REACTION_EVENT_TYPE_RUN_ERROR, error_kind=kind, text=text
        )
        e.attributes["tier"] = tier
        return e

    assert evaluate(ev("timeout", "pro", "abcd"), rs, FireState(), 0).matched
    t = evaluate(ev("agent", "pro", "abcd"), rs, FireState(), 0).traces[0]
    assert (
        t.reason == engine.SKIP_CONDITION
        and "error_kind equals 'timeout'" in t.detail
        and "'agent'" in t.detail
    )
    assert (
        evaluate(ev("timeout", "free", "abcd"), rs, FireState(), 0).traces[0].reason == engine.SKIP_CONDITION
    )
    assert evaluate(ev("timeout", "pro", "abc"), rs, FireState(), 0).traces[0].reason == engine.SKIP_CONDITION


def test_rollout_uses_shared_targeting() -> None:
    r = rule("canary")
    r.rollout.basis_points = 5000
    rs = RuleSet([r])
    results = {
        s: bool(evaluate(msg("e", session=s), rs, FireState(), 0).matched)
        for s in (f"s{i}" for i in range(200))
    }
    inside = sum(results.values())
    assert 60 < inside < 140  # about half, sticky
    out = next(s for s, v in results.items() if not v)
    t = evaluate(msg("e", session=out), rs, FireState(), 0).traces[0]
    assert t.reason == engine.SKIP_ROLLOUT and "basis points of automation.reactions.canary" in t.detail


def test_dry_run_changes_no_cooldown() -> None:
    rs = RuleSet([rule("greet", cooldown_s=30)])
    st = FireState()
    assert evaluate(msg("e1"), rs, st, 0, dry_run=True).matched
    assert evaluate(msg("e2"), rs, st, 1).matched


def test_megabyte_text_is_bounded() -> None:
    rs = RuleSet(
        [rule("kw", keywords=("needle",)), rule("rx", regex="needle$"), rule("tail", keywords=("tailword",))]
    )
    text = ("needle " + "x" * 1_000_000) + " tailword"
    ev = evaluate(msg("big", text), rs, FireState(), 0)
    t = by_rule(ev)
    assert t["kw"].matched  # within the first 64 KiB
    assert t["tail"].reason == engine.SKIP_SCOPE  # beyond the bound: not evaluated
    assert t["rx"].reason == engine.SKIP_SCOPE
    assert len(engine.bound_text(text).encode()) <= engine.MAX_EVAL_BYTES
    # Multi-byte characters are cut on a character boundary.
    assert engine.bound_text("é" * 100_000).encode("utf-8").__len__() <= engine.MAX_EVAL_BYTES


def test_many_regex_rules_use_one_set_and_agree_with_per_rule_search() -> None:
    rules = [rule(f"r{i:03d}", regex=rf"(?i)\bcode{i}\b") for i in range(100)]
    rs = RuleSet(rules)
    assert rs.by_type[MSG].regex_filter is not None
    ev = evaluate(msg("e", "see CODE7 and code42 but not code420x"), rs, FireState(), 0)
    assert sorted(c.id for c in ev.matched) == ["r007", "r042"]


def test_fire_state_is_pruned_when_cooldowns_and_windows_are_over() -> None:
    rs = RuleSet([rule("cool", cooldown_s=10), rule("capped", max_fires=2, window_s=100)])
    st = FireState()
    for i in range(50):
        evaluate(msg(f"e{i}", session=f"s{i}"), rs, st, 0.0)
    assert len(st.last) == 100
    assert len(st.prune(rs, 50.0)) == 50  # cooldowns over; fire windows still open
    assert {k[0] for k in st.last} == {"capped"}
    assert len(st.prune(rs, 101.0)) == 50 and not st.last and not st.windows
    evaluate(msg("x", session="s1"), rs, st, 200.0)
    assert len(st.prune(RuleSet([]), 200.0)) == 2  # rules that are gone take their state with them
