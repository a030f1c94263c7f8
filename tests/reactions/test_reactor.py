"""The pipeline over each real store (SQLite, PostgreSQL): dedupe, action outcomes, traces kept apart,
flags and stats, resume."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from flynn.v1 import config_pb2, reactions_pb2

from flynn_runtime.config_source import StaticConfig
from flynn_runtime.errors import FlynnError
from reactions_svc import engine
from reactions_svc.reactor import ActionContext, ActionOutcome, Reactor, RuleSource
from reactions_svc.store import SCHEMA, ReactionStore, Retention
from reactions_svc.store_pg import MIGRATIONS, PgReactionStore
from reactions_svc.store_sqlite import SqliteReactionStore
from tests.support.postgres import Databases
from tests.support.reactions import ack_action, rule

MSG = config_pb2.REACTION_EVENT_TYPE_MESSAGE_RECEIVED


class RecordingRunner:
    """Stands in for the downstream services in this domain-level test; fails on demand."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.fail_kinds: set[str] = set()

    async def run(self, kind: str, action: config_pb2.ReactionAction, ctx: ActionContext) -> ActionOutcome:
        self.calls.append((kind, ctx.idempotency_key))
        if kind in self.fail_kinds:
            return ActionOutcome(False, error="downstream said no")
        return ActionOutcome(True, result_id=f"res-{len(self.calls)}")


Opener = Callable[[Retention | None], Awaitable[ReactionStore]]


@pytest.fixture
async def stores(tmp_path: Path, database_url: str, databases: Databases) -> AsyncIterator[Opener]:
    """Opens the store under test; opening again reopens the same state (a restart)."""

    async def open_store(retention: Retention | None) -> ReactionStore:
        if not database_url:
            return SqliteReactionStore(tmp_path / "reactions", retention)
        db = await databases.open(database_url, service="reactions", schema=SCHEMA, migrations=MIGRATIONS)
        return PgReactionStore(db, retention)

    yield open_store


Audited = list[tuple[str, dict[str, object]]]


async def make(
    stores: Opener,
    rules: list[config_pb2.ReactionRule],
    retention: Retention | None = None,
    audit: Audited | None = None,
) -> tuple[Reactor, RecordingRunner, StaticConfig]:
    """A reactor on the store under test; its audit records are appended to `audit` when given."""
    cfg = config_pb2.FlynnConfig()
    cfg.automation.reactions.extend(rules)
    source = StaticConfig(cfg, revision=3)
    runner = RecordingRunner()
    records: Audited = audit if audit is not None else []
    reactor = Reactor(
        await stores(retention),
        RuleSource(source).current,
        runner,
        audit=lambda name, **kw: records.append((name, kw)),
    )
    return reactor, runner, source


def msg(event_id: str, text: str = "hello", session: str = "s1") -> reactions_pb2.ReactionEvent:
    return reactions_pb2.ReactionEvent(
        event_id=event_id,
        type=MSG,
        text=text,
        session_key=session,
        channel="cli",
        sender="al",
        message_id=f"m-{event_id}",
    )


async def test_event_evaluated_once_and_acts_once(stores: Opener) -> None:
    audit: Audited = []
    reactor, runner, _ = await make(
        stores, [rule("greet", actions=[ack_action(), ack_action("✅")])], audit=audit
    )
    first = await reactor.handle(msg("run:1"))
    assert first.matched_rule_ids == ["greet"] and not first.duplicate and first.revision == 3
    assert [k for _, k in runner.calls] == ["rx/run:1/greet/0", "rx/run:1/greet/1"]
    again = await reactor.handle(msg("run:1"))
    assert again.duplicate and again.matched_rule_ids == ["greet"]
    assert [t.trace_id for t in again.traces] == [t.trace_id for t in first.traces]
    assert len(runner.calls) == 2
    assert [a.idempotency_key for a in again.traces[0].actions] == ["rx/run:1/greet/0", "rx/run:1/greet/1"]
    names = [n for n, _ in audit]
    assert names == ["reactionMatch"]


async def test_action_error_is_a_skip_but_counts_for_cooldown(stores: Opener) -> None:
    reactor, runner, _ = await make(stores, [rule("greet", cooldown_s=60, actions=[ack_action()])])
    runner.fail_kinds.add("ack")
    r = await reactor.handle(msg("e1"))
    t = r.traces[0]
    assert not t.matched and t.skip_reason == reactions_pb2.SKIP_REASON_ACTION_ERROR
    assert "action[0] ack failed: downstream said no" in t.detail
    assert t.actions[0].ok is False
    r2 = await reactor.handle(msg("e2"))
    assert r2.traces[0].skip_reason == reactions_pb2.SKIP_REASON_COOLDOWN
    per, total = await reactor.rule_stats("greet")
    skips = {s.reason: s.count for s in per[0].skips}
    assert per[0].matches == 0 and skips == {
        reactions_pb2.SKIP_REASON_ACTION_ERROR: 1,
        reactions_pb2.SKIP_REASON_COOLDOWN: 1,
    }


async def test_list_traces_why_not_and_flags(stores: Opener) -> None:
    reactor, _, _ = await make(
        stores, [rule("help", keywords=("help",)), rule("other", config_pb2.REACTION_EVENT_TYPE_RUN_ERROR)]
    )
    await reactor.handle(msg("e1", "help me"))
    await reactor.handle(msg("e2", "hello"))
    why_not = await reactor.traces_for_event("e2", None)
    assert [(t.rule_id, t.matched, t.skip_reason) for t in why_not] == [
        ("help", False, reactions_pb2.SKIP_REASON_SCOPE),
        ("other", False, reactions_pb2.SKIP_REASON_SCOPE),
    ]
    assert why_not[0].detail == "no trigger keyword in text"
    match = (await reactor.traces_for_event("e1", True))[0]
    flagged, already = await reactor.flag_false_positive(
        match.trace_id, "user said it was not a help request"
    )
    assert flagged.false_positive and not already
    _, already2 = await reactor.flag_false_positive(match.trace_id, "again")
    assert already2
    with pytest.raises(FlynnError):
        await reactor.flag_false_positive("trc_nope", "x")
    per, total = await reactor.rule_stats()
    stats = {s.rule_id: s for s in per}
    assert stats["help"].matches == 1 and stats["help"].false_positives == 1
    assert stats["help"].false_positive_rate == 1.0
    assert total.matches == 1 and total.false_positives == 1
    # Skips of rules that do not listen to the event type are explained per event but not counted.
    assert stats["other"].skips == []


async def test_skips_cannot_evict_matches(stores: Opener) -> None:
    ret = Retention(evaluations=50, matched=20, skipped=10, prune_every=1)
    reactor, _, _ = await make(
        stores, [rule("rare", keywords=("rare",)), rule("never", keywords=("zzz",))], ret
    )
    await reactor.handle(msg("keep", "rare"))
    for i in range(40):
        await reactor.handle(msg(f"noise{i}", "nothing"))
    rows = await reactor.store.page_matched("rare", 1 << 62, 10)
    assert [t.event_id for _, t in rows] == ["keep"]
    skipped = await reactor.store.page_skipped("", 1 << 62, 100)
    assert 0 < len(skipped) <= 12


async def test_live_rule_change_and_empty_list_disables(stores: Opener) -> None:
    reactor, _, source = await make(stores, [rule("greet")])
    assert (await reactor.handle(msg("e1"))).matched_rule_ids == ["greet"]
    await source.apply(config_pb2.FlynnConfig(), 4)
    r = await reactor.handle(msg("e2"))
    assert r.matched_rule_ids == [] and r.traces == [] and r.revision == 4


async def test_pending_actions_resume_after_crash(stores: Opener) -> None:
    reactor, runner, _ = await make(stores, [rule("greet", actions=[ack_action(), ack_action("✅")])])
    # Simulate a crash between the committed decision and the second action.
    async with reactor._lock:
        prepared = await reactor._prepare(msg("e1"))
    assert prepared.pending
    await reactor.store.save_action_result("rx/e1/greet/0", True, "done-before-crash", "")
    await reactor.store.close()
    reactor2, runner2, _ = await make(stores, [rule("greet", actions=[ack_action(), ack_action("✅")])])
    assert await reactor2.resume_pending() == 1
    assert runner2.calls == [("ack", "rx/e1/greet/1")]  # the finished action is not repeated
    r = await reactor2.handle(msg("e1"))
    assert r.duplicate and r.matched_rule_ids == ["greet"]
    assert [a.result_id for a in r.traces[0].actions] == ["done-before-crash", "res-1"]


async def test_cooldown_survives_restart(stores: Opener) -> None:
    reactor, _, _ = await make(stores, [rule("greet", cooldown_s=600)])
    assert (await reactor.handle(msg("e1"))).matched_rule_ids == ["greet"]
    await reactor.store.close()
    reactor2, _, _ = await make(stores, [rule("greet", cooldown_s=600)])
    t = (await reactor2.handle(msg("e2"))).traces[0]
    assert t.skip_reason == reactions_pb2.SKIP_REASON_COOLDOWN


async def test_dry_run_with_proposed_rules_validates_with_field_names(stores: Opener) -> None:
    reactor, runner, _ = await make(stores, [rule("greet")])
    bad = rule("bad", regex="(unclosed")
    with pytest.raises(FlynnError) as ei:
        reactor.dry_run(
            msg("d1"),
            [
                bad,
                config_pb2.ReactionRule(
                    id="noact",
                    trigger=config_pb2.ReactionTrigger(event=MSG),
                    actions=[config_pb2.ReactionAction()],
                ),
            ],
        )
    fields = {v.field for v in ei.value.violations}
    assert "proposed_rules[0].trigger.regex" in fields and "proposed_rules[1].actions[0]" in fields
    r = reactor.dry_run(msg("d2", "x"), [rule("proposed", keywords=("x",))])
    assert r.matched_rule_ids == ["proposed"] and r.revision == 0 and r.traces[0].dry_run
    assert runner.calls == [] and await reactor.store.get_evaluation("d2") is None
    assert engine.SKIP_SCOPE == reactions_pb2.SKIP_REASON_SCOPE


async def test_duplicate_of_an_action_error_reports_it_as_not_matched(stores: Opener) -> None:
    reactor, runner, _ = await make(stores, [rule("greet", actions=[ack_action()])])
    runner.fail_kinds.add("ack")
    first = await reactor.handle(msg("e1"))
    again = await reactor.handle(msg("e1"))
    assert first.matched_rule_ids == [] and again.matched_rule_ids == [] and again.duplicate
    assert again.traces[0].skip_reason == reactions_pb2.SKIP_REASON_ACTION_ERROR
    assert len(runner.calls) == 1
