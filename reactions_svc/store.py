"""Durable state of the reactions service: the interface and the backend chosen by settings.

Backends: store_sqlite.py (embedded default, <data_dir>/reactions/reactions.db; its docstring lists
the tables) and store_pg.py (PostgreSQL schema flynn_reactions, the same tables). Every write
returns after its commit: an evaluation is recorded exactly once per event id, an action outcome
once per idempotency key, and consumer cursors only move after what they cover is stored.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias

from flynn.v1 import config_pb2, reactions_pb2

from flynn_runtime.server import Runtime

if TYPE_CHECKING:
    from reactions_svc.trace_paging import TracePage, TraceQuery

FP_REASON = -1
SkipReason: TypeAlias = reactions_pb2.SkipReason.ValueType
EventType: TypeAlias = config_pb2.ReactionEventType.ValueType
SCHEMA = "flynn_reactions"


@dataclass(frozen=True)
class Retention:
    evaluations: int = 50_000
    matched: int = 100_000
    skipped: int = 200_000
    action_results: int = 200_000
    prune_every: int = 500


@dataclass
class StoredTrace:
    trace_id: str
    event_id: str
    rule_id: str
    matched: bool
    reason: SkipReason
    detail: str
    actions: list[dict[str, object]]
    time: float
    event_type: EventType
    session_key: str
    false_positive: bool = False
    fp_reason: str = ""
    dry_run: bool = False


@dataclass(slots=True)
class CompactTrace:
    """One rule's outcome for one event as the evaluation row keeps it (a JSON array, in this order)."""

    rule_id: str
    matched: bool
    reason: SkipReason
    detail: str
    trace_id: str  # "" for rules that do not listen to the event's type (no trace row of their own)
    listening: bool

    def to_json(self) -> list[object]:
        return [self.rule_id, self.matched, self.reason, self.detail, self.trace_id, self.listening]

    @classmethod
    def from_json(cls, row: Sequence[Any]) -> CompactTrace:
        return cls(str(row[0]), bool(row[1]), SkipReason(int(row[2])), str(row[3]), str(row[4]), bool(row[5]))


def traces_json(traces: Sequence[CompactTrace]) -> list[list[object]]:
    """The evaluation row's `traces` column."""
    return [t.to_json() for t in traces]


def traces_of(column: str | list[Any]) -> list[CompactTrace]:
    """The evaluation row's `traces` column read back (a JSON text, or the list a JSONB column gives)."""
    rows = json.loads(column) if isinstance(column, str) else column
    return [CompactTrace.from_json(r) for r in rows]


@dataclass(slots=True)
class TraceOutcome:
    """A fired rule's final outcome, once its actions ran: a match, or a skip with reason action_error."""

    trace_id: str
    matched: bool
    reason: SkipReason
    detail: str
    actions: list[dict[str, object]]


@dataclass(slots=True, frozen=True)
class ActionRow:
    """One action's outcome under its idempotency key."""

    key: str
    ok: bool
    result_id: str
    error: str


@dataclass(slots=True, frozen=True)
class NewEvaluation:
    """What `save_evaluation` writes in one transaction: the evaluation and its traces, the rows of
    the traces that listen (matched, skipped), the fire state it changed and the rules it fired."""

    event_id: str
    now: float
    revision: int
    event_type: int
    session_key: str
    event: bytes
    traces: list[CompactTrace]
    matched: list[StoredTrace]
    skipped: list[StoredTrace]
    fire_rows: list[tuple[str, str, float, list[float]]]
    fired_rule_ids: list[str]
    pending: bool
    #: (rule id, key) -> the last fire this evaluation saw (0: none), for keys events of several
    #: sessions share. A store shared by replicas claims them: when another replica moved one since,
    #: nothing is written and FireStateMoved says what the store holds.
    claims: dict[tuple[str, str], float] = field(default_factory=dict)


def evaluation_params(e: NewEvaluation, traces: object) -> tuple[object, ...]:
    """The `evaluations` row of `e` in column order (`traces` as the backend stores JSON)."""
    status = "pending" if e.pending else "done"
    return (e.event_id, e.now, e.revision, e.event_type, e.session_key, status, e.event, traces)


class FireStateMoved(Exception):
    """Another replica fired a shared cooldown key since this replica read it: evaluate again."""

    def __init__(self, current: list[tuple[str, str, float, list[float]]]) -> None:
        super().__init__(f"{len(current)} shared cooldown key(s) moved")
        self.current = current


@dataclass
class StoredEvaluation:
    event_id: str
    time: float
    revision: int
    status: str
    event: bytes
    traces: list[CompactTrace]


def matched_trace(r: Sequence[Any]) -> StoredTrace:
    """A traces_matched row (columns MATCHED_COLS) of either backend."""
    actions = json.loads(r[7]) if isinstance(r[7], str) else r[7]
    return StoredTrace(
        trace_id=str(r[1]),
        event_id=str(r[2]),
        rule_id=str(r[3]),
        matched=bool(r[4]),
        reason=SkipReason(int(r[5])),
        detail=str(r[6]),
        actions=actions,
        time=float(r[8]),
        event_type=EventType(int(r[9])),
        session_key=str(r[10]),
        false_positive=bool(r[11]),
        fp_reason=str(r[12]),
    )


def skipped_trace(r: Sequence[Any]) -> StoredTrace:
    """A traces_skipped row (columns SKIPPED_COLS) of either backend."""
    return StoredTrace(
        str(r[1]),
        str(r[2]),
        str(r[3]),
        False,
        SkipReason(int(r[4])),
        str(r[5]),
        [],
        float(r[6]),
        EventType(int(r[7])),
        str(r[8]),
    )


def matched_params(t: StoredTrace, actions: object) -> tuple[object, ...]:
    """A traces_matched row to insert (`actions` encoded by the backend), in the stores' column order."""
    return (
        t.trace_id, t.event_id, t.rule_id, t.matched, t.reason, t.detail, actions, t.time, t.event_type, t.session_key,
    )  # fmt: skip


def skipped_params(t: StoredTrace) -> tuple[object, ...]:
    """A traces_skipped row to insert, in the stores' column order."""
    return (t.trace_id, t.event_id, t.rule_id, t.reason, t.detail, t.time, t.event_type, t.session_key)


MATCHED_COLS = (
    "seq, trace_id, event_id, rule_id, matched, reason, detail, actions, time, event_type, session_key,"
    " false_positive, fp_reason"
)
SKIPPED_COLS = "seq, trace_id, event_id, rule_id, reason, detail, time, event_type, session_key"


class ReactionStore(Protocol):
    retention: Retention

    async def close(self) -> None: ...

    async def get_evaluation(self, event_id: str) -> StoredEvaluation | None: ...

    async def pending_event_ids(self, limit: int = 1000) -> list[str]: ...

    async def save_evaluation(self, e: NewEvaluation) -> None:
        """One transaction: the evaluation, its traces, the fire state it changed, skip counters."""
        ...

    async def finish_evaluation(
        self,
        event_id: str,
        outcomes: Iterable[TraceOutcome],
        action_rows: Iterable[ActionRow] = (),
    ) -> None:
        """Record each fired rule's final outcome (match or action_error) and mark the event done."""
        ...

    async def action_result(self, key: str) -> tuple[bool, str, str] | None: ...

    async def save_action_result(self, key: str, ok: bool, result_id: str, error: str) -> None: ...

    async def matched_for_event(self, event_id: str) -> dict[str, StoredTrace]: ...

    async def page_matched(
        self, rule_id: str, before_seq: int, limit: int, only_matched: bool | None = None
    ) -> list[tuple[int, StoredTrace]]:
        """Rows of traces_matched newest first. only_matched=False gives the action errors (skips)."""
        ...

    async def page_skipped(
        self, rule_id: str, before_seq: int, limit: int
    ) -> list[tuple[int, StoredTrace]]: ...

    async def page_traces(self, query: TraceQuery) -> TracePage:
        """One ListTraces page over both trace tables, newest first (`trace_paging.page_traces`)."""
        ...

    async def get_matched(self, trace_id: str) -> StoredTrace | None: ...

    async def flag_false_positive(self, trace_id: str, reason: str) -> tuple[StoredTrace | None, bool]:
        """(trace, already_flagged); trace None when no match has this id."""
        ...

    async def load_fire_state(self) -> list[tuple[str, str, float, list[float]]]: ...

    async def delete_fire_state(self, keys: Iterable[tuple[str, str, float]]) -> None:
        """Delete (rule id, key) rows whose last fire is still the one given."""
        ...

    async def rule_fires(self) -> dict[str, tuple[int, float]]: ...

    async def counters(self, rule_id: str = "") -> dict[str, dict[int, int]]: ...

    async def cursor(self, name: str) -> int: ...

    async def set_cursor(self, name: str, value: int) -> None: ...

    async def prune(self) -> None: ...


async def open_reaction_store(runtime: Runtime, retention: Retention | None = None) -> ReactionStore:
    if runtime.database_settings is None:
        from reactions_svc.store_sqlite import SqliteReactionStore

        return SqliteReactionStore(runtime.settings.data_dir / "reactions", retention)
    from reactions_svc.store_pg import MIGRATIONS, PgReactionStore

    return PgReactionStore(await runtime.open_database(SCHEMA, MIGRATIONS), retention)


def sqlite_path(data_dir: Path) -> Path:
    return data_dir / "reactions" / "reactions.db"


def now() -> float:
    return time.time()
