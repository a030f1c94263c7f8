# mypy: disable-error-code="misc,no-any-return"
"""The reactions service through gRPC: the real config service (rules live from WatchConfig), the real
reactions app consuming run events from a real RunControl server (tests/support/reactions.py) that
records every PostReply / SubmitMessage, and grpcurl."""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from flynn.v1 import config_pb2, config_pb2_grpc, reactions_pb2, reactions_pb2_grpc, run_control_pb2
from google.protobuf import field_mask_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from config_svc.app import ConfigApp
from flynn_runtime.rich_status import violation_fields
from flynn_runtime.server import RunningServer, running
from reactions_svc.app import ReactionsApp
from tests.support.mesh import Tokens, grpcurl, make_settings
from tests.support.reactions import RunControlServer, rule, submit_action

MSG = config_pb2.REACTION_EVENT_TYPE_MESSAGE_RECEIVED

SEED = """
automation:
  reactions:
    - id: ack-all
      enabled: true
      trigger: {event: message_received}
      priority: 10
      actions:
        - ack: {emoji: "👀"}
    - id: help-reply
      enabled: true
      trigger: {event: message_received, keywords: [help]}
      cooldown: 1h
      actions:
        - reply: {text: "Help is on the way, {sender}."}
"""


@dataclass
class Mesh:
    config: RunningServer
    reactions: RunningServer
    rc: RunControlServer
    tokens: Tokens
    channel: grpc.aio.Channel
    cfg_channel: grpc.aio.Channel

    @property
    def stub(self) -> reactions_pb2_grpc.ReactionsStub:
        return reactions_pb2_grpc.ReactionsStub(self.channel)

    @property
    def config_stub(self) -> config_pb2_grpc.ConfigServiceStub:
        return config_pb2_grpc.ConfigServiceStub(self.cfg_channel)

    @property
    def md(self) -> tuple[tuple[str, str], ...]:
        return self.tokens.md("operator")

    async def set_rules(self, rules: list[config_pb2.ReactionRule]) -> int:
        head = await self.config_stub.GetConfig(config_pb2.GetConfigRequest(), metadata=self.md)
        cfg = config_pb2.FlynnConfig()
        cfg.automation.reactions.extend(rules)
        resp = await self.config_stub.UpdateConfig(
            config_pb2.UpdateConfigRequest(
                config=cfg,
                update_mask=field_mask_pb2.FieldMask(paths=["automation.reactions"]),
                expected_revision=head.revision,
                reason="test",
            ),
            metadata=self.md,
        )
        app = self.reactions.app
        assert isinstance(app, ReactionsApp)
        assert await app.config.wait_for_revision(resp.revision, 15)
        return resp.revision

    async def wait(self, predicate: object, limit: float = 15.0) -> None:
        async def check() -> bool:
            r = predicate()  # type: ignore[operator]
            return bool(await r) if inspect.isawaitable(r) else bool(r)

        deadline = asyncio.get_running_loop().time() + limit
        while asyncio.get_running_loop().time() < deadline:
            if await check():
                return
            await asyncio.sleep(0.02)
        assert await check(), "condition not reached in time"

    def replies(self) -> list[run_control_pb2.Reply]:
        with self.rc.servicer.cond:
            return list(self.rc.servicer.rec.replies.values())


@pytest.fixture
async def mesh(
    tmp_path: Path, tokens: Tokens, monkeypatch: pytest.MonkeyPatch, database_url: str
) -> AsyncIterator[Mesh]:
    """Config and reactions on each backend (on PostgreSQL: one database, a schema per service)."""
    seed = tmp_path / "seed.yaml"
    seed.write_text(SEED)
    monkeypatch.setenv("FLYNN_SEED_FILE", str(seed))
    monkeypatch.setenv("FLYNN_REACTIONS_CONSUME", "run")
    with RunControlServer() as rc:
        cfg_settings = make_settings("config", tmp_path / "config", tokens)
        cfg_settings = dataclasses.replace(cfg_settings, database_url=database_url)
        async with running(cfg_settings, ConfigApp) as cfg:
            settings = make_settings(
                "reactions",
                tmp_path / "reactions",
                tokens,
                addresses={"config": cfg.address, "queue": rc.address, "nodes": "127.0.0.1:1"},
            )
            settings = dataclasses.replace(settings, database_url=database_url)
            async with running(settings, ReactionsApp) as rx:
                app = rx.app
                assert isinstance(app, ReactionsApp)
                assert await app.config.wait_for_revision(1, 15)
                async with (
                    grpc.aio.insecure_channel(rx.address) as ch,
                    grpc.aio.insecure_channel(cfg.address) as cch,
                ):
                    yield Mesh(cfg, rx, rc, tokens, ch, cch)


async def cursor_is(app: ReactionsApp, name: str, value: int) -> bool:
    assert app.store is not None
    return await app.consumed_upto(name) == value


def violations(e: grpc.aio.AioRpcError) -> dict[str, str]:
    status = rpc_status.from_call(e)  # type: ignore[arg-type]
    assert status is not None
    out: dict[str, str] = {}
    for d in status.details:
        if d.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            br = error_details_pb2.BadRequest()
            d.Unpack(br)
            out.update({v.field: v.description for v in br.field_violations})
    return out


async def test_rules_come_from_the_config_service_and_act_on_run_events(mesh: Mesh) -> None:
    rules = await mesh.stub.ListRules(reactions_pb2.ListRulesRequest(), metadata=mesh.md)
    assert [r.rule.id for r in rules.rules] == ["ack-all", "help-reply"] and rules.config_revision == 1
    ev = mesh.rc.servicer.message("tg:1", "can you help me", sender="bob")
    await mesh.wait(lambda: len(mesh.replies()) == 2)
    by_kind = {r.kind: r for r in mesh.replies()}
    ack = by_kind[run_control_pb2.REPLY_KIND_ACK]
    assert ack.reply_to_message_id == ev.message_id and ack.emoji == "👀"
    assert by_kind[run_control_pb2.REPLY_KIND_REACTION].text == "Help is on the way, bob."
    # Causation of what the reaction produced: reaction origin, same chain, one hop deeper.
    cz = by_kind[run_control_pb2.REPLY_KIND_REACTION].causation
    assert cz.chain_id == "run:1" and cz.depth == 1 and list(cz.fired_rule_ids) == ["help-reply"]
    # The outcomes (action results) commit just after the replies were posted.
    await mesh.wait(lambda: cursor_is(mesh.reactions.app, "run_events", 1))  # type: ignore[arg-type]
    traces = await mesh.stub.ListTraces(reactions_pb2.ListTracesRequest(event_id="run:1"), metadata=mesh.md)
    assert [(t.rule_id, t.matched) for t in traces.traces] == [("ack-all", True), ("help-reply", True)]
    assert {a.idempotency_key for t in traces.traces for a in t.actions} == {
        "rx/run:1/ack-all/0",
        "rx/run:1/help-reply/0",
    }


async def test_self_triggering_rule_fires_once(mesh: Mesh) -> None:
    await mesh.set_rules([rule("echo", keywords=("ping",), actions=[submit_action("ping again: {text}")])])
    mesh.rc.servicer.message("s1", "ping")
    await mesh.wait(lambda: len(mesh.rc.servicer.events) == 2)
    app = mesh.reactions.app
    assert isinstance(app, ReactionsApp)
    await mesh.wait(lambda: cursor_is(app, "run_events", 2))
    submitted = mesh.rc.servicer.events[1]
    assert submitted.text == "ping again: ping" and submitted.causation.origin == 2
    second = await mesh.stub.ListTraces(reactions_pb2.ListTracesRequest(event_id="run:2"), metadata=mesh.md)
    t = second.traces[0]
    assert not t.matched and t.skip_reason == reactions_pb2.SKIP_REASON_RECURSION_GUARD
    assert "does not allow reaction origin" in t.detail
    await asyncio.sleep(0.3)
    assert len(mesh.rc.servicer.events) == 2 and len(mesh.rc.servicer.rec.submit_calls) == 1


async def test_ping_pong_stops_at_max_depth(mesh: Mesh) -> None:
    await mesh.set_rules(
        [
            rule(
                "ping",
                keywords=("ping",),
                allow_reaction_origin=True,
                max_depth=1,
                actions=[submit_action("pong")],
            ),
            rule(
                "pong",
                keywords=("pong",),
                allow_reaction_origin=True,
                max_depth=1,
                actions=[submit_action("ping")],
            ),
        ]
    )
    mesh.rc.servicer.message("s1", "ping")
    app = mesh.reactions.app
    assert isinstance(app, ReactionsApp)
    await mesh.wait(lambda: cursor_is(app, "run_events", 3))
    await asyncio.sleep(0.3)
    assert [e.text for e in mesh.rc.servicer.events] == ["ping", "pong", "ping"]
    assert [e.causation.depth for e in mesh.rc.servicer.events] == [0, 1, 2]
    last = await mesh.stub.ListTraces(
        reactions_pb2.ListTracesRequest(event_id="run:3", rule_id="ping"), metadata=mesh.md
    )
    assert last.traces[0].skip_reason == reactions_pb2.SKIP_REASON_RECURSION_GUARD
    assert "depth 2 exceeds max_depth 1" in last.traces[0].detail


async def test_empty_rule_list_via_config_stops_everything_live(mesh: Mesh) -> None:
    mesh.rc.servicer.message("s1", "first")
    await mesh.wait(lambda: len(mesh.replies()) == 1)
    revision = await mesh.set_rules([])
    rules = await mesh.stub.ListRules(reactions_pb2.ListRulesRequest(), metadata=mesh.md)
    assert rules.rules == [] and rules.config_revision == revision
    mesh.rc.servicer.message("s1", "second, help")
    app = mesh.reactions.app
    assert isinstance(app, ReactionsApp)
    await mesh.wait(lambda: cursor_is(app, "run_events", 2))
    assert len(mesh.replies()) == 1
    r = await mesh.stub.EvaluateEvent(
        reactions_pb2.EvaluateEventRequest(
            event=reactions_pb2.ReactionEvent(event_id="x", type=MSG, text="help"), dry_run=True
        ),
        metadata=mesh.md,
    )
    assert r.traces == [] and r.matched_rule_ids == []


async def test_bad_rules_are_refused_with_the_field_named(mesh: Mesh) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await mesh.set_rules([rule("bad-regex", regex="(unclosed")])
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "automation.reactions[0].trigger.regex" in violations(ei.value)
    unknown_action = config_pb2.ReactionRule(
        id="no-action",
        enabled=True,
        trigger=config_pb2.ReactionTrigger(event=MSG),
        actions=[config_pb2.ReactionAction()],
    )
    with pytest.raises(grpc.aio.AioRpcError) as ei2:
        await mesh.set_rules([unknown_action])
    assert "automation.reactions[0].actions[0]" in violations(ei2.value)
    # The same validation applies to rules proposed for a dry run.
    with pytest.raises(grpc.aio.AioRpcError) as ei3:
        await mesh.stub.EvaluateEvent(
            reactions_pb2.EvaluateEventRequest(
                event=reactions_pb2.ReactionEvent(event_id="x", type=MSG),
                dry_run=True,
                proposed_rules=[rule("ok"), rule("bad", regex="a{2,1}")],
            ),
            metadata=mesh.md,
        )
    assert ei3.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "proposed_rules[1].trigger.regex" in violations(ei3.value)
    with pytest.raises(grpc.aio.AioRpcError) as ei4:
        await mesh.stub.EvaluateEvent(
            reactions_pb2.EvaluateEventRequest(event=reactions_pb2.ReactionEvent()), metadata=mesh.md
        )
    assert {"event.event_id", "event.type"} <= set(violations(ei4.value))


async def test_megabyte_text_event(mesh: Mesh) -> None:
    text = "help " + "y" * (1 << 20)
    r = await mesh.stub.EvaluateEvent(
        reactions_pb2.EvaluateEventRequest(
            event=reactions_pb2.ReactionEvent(
                event_id="big-1", type=MSG, text=text, session_key="s", channel="cli", message_id="m1"
            )
        ),
        metadata=mesh.md,
        timeout=20,
    )
    assert sorted(r.matched_rule_ids) == ["ack-all", "help-reply"]
    reply = next(x for x in mesh.replies() if x.kind == run_control_pb2.REPLY_KIND_REACTION)
    assert reply.text.startswith("Help is on the way")


async def test_traces_flags_stats_and_grpcurl(mesh: Mesh) -> None:
    def ev(i: int, text: str, session: str = "s1") -> reactions_pb2.EvaluateEventRequest:
        return reactions_pb2.EvaluateEventRequest(
            event=reactions_pb2.ReactionEvent(
                event_id=f"api:{i}",
                type=MSG,
                text=text,
                session_key=session,
                channel="cli",
                message_id=f"m{i}",
            )
        )

    first = await mesh.stub.EvaluateEvent(ev(1, "help"), metadata=mesh.md)
    assert sorted(first.matched_rule_ids) == ["ack-all", "help-reply"]
    second = await mesh.stub.EvaluateEvent(ev(2, "help again"), metadata=mesh.md)
    t = {x.rule_id: x for x in second.traces}
    assert (
        t["help-reply"].skip_reason == reactions_pb2.SKIP_REASON_COOLDOWN
        and "left for session:s1" in t["help-reply"].detail
    )
    dup = await mesh.stub.EvaluateEvent(ev(1, "help"), metadata=mesh.md)
    assert dup.duplicate and [x.trace_id for x in dup.traces] == [x.trace_id for x in first.traces]
    for i in range(3, 8):
        await mesh.stub.EvaluateEvent(ev(i, "no keyword"), metadata=mesh.md)
    why = await mesh.stub.ListTraces(
        reactions_pb2.ListTracesRequest(rule_id="help-reply", matched=False, page_size=3), metadata=mesh.md
    )
    assert len(why.traces) == 3 and why.next_page_token
    assert all(x.rule_id == "help-reply" and not x.matched for x in why.traces)
    assert why.traces[0].event_id == "api:7" and why.traces[0].detail == "no trigger keyword in text"
    rest = await mesh.stub.ListTraces(
        reactions_pb2.ListTracesRequest(
            rule_id="help-reply", matched=False, page_size=3, page_token=why.next_page_token
        ),
        metadata=mesh.md,
    )
    assert [x.event_id for x in rest.traces] == ["api:4", "api:3", "api:2"] and not rest.next_page_token
    matches = await mesh.stub.ListTraces(
        reactions_pb2.ListTracesRequest(rule_id="help-reply", matched=True), metadata=mesh.md
    )
    assert [x.event_id for x in matches.traces] == ["api:1"]
    match_id = matches.traces[0].trace_id
    flagged = await mesh.stub.FlagFalsePositive(
        reactions_pb2.FlagFalsePositiveRequest(match_id=match_id, reason="was not a request for help"),
        metadata=mesh.md,
    )
    assert flagged.trace.false_positive and not flagged.already_flagged
    stats = await mesh.stub.GetRuleStats(
        reactions_pb2.GetRuleStatsRequest(rule_id="help-reply"), metadata=mesh.md
    )
    s = stats.rules[0]
    skips = {x.reason: x.count for x in s.skips}
    assert s.matches == 1 and s.false_positives == 1 and s.false_positive_rate == 1.0
    assert skips == {reactions_pb2.SKIP_REASON_COOLDOWN: 1, reactions_pb2.SKIP_REASON_SCOPE: 5}
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await mesh.stub.FlagFalsePositive(
            reactions_pb2.FlagFalsePositiveRequest(match_id="trc_none"), metadata=mesh.md
        )
    assert ei.value.code() == grpc.StatusCode.NOT_FOUND
    # Audit: every evaluation of a listening rule is a reactionMatch or reactionSkip record.
    app = mesh.reactions.app
    assert isinstance(app, ReactionsApp)
    path = mesh.reactions.runtime.audit.path
    assert path is not None
    records = [json.loads(x) for x in path.read_text().splitlines()]
    kinds = {(r["event"], r.get("rule"), r.get("reason")) for r in records}
    assert ("reactionMatch", "help-reply", None) in kinds
    assert ("reactionSkip", "help-reply", "cooldown") in kinds
    # grpcurl, through reflection, sees the same.
    out = await asyncio.to_thread(
        grpcurl,
        mesh.reactions.address,
        "flynn.v1.Reactions/GetRuleStats",
        token=mesh.tokens.operator,
        data='{"rule_id": "help-reply"}',
    )
    assert out.returncode == 0, out.stderr
    body = json.loads(out.stdout)
    assert body["rules"][0].get("falsePositives", body["rules"][0].get("false_positives")) == "1"


async def test_rule_the_engine_cannot_run_is_refused_before_commit_and_old_rules_stay(mesh: Mesh) -> None:
    # One rule validator (config_svc/reaction_rules.py) runs in the config service before commit, so a
    # placeholder typo never gets a revision; the reactions service keeps running the old rules.
    bad = rule("typo", actions=[config_pb2.ReactionAction(reply=config_pb2.ReplyAction(text="hi {sendr}"))])
    head = await mesh.config_stub.GetConfig(config_pb2.GetConfigRequest(), metadata=mesh.md)
    cfg = config_pb2.FlynnConfig()
    cfg.automation.reactions.append(bad)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await mesh.config_stub.UpdateConfig(
            config_pb2.UpdateConfigRequest(
                config=cfg,
                update_mask=field_mask_pb2.FieldMask(paths=["automation.reactions"]),
                expected_revision=head.revision,
                reason="typo",
            ),
            metadata=mesh.md,
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violation_fields(err.value) == ["automation.reactions[0].actions[0].reply.text"]
    assert "{sendr}" in (err.value.details() or "")
    after = await mesh.config_stub.GetConfig(config_pb2.GetConfigRequest(), metadata=mesh.md)
    assert after.revision == head.revision
    rules = await mesh.stub.ListRules(reactions_pb2.ListRulesRequest(), metadata=mesh.md)
    assert [r.rule.id for r in rules.rules] == ["ack-all", "help-reply"] and rules.config_revision == 1


async def test_flood_breaker_holds_the_rule_and_says_so(mesh: Mesh) -> None:
    await mesh.set_rules([rule("chatty", max_fires=2, window_s=600)])
    for i in range(4):
        await mesh.stub.EvaluateEvent(
            reactions_pb2.EvaluateEventRequest(
                event=reactions_pb2.ReactionEvent(
                    event_id=f"flood:{i}", type=MSG, text="x", session_key="s1", channel="cli"
                )
            ),
            metadata=mesh.md,
        )
    rules = await mesh.stub.ListRules(reactions_pb2.ListRulesRequest(), metadata=mesh.md)
    assert rules.rules[0].held and rules.rules[0].fire_count == 2
    held = await mesh.stub.ListTraces(
        reactions_pb2.ListTracesRequest(rule_id="chatty", matched=False), metadata=mesh.md
    )
    assert [t.skip_reason for t in held.traces] == [reactions_pb2.SKIP_REASON_MAX_FIRES] * 2
    assert "held by the flood breaker" in held.traces[0].detail
    stats = await mesh.stub.GetRuleStats(
        reactions_pb2.GetRuleStatsRequest(rule_id="chatty"), metadata=mesh.md
    )
    assert {s.reason: s.count for s in stats.rules[0].skips} == {reactions_pb2.SKIP_REASON_MAX_FIRES: 2}
