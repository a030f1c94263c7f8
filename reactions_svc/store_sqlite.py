"""Reactions state in SQLite (WAL, synchronous=FULL) under <data_dir>/reactions/ (the embedded default).

Tables:
  evaluations     one row per evaluated event id (dedupe), with every trace of the event (compact JSON)
                  and status pending -> done (pending = actions not all finished; resumed at start)
  traces_matched  matches (and action errors), bounded; flagged false positives live here
  traces_skipped  skips of rules listening to the event type, bounded separately so noise never evicts
                  a match
  action_results  outcome per idempotency key, so a resumed event never repeats a finished action
  fire_state      cooldown and fire window per (rule, cooldown key)
  rule_fires      fires ever and last fire per rule
  counters        per (rule, reason): matches are reason 0, false positives reason -1
  cursors         consumer cursors (run events global_seq, node events seq)

Methods are `async` to match the PostgreSQL backend (store.ReactionStore); SQLite calls run inline on
the event loop as before (a local file, no network round trip).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable
from contextlib import AbstractContextManager
from pathlib import Path

from flynn_runtime.sqlite_db import open_db, transaction
from reactions_svc import store as rs
from reactions_svc.trace_paging import TracePage, TraceQuery, page_traces

SCHEMA = """
CREATE TABLE IF NOT EXISTS evaluations (
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  event_id TEXT NOT NULL UNIQUE,
  time REAL NOT NULL,
  revision INTEGER NOT NULL,
  event_type INTEGER NOT NULL,
  session_key TEXT NOT NULL,
  status TEXT NOT NULL,
  event BLOB NOT NULL,
  traces TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS evaluations_pending ON evaluations(status) WHERE status = 'pending';
CREATE TABLE IF NOT EXISTS traces_matched (
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  trace_id TEXT NOT NULL UNIQUE,
  event_id TEXT NOT NULL,
  rule_id TEXT NOT NULL,
  matched INTEGER NOT NULL,
  reason INTEGER NOT NULL,
  detail TEXT NOT NULL,
  actions TEXT NOT NULL,
  time REAL NOT NULL,
  event_type INTEGER NOT NULL,
  session_key TEXT NOT NULL,
  false_positive INTEGER NOT NULL DEFAULT 0,
  fp_reason TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS traces_matched_rule ON traces_matched(rule_id, seq);
CREATE INDEX IF NOT EXISTS traces_matched_event ON traces_matched(event_id);
CREATE TABLE IF NOT EXISTS traces_skipped (
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  trace_id TEXT NOT NULL,
  event_id TEXT NOT NULL,
  rule_id TEXT NOT NULL,
  reason INTEGER NOT NULL,
  detail TEXT NOT NULL,
  time REAL NOT NULL,
  event_type INTEGER NOT NULL,
  session_key TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS traces_skipped_rule ON traces_skipped(rule_id, seq);
CREATE TABLE IF NOT EXISTS action_results (
  idempotency_key TEXT PRIMARY KEY,
  ok INTEGER NOT NULL,
  result_id TEXT NOT NULL,
  error TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS fire_state (
  rule_id TEXT NOT NULL,
  key TEXT NOT NULL,
  last REAL NOT NULL,
  window TEXT NOT NULL,
  PRIMARY KEY (rule_id, key)
);
CREATE TABLE IF NOT EXISTS rule_fires (
  rule_id TEXT PRIMARY KEY,
  fire_count INTEGER NOT NULL,
  last_fire REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (
  rule_id TEXT NOT NULL,
  reason INTEGER NOT NULL,
  count INTEGER NOT NULL,
  PRIMARY KEY (rule_id, reason)
);
CREATE TABLE IF NOT EXISTS cursors (
  name TEXT PRIMARY KEY,
  value INTEGER NOT NULL
);
"""


class SqliteReactionStore:
    def __init__(self, directory: Path, retention: rs.Retention | None = None) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / "reactions.db"
        self.retention = retention or rs.Retention()
        self.db = open_db(self.path, schema=SCHEMA)
        self._since_prune = 0

    async def close(self) -> None:
        self.db.close()

    # Evaluations --------------------------------------------------------------------------------

    async def get_evaluation(self, event_id: str) -> rs.StoredEvaluation | None:
        row = self.db.execute(
            "SELECT event_id, time, revision, status, event, traces FROM evaluations WHERE event_id = ?",
            (event_id,),
        ).fetchone()
        if row is None:
            return None
        return rs.StoredEvaluation(row[0], row[1], row[2], row[3], row[4], rs.traces_of(row[5]))

    async def pending_event_ids(self, limit: int = 1000) -> list[str]:
        rows = self.db.execute(
            "SELECT event_id FROM evaluations WHERE status = 'pending' ORDER BY seq LIMIT ?", (limit,)
        ).fetchall()
        return [r[0] for r in rows]

    async def save_evaluation(self, e: rs.NewEvaluation) -> None:
        """One transaction: the evaluation, its traces, the fire state it changed, skip counters."""
        skipped = list(e.skipped)
        with self._tx():
            self.db.execute(
                "INSERT INTO evaluations(event_id, time, revision, event_type, session_key, status, event, traces) "
                "VALUES (?,?,?,?,?,?,?,?)",
                rs.evaluation_params(
                    e, json.dumps(rs.traces_json(e.traces), ensure_ascii=False, separators=(",", ":"))
                ),
            )
            self.db.executemany(
                "INSERT OR REPLACE INTO traces_matched(trace_id, event_id, rule_id, matched, reason, detail, actions, time, "
                "event_type, session_key) VALUES (?,?,?,?,?,?,?,?,?,?)",
                [rs.matched_params(t, json.dumps(t.actions)) for t in e.matched],
            )
            self.db.executemany(
                "INSERT INTO traces_skipped(trace_id, event_id, rule_id, reason, detail, time, event_type, session_key) "
                "VALUES (?,?,?,?,?,?,?,?)",
                [rs.skipped_params(t) for t in skipped],
            )
            self.db.executemany(
                "INSERT INTO fire_state(rule_id, key, last, window) VALUES (?,?,?,?) "
                "ON CONFLICT(rule_id, key) DO UPDATE SET last = excluded.last, window = excluded.window",
                [(r, k, last, json.dumps(w)) for r, k, last, w in e.fire_rows],
            )
            self.db.executemany(
                "INSERT INTO rule_fires(rule_id, fire_count, last_fire) VALUES (?, 1, ?) "
                "ON CONFLICT(rule_id) DO UPDATE SET fire_count = fire_count + 1, last_fire = excluded.last_fire",
                [(r, e.now) for r in e.fired_rule_ids],
            )
            self._bump((t.rule_id, t.reason) for t in skipped)
        await self._maybe_prune()

    async def finish_evaluation(
        self,
        event_id: str,
        outcomes: Iterable[rs.TraceOutcome],
        action_rows: Iterable[rs.ActionRow] = (),
    ) -> None:
        """Record each fired rule's final outcome (match or action_error) and mark the event done."""
        outcomes = list(outcomes)
        with self._tx():
            self.db.executemany(
                "INSERT INTO action_results(idempotency_key, ok, result_id, error) VALUES (?,?,?,?) "
                "ON CONFLICT(idempotency_key) DO UPDATE SET ok = excluded.ok, result_id = excluded.result_id, "
                "error = excluded.error",
                [(a.key, int(a.ok), a.result_id, a.error) for a in action_rows],
            )
            for o in outcomes:
                self.db.execute(
                    "UPDATE traces_matched SET matched = ?, reason = ?, detail = ?, actions = ? WHERE trace_id = ?",
                    (int(o.matched), o.reason, o.detail, json.dumps(o.actions), o.trace_id),
                )
            rows = []
            for o in outcomes:
                row = self.db.execute(
                    "SELECT rule_id, reason FROM traces_matched WHERE trace_id = ?", (o.trace_id,)
                ).fetchone()
                if row is not None:
                    rows.append(row)
            self._bump((r[0], r[1]) for r in rows)
            self.db.execute("UPDATE evaluations SET status = 'done' WHERE event_id = ?", (event_id,))

    def _bump(self, keys: Iterable[tuple[str, int]]) -> None:
        counts: dict[tuple[str, int], int] = {}
        for k in keys:
            counts[k] = counts.get(k, 0) + 1
        if counts:
            self.db.executemany(
                "INSERT INTO counters(rule_id, reason, count) VALUES (?,?,?) "
                "ON CONFLICT(rule_id, reason) DO UPDATE SET count = count + excluded.count",
                [(r, reason, n) for (r, reason), n in counts.items()],
            )

    # Action results -----------------------------------------------------------------------------

    async def action_result(self, key: str) -> tuple[bool, str, str] | None:
        row = self.db.execute(
            "SELECT ok, result_id, error FROM action_results WHERE idempotency_key = ?", (key,)
        ).fetchone()
        return None if row is None else (bool(row[0]), row[1], row[2])

    async def save_action_result(self, key: str, ok: bool, result_id: str, error: str) -> None:
        with self._tx():
            self.db.execute(
                "INSERT INTO action_results(idempotency_key, ok, result_id, error) VALUES (?,?,?,?) "
                "ON CONFLICT(idempotency_key) DO UPDATE SET ok = excluded.ok, result_id = excluded.result_id, "
                "error = excluded.error",
                (key, int(ok), result_id, error),
            )

    # Traces -------------------------------------------------------------------------------------

    async def matched_for_event(self, event_id: str) -> dict[str, rs.StoredTrace]:
        rows = self.db.execute(
            f"SELECT {rs.MATCHED_COLS} FROM traces_matched WHERE event_id = ?", (event_id,)
        ).fetchall()
        return {str(r[1]): rs.matched_trace(r) for r in rows}

    async def page_matched(
        self, rule_id: str, before_seq: int, limit: int, only_matched: bool | None = None
    ) -> list[tuple[int, rs.StoredTrace]]:
        """Rows of traces_matched newest first. only_matched=False gives the action errors (skips)."""
        where = ["seq < ?"]
        args: list[object] = [before_seq]
        if rule_id:
            where.append("rule_id = ?")
            args.append(rule_id)
        if only_matched is not None:
            where.append("matched = ?")
            args.append(int(only_matched))
        rows = self.db.execute(
            f"SELECT {rs.MATCHED_COLS} FROM traces_matched WHERE {' AND '.join(where)} ORDER BY seq DESC LIMIT ?",
            (*args, limit),
        ).fetchall()
        return [(int(r[0]), rs.matched_trace(r)) for r in rows]

    async def page_skipped(
        self, rule_id: str, before_seq: int, limit: int
    ) -> list[tuple[int, rs.StoredTrace]]:
        where = "seq < ?" + (" AND rule_id = ?" if rule_id else "")
        args: tuple[object, ...] = (before_seq, rule_id) if rule_id else (before_seq,)
        rows = self.db.execute(
            f"SELECT {rs.SKIPPED_COLS} FROM traces_skipped WHERE {where} ORDER BY seq DESC LIMIT ?",
            (*args, limit),
        ).fetchall()
        return [(int(r[0]), rs.skipped_trace(r)) for r in rows]

    async def page_traces(self, query: TraceQuery) -> TracePage:
        return await page_traces(self, query)

    async def get_matched(self, trace_id: str) -> rs.StoredTrace | None:
        row = self.db.execute(
            f"SELECT {rs.MATCHED_COLS} FROM traces_matched WHERE trace_id = ?", (trace_id,)
        ).fetchone()
        return None if row is None else rs.matched_trace(row)

    async def flag_false_positive(self, trace_id: str, reason: str) -> tuple[rs.StoredTrace | None, bool]:
        """(trace, already_flagged); trace None when no match has this id."""
        with self._tx():
            t = await self.get_matched(trace_id)
            if t is None:
                return None, False
            if t.false_positive:
                return t, True
            self.db.execute(
                "UPDATE traces_matched SET false_positive = 1, fp_reason = ? WHERE trace_id = ?",
                (reason, trace_id),
            )
            self._bump([(t.rule_id, rs.FP_REASON)])
        t.false_positive, t.fp_reason = True, reason
        return t, False

    # Fire state, counters -----------------------------------------------------------------------

    async def load_fire_state(self) -> list[tuple[str, str, float, list[float]]]:
        rows = self.db.execute("SELECT rule_id, key, last, window FROM fire_state").fetchall()
        return [(r[0], r[1], float(r[2]), json.loads(r[3])) for r in rows]

    async def delete_fire_state(self, keys: Iterable[tuple[str, str, float]]) -> None:
        with self._tx():
            self.db.executemany(
                "DELETE FROM fire_state WHERE rule_id = ? AND key = ? AND last <= ?", list(keys)
            )

    async def rule_fires(self) -> dict[str, tuple[int, float]]:
        return {r[0]: (int(r[1]), float(r[2])) for r in self.db.execute("SELECT * FROM rule_fires")}

    async def counters(self, rule_id: str = "") -> dict[str, dict[int, int]]:
        q = "SELECT rule_id, reason, count FROM counters" + (" WHERE rule_id = ?" if rule_id else "")
        out: dict[str, dict[int, int]] = {}
        for r, reason, n in self.db.execute(q, (rule_id,) if rule_id else ()):
            out.setdefault(r, {})[int(reason)] = int(n)
        return out

    # Cursors ------------------------------------------------------------------------------------

    async def cursor(self, name: str) -> int:
        row = self.db.execute("SELECT value FROM cursors WHERE name = ?", (name,)).fetchone()
        return int(row[0]) if row else 0

    async def set_cursor(self, name: str, value: int) -> None:
        with self._tx():
            self.db.execute(
                "INSERT INTO cursors(name, value) VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET value = excluded.value",
                (name, value),
            )

    # Housekeeping -------------------------------------------------------------------------------

    async def _maybe_prune(self) -> None:
        self._since_prune += 1
        if self._since_prune < self.retention.prune_every:
            return
        self._since_prune = 0
        await self.prune()

    async def prune(self) -> None:
        r = self.retention
        with self._tx():
            for table, cap in (
                ("evaluations", r.evaluations),
                ("traces_matched", r.matched),
                ("traces_skipped", r.skipped),
            ):
                # Never drop an evaluation whose actions are still pending.
                extra = " AND status = 'done'" if table == "evaluations" else ""
                self.db.execute(
                    f"DELETE FROM {table} WHERE seq <= (SELECT MAX(seq) FROM {table}) - ?{extra}", (cap,)
                )
            self.db.execute(
                "DELETE FROM action_results WHERE rowid <= (SELECT MAX(rowid) FROM action_results) - ?",
                (r.action_results,),
            )

    def _tx(self) -> AbstractContextManager[sqlite3.Connection]:
        return transaction(self.db)
