"""Durable state of the reactions service: the interface and the backend chosen by settings.

Backends: store_sqlite.py (embedded default, <data_dir>/reactions/reactions.db; its docstring lists
the tables) and store_pg.py (PostgreSQL schema flynn_reactions, the same tables). Every write
returns after its commit: an evaluation is recorded exactly once per event id, an action outcome
once per idempotency key, and consumer cursors only move after what they cover is stored.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from flynn_runtime.server import Runtime

FP_REASON = -1
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
    reason: int
    detail: str
    actions: list[dict[str, object]]
    time: float
    event_type: int
    session_key: str
    false_positive: bool = False
    fp_reason: str = ""
    dry_run: bool = False


@dataclass
class StoredEvaluation:
    event_id: str
    time: float
    revision: int
    status: str
    event: bytes
    traces: list[list[object]]  # [rule_id, matched, reason, detail, trace_id, listening]


class ReactionStore(Protocol):
    retention: Retention

    async def close(self) -> None: ...

    async def get_evaluation(self, event_id: str) -> StoredEvaluation | None: ...

    async def pending_event_ids(self, limit: int = 1000) -> list[str]: ...

    async def save_evaluation(
        self,
        *,
        event_id: str,
        now: float,
        revision: int,
        event_type: int,
        session_key: str,
        event: bytes,
        traces: Sequence[Sequence[object]],
        matched: Iterable[StoredTrace],
        skipped: Iterable[StoredTrace],
        fire_rows: Iterable[tuple[str, str, float, list[float]]],
        fired_rule_ids: Iterable[str],
        pending: bool,
    ) -> None:
        """One transaction: the evaluation, its traces, the fire state it changed, skip counters."""
        ...

    async def finish_evaluation(
        self,
        event_id: str,
        outcomes: Iterable[tuple[str, bool, int, str, list[dict[str, object]]]],
        action_rows: Iterable[tuple[str, bool, str, str]] = (),
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

    async def get_matched(self, trace_id: str) -> StoredTrace | None: ...

    async def flag_false_positive(self, trace_id: str, reason: str) -> tuple[StoredTrace | None, bool]:
        """(trace, already_flagged); trace None when no match has this id."""
        ...

    async def load_fire_state(self) -> list[tuple[str, str, float, list[float]]]: ...

    async def delete_fire_state(self, keys: Iterable[tuple[str, str]]) -> None: ...

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
