"""The reaction pipeline: dedupe -> evaluate -> persist -> act -> finish, shared by the RPC and the consumers.

An event id is evaluated once. Its decisions (traces, cooldowns, fire windows) are committed in one
transaction *before* any action runs, with status pending; each action's outcome is recorded under its
idempotency key (event id + rule id + action index); the event is marked done when every fired rule's
actions have an outcome. A crash anywhere leaves either nothing (the event is evaluated again) or a
pending evaluation that is resumed (at start, or when the consumer replays the event): finished actions
are not repeated, and unfinished ones are retried with the same key, which the downstream deduplicates.

Action failure policy: the rule's trace becomes a skip with reason action_error, but the fire still
counts for cooldown and fire cap (the rule did act, maybe partly; counting it keeps a failing downstream
from being hammered once per event).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from flynn.v1 import config_pb2, reactions_pb2

from config_svc.reaction_rules import validate_rules
from flynn_runtime import errors
from flynn_runtime.config_source import ConfigSource
from flynn_runtime.errors import FlynnError, invalid_fields, not_found, unavailable
from flynn_runtime.timestamps import timestamp
from reactions_svc import engine, metrics
from reactions_svc.engine import Evaluation, FireState, Trace, reason_name
from reactions_svc.event_mapping import stored_event_id
from reactions_svc.proposed_rules import validate_rule_list
from reactions_svc.rules import RuleSet
from reactions_svc.store import (
    FP_REASON,
    ActionRow,
    CompactTrace,
    FireStateMoved,
    NewEvaluation,
    ReactionStore,
    SkipReason,
    StoredTrace,
    TraceOutcome,
)
from reactions_svc.trace_paging import TraceCursor, TraceQuery

log = logging.getLogger(__name__)

TEXT_PLACEHOLDER_MAX = 4000
# Actions whose downstream call takes no idempotency key (Canvas.PutArtifact).
NON_IDEMPOTENT_KINDS = frozenset({"put_canvas"})
ACTION_ATTEMPTS = 3
STATE_PRUNE_EVERY = 1000
#: Evaluations of one event when other replicas keep firing its shared cooldown keys in between.
CLAIM_ATTEMPTS = 5


def idempotency_key(event_id: str, rule_id: str, index: int) -> str:
    key = f"rx/{event_id}/{rule_id}/{index}"
    if len(key) <= 200:
        return key
    return "rx/" + hashlib.sha256(key.encode("utf-8")).hexdigest()[:48]


@dataclass(slots=True)
class ActionContext:
    event: reactions_pb2.ReactionEvent
    rule_id: str
    index: int
    idempotency_key: str
    values: dict[str, str]


@dataclass(slots=True)
class ActionOutcome:
    ok: bool
    result_id: str = ""
    error: str = ""
    # A failure worth retrying (downstream unavailable / deadline): the pipeline retries a few times.
    transient: bool = False


class ActionRunner(Protocol):
    async def run(
        self, kind: str, action: config_pb2.ReactionAction, ctx: ActionContext
    ) -> ActionOutcome: ...


AuditFn = Callable[..., object]


class RuleSource:
    """The compiled rules of the applied config revision, recompiled when automation.reactions changes."""

    def __init__(self, config: ConfigSource) -> None:
        self._config = config
        self.rules = RuleSet(list(config.config.automation.reactions), config.revision)
        self._unsubscribe = config.subscribe(self._changed, key="automation.reactions")
        self._revision_seen = config.revision

    def current(self) -> RuleSet:
        # Revisions that do not touch automation.reactions still move the revision we report.
        if self._config.revision != self.rules.revision and self._config.revision != self._revision_seen:
            self._revision_seen = self._config.revision
            self.rules.revision = self._config.revision
        return self.rules

    def _changed(self, old: config_pb2.FlynnConfig, new: config_pb2.FlynnConfig, revision: int) -> None:
        try:
            self.rules = RuleSet(list(new.automation.reactions), revision)
            log.info("reaction rules applied", extra={"revision": revision, "rules": len(self.rules)})
        except Exception:
            log.exception("reaction rules refused; keeping the previous set", extra={"revision": revision})

    def close(self) -> None:
        self._unsubscribe()


def config_validator(cfg: config_pb2.FlynnConfig) -> None:
    """Refuses (NACK) a config whose rules the engine cannot run; names every bad field."""
    violations = validate_rules(list(cfg.automation.reactions))
    if violations:
        raise invalid_fields(violations)


@dataclass(slots=True)
class Result:
    traces: list[reactions_pb2.ReactionTrace]
    matched_rule_ids: list[str]
    revision: int
    duplicate: bool = False


@dataclass(slots=True, frozen=True)
class Fired:
    """A rule that fired for the event, and its trace."""

    rule_id: str
    trace_id: str


@dataclass(slots=True)
class _Prepared:
    event: reactions_pb2.ReactionEvent
    revision: int
    traces: list[CompactTrace]
    fired: list[Fired] = field(default_factory=list)
    duplicate: bool = False
    pending: bool = False
    # The rule set the event was evaluated with (None for a stored evaluation: the current set acts).
    rules: RuleSet | None = None


class Reactor:
    def __init__(
        self,
        store: ReactionStore,
        rules: Callable[[], RuleSet],
        runner: ActionRunner | None,
        audit: AuditFn | None = None,
        clock: Callable[[], float] = time.time,
        claim_shared_keys: bool = False,
    ) -> None:
        self.store = store
        #: Replicas share the store: fires of cooldown keys several sessions share are claimed in it.
        self.claim_shared_keys = claim_shared_keys
        self._rules = rules
        self.runner = runner
        self._audit = audit
        self._clock = clock
        self.state = FireState()
        self._loaded = False
        self._lock = asyncio.Lock()
        self._evaluations = 0
        self._inflight: dict[str, asyncio.Future[None]] = {}

    @property
    def rules(self) -> RuleSet:
        return self._rules()

    async def load(self) -> None:
        """Read the cooldown/fire-window state from the store (once, before the first evaluation)."""
        if self._loaded:
            return
        for rule_id, key, last, window in await self.store.load_fire_state():
            self.state.last[(rule_id, key)] = last
            if window:
                self.state.windows[(rule_id, key)] = list(window)
        self._loaded = True

    # Entry points -------------------------------------------------------------------------------

    async def handle(self, event: reactions_pb2.ReactionEvent) -> Result:
        """Evaluate and act on an event exactly once per event id; the traces of the (first) evaluation."""
        r = await self._handle(event, with_result=True)
        assert r is not None
        return r

    async def process(self, event: reactions_pb2.ReactionEvent) -> None:
        """`handle` without building the response (the consumers' path)."""
        await self._handle(event, with_result=False)

    async def _handle(self, event: reactions_pb2.ReactionEvent, *, with_result: bool) -> Result | None:
        while event.event_id in self._inflight:
            await asyncio.shield(self._inflight[event.event_id])
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._inflight[event.event_id] = fut
        try:
            async with self._lock:
                await self.load()
                prepared = await self._prepare(event)
            if prepared.pending:
                await self._act(prepared)
            return await self._result(prepared) if with_result else None
        finally:
            self._inflight.pop(event.event_id, None)
            fut.set_result(None)

    def dry_run(
        self, event: reactions_pb2.ReactionEvent, proposed: Sequence[config_pb2.ReactionRule] | None = None
    ) -> Result:
        """Evaluate without acting, without changing cooldowns, without recording anything."""
        if proposed is not None:
            violations = validate_rule_list(list(proposed), prefix="proposed_rules")
            if violations:
                raise invalid_fields(violations)
            rs = RuleSet(list(proposed), 0)
        else:
            rs = self.rules
        ev = engine.evaluate(event, rs, self.state, self._clock(), dry_run=True)
        now = self._clock()
        traces = [self._trace_proto(event, t, "", now, dry_run=True) for t in ev.traces]
        return Result(traces, [c.id for c in ev.matched], rs.revision)

    async def resume_pending(self, only: Callable[[reactions_pb2.ReactionEvent], bool] | None = None) -> int:
        """Finish the actions of evaluations a crash left pending; returns how many were resumed.
        `only` restricts it to some events (with several replicas: those of partitions held here)."""
        n = 0
        for event_id in await self.store.pending_event_ids():
            stored = await self.store.get_evaluation(event_id)
            if stored is None:
                continue
            ev = reactions_pb2.ReactionEvent.FromString(stored.event)
            if only is not None and not only(ev):
                continue
            await self.process(ev)
            n += 1
        return n

    # Evaluation ---------------------------------------------------------------------------------

    async def _prepare(self, event: reactions_pb2.ReactionEvent) -> _Prepared:
        stored = await self.store.get_evaluation(event.event_id)
        if stored is not None:
            fired = [
                Fired(t.rule_id, t.trace_id)
                for t in stored.traces
                if t.matched or t.reason == engine.SKIP_ACTION_ERROR
            ]
            stored_event = reactions_pb2.ReactionEvent.FromString(stored.event)
            return _Prepared(
                stored_event,
                stored.revision,
                stored.traces,
                fired,
                duplicate=True,
                pending=stored.status == "pending",
            )
        rs = self.rules
        now = self._clock()
        self._evaluations += 1
        if self._evaluations % STATE_PRUNE_EVERY == 0:
            gone = self.state.prune(rs, now)
            if gone:
                await self.store.delete_fire_state(gone)
        for _ in range(CLAIM_ATTEMPTS):
            t0 = time.perf_counter()
            ev = engine.evaluate(event, rs, self.state, now)
            metrics.EVALUATION_SECONDS.observe(time.perf_counter() - t0)
            try:
                return await self._persist(event, ev, now, rs)
            except FireStateMoved as moved:
                # Another replica fired a shared key since this one read it: take the store's state
                # and evaluate again (the rule now sees that fire's cooldown or window).
                self.state.rollback()
                for rule_id, key, last, window in moved.current:
                    self.state.put((rule_id, key), last, window)
                metrics.FIRE_STATE_CLAIMS_LOST.inc()
            except BaseException:
                self.state.rollback()  # not stored: the event is evaluated again, from the same state
                raise
        raise unavailable(
            f"event {errors.shown(event.event_id)}: shared cooldown state kept moving; try again",
            reason="FIRE_STATE_CONTENDED",
        )

    async def _persist(
        self, event: reactions_pb2.ReactionEvent, ev: Evaluation, now: float, rules: RuleSet
    ) -> _Prepared:
        compact: list[CompactTrace] = []
        matched: list[StoredTrace] = []
        skipped: list[StoredTrace] = []
        fired: list[Fired] = []
        et, sk = event.type, event.session_key
        for t in ev.traces:
            if not t.listening:
                compact.append(CompactTrace(t.rule_id, False, t.reason, t.detail, "", False))
                continue
            # Deterministic: an event id is evaluated once, so (event, rule) names the trace.
            tid = f"{event.event_id}/{t.rule_id}"
            compact.append(CompactTrace(t.rule_id, t.matched, t.reason, t.detail, tid, True))
            st = StoredTrace(tid, event.event_id, t.rule_id, t.matched, t.reason, t.detail, [], now, et, sk)
            if t.matched:
                matched.append(st)
                fired.append(Fired(t.rule_id, tid))
            else:
                skipped.append(st)
        fire_rows = []
        claims: dict[tuple[str, str], float] = {}
        for rule_id, key in self.state.dirty:
            k = (rule_id, key)
            fire_rows.append((rule_id, key, self.state.last.get(k, now), self.state.windows.get(k, [])))
            if self.claim_shared_keys and engine.shared_key(key):
                claims[k] = self.state.prior.get(k, (None, []))[0] or 0.0
        stored_event = event
        if len(event.text) > engine.MAX_EVAL_BYTES // 4:
            stored_event = reactions_pb2.ReactionEvent()
            stored_event.CopyFrom(event)
            stored_event.text = engine.bound_text(event.text)
        await self.store.save_evaluation(
            NewEvaluation(
                event_id=event.event_id,
                now=now,
                revision=ev.revision,
                event_type=et,
                session_key=sk,
                event=stored_event.SerializeToString(),
                traces=compact,
                matched=matched,
                skipped=skipped,
                fire_rows=fire_rows,
                fired_rule_ids=[f.rule_id for f in fired],
                pending=bool(fired),
                claims=claims,
            )
        )
        self.state.committed()
        scope_skips: list[str] = []
        for s in skipped:
            metrics.skip(s.rule_id, s.reason)
            if s.reason == engine.SKIP_SCOPE:
                scope_skips.append(s.rule_id)
            else:
                self._record_audit(
                    "reactionSkip", event, s.rule_id, s.trace_id, reason_name(s.reason), s.detail
                )
        if scope_skips:
            # Out-of-scope rules are the bulk of every evaluation: one record per event keeps the audit
            # cheap; each one's trace (with its detail) is in ListTraces.
            self._record_audit(
                "reactionSkip",
                event,
                "*",
                "",
                "scope",
                f"{len(scope_skips)} rules listening to {engine.event_type_name(event.type)} out of scope",
                count=len(scope_skips),
                rules=scope_skips[:50],
            )
        return _Prepared(event, ev.revision, compact, fired, pending=bool(fired), rules=rules)

    # Actions ------------------------------------------------------------------------------------

    async def _act(self, p: _Prepared) -> None:
        """Run the actions of every rule that fired, record their outcomes, mark the event done."""
        rules = p.rules or self.rules
        values = placeholder_values(p.event)
        outcomes: list[TraceOutcome] = []
        action_rows: list[ActionRow] = []
        details = {t.trace_id: t.detail for t in p.traces if t.trace_id}
        for f in p.fired:
            c = rules.by_id.get(f.rule_id)
            if c is None:
                # The rule went away between evaluation and a resume: report it rather than guess.
                outcomes.append(
                    TraceOutcome(
                        f.trace_id, False, engine.SKIP_ACTION_ERROR, "rule no longer in the config", []
                    )
                )
                continue
            results, failed = await self._run_rule_actions(p, c.rule, f.rule_id, values, action_rows)
            outcomes.append(self._rule_outcome(p.event, f, results, failed, details.get(f.trace_id, "")))
        await self.store.finish_evaluation(p.event.event_id, outcomes, action_rows)
        by_tid = {o.trace_id: o for o in outcomes}
        for t in p.traces:
            o = by_tid.get(t.trace_id)
            if o is not None:
                t.matched, t.reason, t.detail = o.matched, o.reason, o.detail
        p.pending = False

    async def _run_rule_actions(
        self,
        p: _Prepared,
        rule: config_pb2.ReactionRule,
        rule_id: str,
        values: dict[str, str],
        action_rows: list[ActionRow],
    ) -> tuple[list[dict[str, object]], str]:
        """One fired rule's actions in order, up to the first failure: (results, failure or "")."""
        event = p.event
        results: list[dict[str, object]] = []
        for idx, action in enumerate(rule.actions):
            kind = action.WhichOneof("action") or ""
            key = idempotency_key(event.event_id, rule_id, idx)
            done = await self.store.action_result(key) if p.duplicate else None
            if done is not None and done[0]:
                ok, result_id, _ = done
                results.append({"kind": kind, "ok": ok, "key": key, "result_id": result_id, "error": ""})
                continue
            out = await self._run_action(kind, action, ActionContext(event, rule_id, idx, key, values))
            if kind in NON_IDEMPOTENT_KINDS:
                # The downstream cannot deduplicate it: make the outcome durable before anything else.
                await self.store.save_action_result(key, out.ok, out.result_id, out.error)
            else:
                # A replay of these is deduplicated downstream by the key; record them with the outcome.
                action_rows.append(ActionRow(key, out.ok, out.result_id, out.error))
            metrics.ACTIONS.labels(kind, "ok" if out.ok else "error").inc()
            results.append(
                {"kind": kind, "ok": out.ok, "key": key, "result_id": out.result_id, "error": out.error}
            )
            if not out.ok:
                return results, f"action[{idx}] {kind} failed: {out.error}"
        return results, ""

    def _rule_outcome(
        self,
        event: reactions_pb2.ReactionEvent,
        f: Fired,
        results: list[dict[str, object]],
        failed: str,
        detail: str,
    ) -> TraceOutcome:
        if failed:
            metrics.skip(f.rule_id, engine.SKIP_ACTION_ERROR)
            self._record_audit("reactionSkip", event, f.rule_id, f.trace_id, "action_error", failed)
            return TraceOutcome(f.trace_id, False, engine.SKIP_ACTION_ERROR, failed, results)
        metrics.MATCHES.labels(f.rule_id).inc()
        self._record_audit(
            "reactionMatch", event, f.rule_id, f.trace_id, None, detail, actions=[r["kind"] for r in results]
        )
        return TraceOutcome(f.trace_id, True, engine.MATCHED, detail, results)

    async def _run_action(
        self, kind: str, action: config_pb2.ReactionAction, ctx: ActionContext
    ) -> ActionOutcome:
        if self.runner is None:
            return ActionOutcome(False, error="no action runner configured")
        out = ActionOutcome(False, error="not run")
        for attempt in range(ACTION_ATTEMPTS):
            try:
                out = await self.runner.run(kind, action, ctx)
            except FlynnError as e:
                out = ActionOutcome(False, error=str(e))
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a bug in one action must not stop the consumer
                log.exception("action crashed", extra={"kind": kind, "rule": ctx.rule_id})
                out = ActionOutcome(False, error=f"{type(e).__name__}: {e}")
            if out.ok or not out.transient or attempt == ACTION_ATTEMPTS - 1:
                return out
            await asyncio.sleep(0.2 * (2**attempt))
        return out

    # Reading ------------------------------------------------------------------------------------

    async def _result(self, p: _Prepared) -> Result:
        ev = p.event
        matched_rows = await self.store.matched_for_event(ev.event_id) if p.fired else {}
        now = self._clock()
        traces = []
        matched_ids = []
        for t in p.traces:
            row = matched_rows.get(t.trace_id)
            traces.append(self._compact_proto(ev, t, row, now))
            if row.matched if row is not None else t.matched:
                matched_ids.append(t.rule_id)
        return Result(traces, matched_ids, p.revision, duplicate=p.duplicate)

    async def traces_for_event(
        self, event_id: str, matched: bool | None
    ) -> list[reactions_pb2.ReactionTrace]:
        event_id = stored_event_id(event_id)
        stored = await self.store.get_evaluation(event_id)
        if stored is None:
            raise not_found("event", event_id)
        ev = reactions_pb2.ReactionEvent.FromString(stored.event)
        rows = await self.store.matched_for_event(event_id)
        out = []
        for t in stored.traces:
            row = rows.get(t.trace_id)
            is_match = row.matched if row is not None else t.matched
            if matched is not None and is_match != matched:
                continue
            out.append(self._compact_proto(ev, t, row, stored.time))
        return out

    async def list_traces(
        self, rule_id: str, only_matched: bool | None, cursor: TraceCursor, size: int
    ) -> tuple[list[reactions_pb2.ReactionTrace], TraceCursor | None]:
        """Stored traces newest first (all events), and the cursor of the next page (None on the last)."""
        page = await self.store.page_traces(TraceQuery(rule_id, only_matched, cursor, size))
        return [stored_trace_proto(t) for t in page.traces], page.next

    async def rule_states(self) -> list[reactions_pb2.RuleState]:
        """Every rule of the applied set with its fire count, last fire and flood-breaker hold."""
        fires = await self.store.rule_fires()
        now = time.time()
        out = []
        for c in self.rules.rules:
            st = reactions_pb2.RuleState(rule=c.rule, held=bool(self.state.held_keys(c, now)))
            n, last = fires.get(c.id, (0, 0.0))
            st.fire_count = n
            if last:
                st.last_fire_time.CopyFrom(timestamp(last))
            out.append(st)
        return out

    def _compact_proto(
        self, ev: reactions_pb2.ReactionEvent, t: CompactTrace, row: StoredTrace | None, when: float
    ) -> reactions_pb2.ReactionTrace:
        if row is not None:
            return stored_trace_proto(row)
        return self._trace_proto(ev, t, t.trace_id, when)

    @staticmethod
    def _trace_proto(
        ev: reactions_pb2.ReactionEvent,
        t: Trace | CompactTrace,
        trace_id: str,
        when: float,
        dry_run: bool = False,
    ) -> reactions_pb2.ReactionTrace:
        return reactions_pb2.ReactionTrace(
            trace_id=trace_id,
            event_id=ev.event_id,
            rule_id=t.rule_id,
            matched=t.matched,
            skip_reason=t.reason,
            detail=t.detail,
            dry_run=dry_run,
            event_type=ev.type,
            session_key=ev.session_key,
            time=timestamp(when),
        )

    async def flag_false_positive(
        self, match_id: str, reason: str
    ) -> tuple[reactions_pb2.ReactionTrace, bool]:
        t, already = await self.store.flag_false_positive(match_id, reason)
        if t is None:
            raise not_found("match", match_id)
        if not already:
            metrics.FALSE_POSITIVES.labels(t.rule_id).inc()
            if self._audit is not None:
                self._audit(
                    "reactionFalsePositive",
                    rule=t.rule_id,
                    match_id=match_id,
                    event_id=t.event_id,
                    reason=reason,
                )
        return stored_trace_proto(t), already

    async def rule_stats(
        self, rule_id: str = ""
    ) -> tuple[list[reactions_pb2.RuleStats], reactions_pb2.RuleStats]:
        counters = await self.store.counters(rule_id)
        ids = set(counters)
        if not rule_id:
            ids |= set(self.rules.by_id)
        elif rule_id not in ids and rule_id not in self.rules.by_id:
            raise not_found("rule", rule_id)
        else:
            ids.add(rule_id)
        per: list[reactions_pb2.RuleStats] = []
        total_skips: dict[int, int] = {}
        tm = tf = 0
        for rid in sorted(ids):
            c = counters.get(rid, {})
            m, f = c.get(0, 0), c.get(FP_REASON, 0)
            skips = sorted((r, n) for r, n in c.items() if r > 0)
            for r, n in skips:
                total_skips[r] = total_skips.get(r, 0) + n
            tm, tf = tm + m, tf + f
            per.append(
                reactions_pb2.RuleStats(
                    rule_id=rid,
                    matches=m,
                    skips=[reactions_pb2.SkipCount(reason=SkipReason(r), count=n) for r, n in skips],
                    false_positives=f,
                    false_positive_rate=f / m if m else 0.0,
                )
            )
        total = reactions_pb2.RuleStats(
            rule_id="*",
            matches=tm,
            skips=[
                reactions_pb2.SkipCount(reason=SkipReason(r), count=n) for r, n in sorted(total_skips.items())
            ],
            false_positives=tf,
            false_positive_rate=tf / tm if tm else 0.0,
        )
        return per, total

    def _record_audit(
        self,
        event_name: str,
        ev: reactions_pb2.ReactionEvent,
        rule_id: str,
        trace_id: str,
        reason: str | None,
        detail: str,
        **extra: Any,
    ) -> None:
        if self._audit is None:
            return
        self._audit(
            event_name,
            actor="reactions",
            rule=rule_id,
            trace_id=trace_id,
            event_id=ev.event_id,
            event_type=engine.event_type_name(ev.type),
            session=ev.session_key or None,
            chain_id=ev.causation.chain_id or ev.event_id,
            depth=ev.causation.depth,
            reason=reason,
            detail=detail,
            **extra,
        )


def stored_trace_proto(t: StoredTrace) -> reactions_pb2.ReactionTrace:
    return reactions_pb2.ReactionTrace(
        trace_id=t.trace_id,
        event_id=t.event_id,
        rule_id=t.rule_id,
        matched=t.matched,
        skip_reason=t.reason,
        detail=t.detail,
        event_type=t.event_type,
        session_key=t.session_key,
        false_positive=t.false_positive,
        dry_run=t.dry_run,
        actions=[
            reactions_pb2.ActionResult(
                kind=str(a.get("kind", "")),
                ok=bool(a.get("ok")),
                error=str(a.get("error", "")),
                idempotency_key=str(a.get("key", "")),
                result_id=str(a.get("result_id", "")),
            )
            for a in t.actions
        ],
        time=timestamp(t.time),
    )


def placeholder_values(ev: reactions_pb2.ReactionEvent) -> dict[str, str]:
    return {
        "text": ev.text[:TEXT_PLACEHOLDER_MAX],
        "sender": ev.sender,
        "session_key": ev.session_key,
        "channel": ev.channel,
        "run_id": ev.run_id,
        "error_kind": ev.error_kind,
        "node_id": ev.node_id,
    }
