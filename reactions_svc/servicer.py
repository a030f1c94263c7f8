"""flynn.v1.Reactions servicer: validate, call the reactor, map."""

from __future__ import annotations

import base64
from typing import Any

import grpc
from flynn.v1 import config_pb2, reactions_pb2, reactions_pb2_grpc

from flynn_runtime.errors import invalid_argument
from flynn_runtime.validation import Violations, page_size
from reactions_svc.reactor import Reactor
from reactions_svc.trace_paging import TraceCursor

Ctx = grpc.aio.ServicerContext[Any, Any]


def _validate_event(ev: reactions_pb2.ReactionEvent, v: Violations, path: str = "event") -> None:
    if v.check(bool(ev.event_id), f"{path}.event_id", "is required: 1..256 characters"):
        v.id_length(f"{path}.event_id", ev.event_id)
    v.check(
        ev.type != 0 and ev.type in config_pb2.ReactionEventType.values(),
        f"{path}.type",
        "is required: a known event type",
    )
    for name in (
        "session_key",
        "channel",
        "sender",
        "run_id",
        "message_id",
        "node_id",
        "node_role",
        "artifact_name",
    ):
        v.check(len(getattr(ev, name)) <= 1024, f"{path}.{name}", "is longer than 1024 characters")
    v.check(len(ev.attributes) <= 64, f"{path}.attributes", "has more than 64 entries")
    v.check(ev.causation.depth >= 0, f"{path}.causation.depth", "must not be negative")
    v.id_list(f"{path}.causation.fired_rule_ids", ev.causation.fired_rule_ids, max_items=256)


def _encode_token(cursor: TraceCursor) -> str:
    return base64.urlsafe_b64encode(f"{cursor.matched_before}:{cursor.skipped_before}".encode()).decode()


def _decode_token(token: str) -> TraceCursor:
    if not token:
        return TraceCursor()
    try:
        a, b = base64.urlsafe_b64decode(token.encode()).decode().split(":")
        return TraceCursor(int(a), int(b))
    except Exception:
        raise invalid_argument("page_token", "is not a token from a previous response") from None


class ReactionsServicer(reactions_pb2_grpc.ReactionsServicer):
    def __init__(self, reactor: Reactor) -> None:
        self.reactor = reactor

    async def EvaluateEvent(
        self, request: reactions_pb2.EvaluateEventRequest, context: Ctx
    ) -> reactions_pb2.EvaluateEventResponse:
        v = Violations()
        if not request.HasField("event"):
            v.add("event", "is required")
        else:
            _validate_event(request.event, v)
        if (request.proposed_rules or request.use_proposed_rules) and not request.dry_run:
            v.add("proposed_rules", "proposed rules are only evaluated with dry_run")
        v.raise_if_any()
        if request.dry_run:
            proposed = (
                list(request.proposed_rules)
                if (request.proposed_rules or request.use_proposed_rules)
                else None
            )
            r = self.reactor.dry_run(request.event, proposed)
        else:
            r = await self.reactor.handle(request.event)
        return reactions_pb2.EvaluateEventResponse(
            traces=r.traces,
            matched_rule_ids=r.matched_rule_ids,
            config_revision=r.revision,
            duplicate=r.duplicate,
        )

    async def ListRules(
        self, request: reactions_pb2.ListRulesRequest, context: Ctx
    ) -> reactions_pb2.ListRulesResponse:
        revision = self.reactor.rules.revision
        return reactions_pb2.ListRulesResponse(
            rules=await self.reactor.rule_states(), config_revision=revision
        )

    async def ListTraces(
        self, request: reactions_pb2.ListTracesRequest, context: Ctx
    ) -> reactions_pb2.ListTracesResponse:
        v = Violations()
        v.id_length("event_id", request.event_id)
        v.id_length("rule_id", request.rule_id)
        v.raise_if_any()
        size = page_size(request.page_size, default=100, maximum=1000)
        only = request.matched if request.HasField("matched") else None
        if request.event_id:
            traces = await self.reactor.traces_for_event(request.event_id, only)
            if request.rule_id:
                traces = [t for t in traces if t.rule_id == request.rule_id]
            start = 0
            if request.page_token:
                start = _decode_token(request.page_token).matched_before
            page = traces[start : start + size]
            nxt = _encode_token(TraceCursor(start + size, 0)) if start + size < len(traces) else ""
            return reactions_pb2.ListTracesResponse(traces=page, next_page_token=nxt)
        found, cursor = await self.reactor.list_traces(
            request.rule_id, only, _decode_token(request.page_token), size
        )
        return reactions_pb2.ListTracesResponse(
            traces=found, next_page_token=_encode_token(cursor) if cursor is not None else ""
        )

    async def GetRuleStats(
        self, request: reactions_pb2.GetRuleStatsRequest, context: Ctx
    ) -> reactions_pb2.GetRuleStatsResponse:
        v = Violations()
        v.id_length("rule_id", request.rule_id)
        v.raise_if_any()
        per, total = await self.reactor.rule_stats(request.rule_id)
        return reactions_pb2.GetRuleStatsResponse(rules=per, total=total)

    async def FlagFalsePositive(
        self, request: reactions_pb2.FlagFalsePositiveRequest, context: Ctx
    ) -> reactions_pb2.FlagFalsePositiveResponse:
        v = Violations()
        v.check(
            bool(request.match_id) and len(request.match_id) <= 256,
            "match_id",
            "is required: 1..256 characters",
        )
        v.text("reason", request.reason, max_bytes=4096)
        v.raise_if_any()
        trace, already = await self.reactor.flag_false_positive(request.match_id, request.reason)
        return reactions_pb2.FlagFalsePositiveResponse(trace=trace, already_flagged=already)
