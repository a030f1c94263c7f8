"""ListTraces over both trace tables: newest first, one cursor per table.

Matches (and action errors, which are skips kept with the matches so noise cannot evict them) live in
traces_matched; every other skip of a listening rule lives in traces_skipped. A page merges the newest
rows of the tables the filter asks for by (time, seq), and the cursor keeps, per table, the lowest
sequence number the page showed, so the next page continues each table where this one stopped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from reactions_svc.store import StoredTrace

MAX_SEQ = 1 << 62


@dataclass(slots=True, frozen=True)
class TraceCursor:
    """Where the next page starts: below these sequence numbers of traces_matched and traces_skipped."""

    matched_before: int = MAX_SEQ
    skipped_before: int = MAX_SEQ


@dataclass(slots=True, frozen=True)
class TraceQuery:
    """ListTraces without an event id: a rule (or all), matches/skips (or both), a page."""

    rule_id: str
    only_matched: bool | None
    cursor: TraceCursor
    size: int


@dataclass(slots=True)
class TracePage:
    traces: list[StoredTrace]
    next: TraceCursor | None  # None on the last page


@dataclass(slots=True)
class _Row:
    trace: StoredTrace
    seq: int
    in_matched_table: bool


class TraceTables(Protocol):
    async def page_matched(
        self, rule_id: str, before_seq: int, limit: int, only_matched: bool | None = None
    ) -> list[tuple[int, StoredTrace]]: ...

    async def page_skipped(
        self, rule_id: str, before_seq: int, limit: int
    ) -> list[tuple[int, StoredTrace]]: ...


async def _candidates(tables: TraceTables, q: TraceQuery) -> list[_Row]:
    """Up to size + 1 rows of each table the filter asks for (one more tells whether a page follows)."""
    only, c, n = q.only_matched, q.cursor, q.size + 1
    rows: list[_Row] = []
    if only is None or only:
        matched = await tables.page_matched(
            q.rule_id, c.matched_before, n, only_matched=True if only else None
        )
        rows += [_Row(t, seq, True) for seq, t in matched]
    if only is None or only is False:
        rows += [_Row(t, seq, False) for seq, t in await tables.page_skipped(q.rule_id, c.skipped_before, n)]
    if only is False:
        errors = await tables.page_matched(q.rule_id, c.matched_before, n, only_matched=False)
        rows += [_Row(t, seq, True) for seq, t in errors]
    return rows


async def page_traces(tables: TraceTables, q: TraceQuery) -> TracePage:
    """The newest `q.size` traces below the cursor and the cursor of the next page."""
    rows = sorted(await _candidates(tables, q), key=lambda r: (r.trace.time, r.seq), reverse=True)
    chosen = rows[: q.size]
    matched_before, skipped_before = q.cursor.matched_before, q.cursor.skipped_before
    for r in chosen:
        if r.in_matched_table:
            matched_before = min(matched_before, r.seq)
        else:
            skipped_before = min(skipped_before, r.seq)
    more = len(rows) > q.size
    return TracePage([r.trace for r in chosen], TraceCursor(matched_before, skipped_before) if more else None)
