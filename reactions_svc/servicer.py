"""flynn.v1.Reactions servicer: validate, call the reactor, map."""

from __future__ import annotations

import base64
import time
from typing import Any

import grpc
from flynn.v1 import config_pb2, reactions_pb2, reactions_pb2_grpc

from flynn_runtime.errors import invalid_argument
from flynn_runtime.validation import Violations, page_size
from reactions_svc.engine import FireState
from reactions_svc.reactor import Reactor, stored_trace_proto
from reactions_svc.store import StoredTrace

Ctx = grpc.aio.ServicerContext[Any, Any]
MAX_SEQ = 1 << 62


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


def _encode_token(a: int, b: int) -> str:
    return base64.urlsafe_b64encode(f"{a}:{b}".encode()).decode()


def _decode_token(token: str) -> tuple[int, int]:
    if not token:
        return MAX_SEQ, MAX_SEQ
    try:
        a, b = base64.urlsafe_b64decode(token.encode()).decode().split(":")
        return int(a), int(b)
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
        rs = self.reactor.rules
        fires = await self.reactor.store.rule_fires()
        state: FireState = self.reactor.state
        now = time.time()
        out = []
        for c in rs.rules:
            st = reactions_pb2.RuleState(rule=c.rule, held=bool(state.held_keys(c, now)))
            n, last = fires.get(c.id, (0, 0.0))
            st.fire_count = n
            if last:
                st.last_fire_time.FromNanoseconds(int(last * 1e9))
            out.append(st)
        return reactions_pb2.ListRulesResponse(rules=out, config_revision=rs.revision)

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
                start = _decode_token(request.page_token)[0]
            page = traces[start : start + size]
            nxt = _encode_token(start + size, 0) if start + size < len(traces) else ""
            return reactions_pb2.ListTracesResponse(traces=page, next_page_token=nxt)
        m_before, s_before = _decode_token(request.page_token)
        store = self.reactor.store
        m_rows: list[tuple[int, StoredTrace]] = []
        s_rows: list[tuple[int, StoredTrace]] = []
        if only is None or only is True:
            m_rows = await store.page_matched(
                request.rule_id, m_before, size + 1, only_matched=True if only else None
            )
        if only is None or only is False:
            s_rows = await store.page_skipped(request.rule_id, s_before, size + 1)
            if only is False:
                # Action errors are skips kept with the matches (they must not be evicted by noise either).
                s_rows += [
                    (-seq, t)
                    for seq, t in await store.page_matched(request.rule_id, m_before, size + 1, False)
                ]
        merged: list[tuple[str, int, StoredTrace]] = sorted(
            [("m", seq, t) for seq, t in m_rows]
            + [("s" if seq > 0 else "e", abs(seq), t) for seq, t in s_rows],
            key=lambda x: (x[2].time, x[1]),
            reverse=True,
        )
        chosen = merged[:size]
        next_m, next_s = m_before, s_before
        for kind, seq, _ in chosen:
            if kind in ("m", "e"):
                next_m = min(next_m, seq)
            else:
                next_s = min(next_s, seq)
        more = len(merged) > size
        return reactions_pb2.ListTracesResponse(
            traces=[stored_trace_proto(t) for _, _, t in chosen],
            next_page_token=_encode_token(next_m, next_s) if more else "",
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
