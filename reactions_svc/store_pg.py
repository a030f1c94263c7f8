"""Reactions state in PostgreSQL (schema flynn_reactions): the tables of store_sqlite.py.

Each method is one transaction and returns after COMMIT. An evaluation is inserted once per event id
(UNIQUE), action outcomes once per idempotency key (PRIMARY KEY, upsert), counters are incremented in
the database (`count = count + excluded.count`), so concurrent writers never lose an update. Retention
is enforced by `prune` with the same caps as SQLite.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import psycopg
from psycopg.types.json import Json, Jsonb

from flynn_runtime import leases, replica_registry
from flynn_runtime.database import Database, PooledStore
from flynn_runtime.db_copy import Counts, SqliteSource, StoreCopier, Table, export_tables, import_tables
from flynn_runtime.pg_migrations import Migration
from reactions_svc.store import (
    FP_REASON,
    MATCHED_COLS,
    SCHEMA,
    SKIPPED_COLS,
    ActionRow,
    FireStateMoved,
    NewEvaluation,
    Retention,
    StoredEvaluation,
    StoredTrace,
    TraceOutcome,
    evaluation_params,
    matched_params,
    matched_trace,
    skipped_params,
    skipped_trace,
    traces_json,
    traces_of,
)
from reactions_svc.store_sqlite import SqliteReactionStore
from reactions_svc.trace_paging import TracePage, TraceQuery, page_traces

MIGRATIONS = [
    Migration(
        1,
        "evaluations, traces, action results, fire state, counters, cursors",
        """
        CREATE TABLE evaluations (
          seq BIGSERIAL PRIMARY KEY,
          event_id TEXT NOT NULL UNIQUE,
          time DOUBLE PRECISION NOT NULL,
          revision BIGINT NOT NULL,
          event_type INTEGER NOT NULL,
          session_key TEXT NOT NULL,
          status TEXT NOT NULL,
          event BYTEA NOT NULL,
          traces JSONB NOT NULL
        );
        CREATE INDEX evaluations_pending ON evaluations(seq) WHERE status = 'pending';
        CREATE TABLE traces_matched (
          seq BIGSERIAL PRIMARY KEY,
          trace_id TEXT NOT NULL UNIQUE,
          event_id TEXT NOT NULL,
          rule_id TEXT NOT NULL,
          matched BOOLEAN NOT NULL,
          reason INTEGER NOT NULL,
          detail TEXT NOT NULL,
          actions JSON NOT NULL,  -- json, not jsonb: keeps the text (and key order) as written
          time DOUBLE PRECISION NOT NULL,
          event_type INTEGER NOT NULL,
          session_key TEXT NOT NULL,
          false_positive BOOLEAN NOT NULL DEFAULT FALSE,
          fp_reason TEXT NOT NULL DEFAULT ''
        );
        CREATE INDEX traces_matched_rule ON traces_matched(rule_id, seq);
        CREATE INDEX traces_matched_event ON traces_matched(event_id);
        CREATE TABLE traces_skipped (
          seq BIGSERIAL PRIMARY KEY,
          trace_id TEXT NOT NULL,
          event_id TEXT NOT NULL,
          rule_id TEXT NOT NULL,
          reason INTEGER NOT NULL,
          detail TEXT NOT NULL,
          time DOUBLE PRECISION NOT NULL,
          event_type INTEGER NOT NULL,
          session_key TEXT NOT NULL
        );
        CREATE INDEX traces_skipped_rule ON traces_skipped(rule_id, seq);
        CREATE TABLE action_results (
          seq BIGSERIAL,
          idempotency_key TEXT PRIMARY KEY,
          ok BOOLEAN NOT NULL,
          result_id TEXT NOT NULL,
          error TEXT NOT NULL
        );
        CREATE INDEX action_results_seq ON action_results(seq);
        CREATE TABLE fire_state (
          rule_id TEXT NOT NULL,
          key TEXT NOT NULL,
          last DOUBLE PRECISION NOT NULL,
          "window" JSONB NOT NULL,
          PRIMARY KEY (rule_id, key)
        );
        CREATE TABLE rule_fires (
          rule_id TEXT PRIMARY KEY,
          fire_count BIGINT NOT NULL,
          last_fire DOUBLE PRECISION NOT NULL
        );
        CREATE TABLE counters (
          rule_id TEXT NOT NULL,
          reason INTEGER NOT NULL,
          count BIGINT NOT NULL,
          PRIMARY KEY (rule_id, reason)
        );
        CREATE TABLE cursors (
          name TEXT PRIMARY KEY,
          value BIGINT NOT NULL
        );
        """,
    ),
    Migration(2, "partition and replica leases (several replicas)", leases.MIGRATION_SQL),
    Migration(3, "every replica as it knows itself, with a heartbeat", replica_registry.MIGRATION_SQL),
]

Conn = psycopg.AsyncConnection[tuple[Any, ...]]


async def _claim_fire_state(cur: psycopg.AsyncCursor[Any], claims: dict[tuple[str, str], float]) -> None:
    """Lock the shared cooldown keys an evaluation fired (in one order, so replicas never deadlock)
    and refuse with FireStateMoved when another replica fired one since this one read it."""
    keys = sorted(claims)
    await cur.executemany(
        "INSERT INTO fire_state(rule_id, key, last, \"window\") VALUES (%s, %s, 0, '[]')"
        " ON CONFLICT (rule_id, key) DO NOTHING",
        keys,
    )
    moved: list[tuple[str, str, float, list[float]]] = []
    for rule_id, key in keys:
        await cur.execute(
            'SELECT last, "window" FROM fire_state WHERE rule_id = %s AND key = %s FOR UPDATE', (rule_id, key)
        )
        row = await cur.fetchone()
        assert row is not None
        if float(row[0]) != claims[(rule_id, key)]:
            moved.append((rule_id, key, float(row[0]), list(row[1])))
    if moved:
        raise FireStateMoved(moved)


class PgReactionStore(PooledStore):
    def __init__(self, db: Database, retention: Retention | None = None) -> None:
        super().__init__(db)
        self.retention = retention or Retention()
        self._since_prune = 0

    # Evaluations --------------------------------------------------------------------------------

    async def get_evaluation(self, event_id: str) -> StoredEvaluation | None:
        async with self.db.connection() as c:
            cur = await c.execute(
                "SELECT event_id, time, revision, status, event, traces FROM evaluations WHERE event_id = %s",
                (event_id,),
            )
            row = await cur.fetchone()
        if row is None:
            return None
        return StoredEvaluation(row[0], float(row[1]), int(row[2]), row[3], bytes(row[4]), traces_of(row[5]))

    async def pending_event_ids(self, limit: int = 1000) -> list[str]:
        async with self.db.connection() as c:
            cur = await c.execute(
                "SELECT event_id FROM evaluations WHERE status = 'pending' ORDER BY seq LIMIT %s", (limit,)
            )
            rows = await cur.fetchall()
        return [r[0] for r in rows]

    async def save_evaluation(self, e: NewEvaluation) -> None:
        matched, skipped = list(e.matched), list(e.skipped)
        fire_rows, fired = list(e.fire_rows), list(e.fired_rule_ids)
        async with self.db.transaction() as c, c.cursor() as cur:
            if e.claims:
                await _claim_fire_state(cur, e.claims)
            await cur.execute(
                "INSERT INTO evaluations(event_id, time, revision, event_type, session_key, status, event, traces)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
                evaluation_params(e, Jsonb(traces_json(e.traces))),
            )
            if matched:
                await cur.executemany(
                    "INSERT INTO traces_matched(trace_id, event_id, rule_id, matched, reason, detail, actions, time,"
                    " event_type, session_key) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
                    " ON CONFLICT (trace_id) DO UPDATE SET event_id = excluded.event_id, rule_id = excluded.rule_id,"
                    " matched = excluded.matched, reason = excluded.reason, detail = excluded.detail,"
                    " actions = excluded.actions, time = excluded.time, event_type = excluded.event_type,"
                    " session_key = excluded.session_key",
                    [matched_params(t, Json(t.actions)) for t in matched],
                )
            if skipped:
                await cur.executemany(
                    "INSERT INTO traces_skipped(trace_id, event_id, rule_id, reason, detail, time, event_type,"
                    " session_key) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
                    [skipped_params(t) for t in skipped],
                )
            if fire_rows:
                await cur.executemany(
                    'INSERT INTO fire_state(rule_id, key, last, "window") VALUES (%s, %s, %s, %s)'
                    ' ON CONFLICT (rule_id, key) DO UPDATE SET last = excluded.last, "window" = excluded."window"',
                    [(r, k, last, Jsonb(w)) for r, k, last, w in fire_rows],
                )
            if fired:
                await cur.executemany(
                    "INSERT INTO rule_fires(rule_id, fire_count, last_fire) VALUES (%s, 1, %s)"
                    " ON CONFLICT (rule_id) DO UPDATE SET fire_count = rule_fires.fire_count + 1,"
                    " last_fire = excluded.last_fire",
                    [(r, e.now) for r in fired],
                )
            await self._bump(cur, ((t.rule_id, t.reason) for t in skipped))
        await self._maybe_prune()

    async def finish_evaluation(
        self,
        event_id: str,
        outcomes: Iterable[TraceOutcome],
        action_rows: Iterable[ActionRow] = (),
    ) -> None:
        outcomes, action_rows = list(outcomes), list(action_rows)
        async with self.db.transaction() as c, c.cursor() as cur:
            # Finished once: with several replicas a paused one and the replica that took its partition
            # over may both finish the same evaluation; the row lock orders them and the second, finding
            # it done, records nothing (outcomes and counters count each event once).
            await cur.execute(
                "UPDATE evaluations SET status = 'done' WHERE event_id = %s AND status = 'pending' RETURNING 1",
                (event_id,),
            )
            if await cur.fetchone() is None:
                return
            if action_rows:
                await cur.executemany(
                    _UPSERT_ACTION, [(a.key, a.ok, a.result_id, a.error) for a in action_rows]
                )
            keys: list[tuple[str, int]] = []
            for o in outcomes:
                await cur.execute(
                    "UPDATE traces_matched SET matched = %s, reason = %s, detail = %s, actions = %s"
                    " WHERE trace_id = %s RETURNING rule_id, reason",
                    (o.matched, o.reason, o.detail, Json(o.actions), o.trace_id),
                )
                row = await cur.fetchone()
                if row is not None:
                    keys.append((row[0], int(row[1])))
            await self._bump(cur, keys)

    @staticmethod
    async def _bump(cur: psycopg.AsyncCursor[tuple[Any, ...]], keys: Iterable[tuple[str, int]]) -> None:
        counts: dict[tuple[str, int], int] = {}
        for k in keys:
            counts[k] = counts.get(k, 0) + 1
        if counts:
            await cur.executemany(
                "INSERT INTO counters(rule_id, reason, count) VALUES (%s, %s, %s)"
                " ON CONFLICT (rule_id, reason) DO UPDATE SET count = counters.count + excluded.count",
                [(r, reason, n) for (r, reason), n in sorted(counts.items())],
            )

    # Action results -----------------------------------------------------------------------------

    async def action_result(self, key: str) -> tuple[bool, str, str] | None:
        async with self.db.connection() as c:
            cur = await c.execute(
                "SELECT ok, result_id, error FROM action_results WHERE idempotency_key = %s", (key,)
            )
            row = await cur.fetchone()
        return None if row is None else (bool(row[0]), row[1], row[2])

    async def save_action_result(self, key: str, ok: bool, result_id: str, error: str) -> None:
        async with self.db.transaction() as c:
            await c.execute(_UPSERT_ACTION, (key, ok, result_id, error))

    # Traces -------------------------------------------------------------------------------------

    async def matched_for_event(self, event_id: str) -> dict[str, StoredTrace]:
        async with self.db.connection() as c:
            cur = await c.execute(
                "SELECT " + MATCHED_COLS + " FROM traces_matched WHERE event_id = %s", (event_id,)
            )
            rows = await cur.fetchall()
        return {str(r[1]): matched_trace(r) for r in rows}

    async def page_matched(
        self, rule_id: str, before_seq: int, limit: int, only_matched: bool | None = None
    ) -> list[tuple[int, StoredTrace]]:
        async with self.db.connection() as c:
            cur = await c.execute(
                "SELECT " + MATCHED_COLS + " FROM traces_matched"
                " WHERE seq < %(before)s AND (%(rule)s = '' OR rule_id = %(rule)s)"
                " AND (%(only)s::boolean IS NULL OR matched = %(only)s::boolean)"
                " ORDER BY seq DESC LIMIT %(limit)s",
                {"before": before_seq, "rule": rule_id, "only": only_matched, "limit": limit},
            )
            rows = await cur.fetchall()
        return [(int(r[0]), matched_trace(r)) for r in rows]

    async def page_skipped(self, rule_id: str, before_seq: int, limit: int) -> list[tuple[int, StoredTrace]]:
        async with self.db.connection() as c:
            cur = await c.execute(
                "SELECT "
                + SKIPPED_COLS
                + " FROM traces_skipped WHERE seq < %(before)s AND (%(rule)s = '' OR rule_id = %(rule)s)"
                " ORDER BY seq DESC LIMIT %(limit)s",
                {"before": before_seq, "rule": rule_id, "limit": limit},
            )
            rows = await cur.fetchall()
        return [(int(r[0]), skipped_trace(r)) for r in rows]

    async def page_traces(self, query: TraceQuery) -> TracePage:
        return await page_traces(self, query)

    async def get_matched(self, trace_id: str) -> StoredTrace | None:
        async with self.db.connection() as c:
            cur = await c.execute(
                "SELECT " + MATCHED_COLS + " FROM traces_matched WHERE trace_id = %s", (trace_id,)
            )
            row = await cur.fetchone()
        return None if row is None else matched_trace(row)

    async def flag_false_positive(self, trace_id: str, reason: str) -> tuple[StoredTrace | None, bool]:
        async with self.db.transaction() as c, c.cursor() as cur:
            await cur.execute(
                "SELECT " + MATCHED_COLS + " FROM traces_matched WHERE trace_id = %s FOR UPDATE", (trace_id,)
            )
            row = await cur.fetchone()
            if row is None:
                return None, False
            t = matched_trace(row)
            if t.false_positive:
                return t, True
            await cur.execute(
                "UPDATE traces_matched SET false_positive = TRUE, fp_reason = %s WHERE trace_id = %s",
                (reason, trace_id),
            )
            await self._bump(cur, [(t.rule_id, FP_REASON)])
        t.false_positive, t.fp_reason = True, reason
        return t, False

    # Fire state, counters -----------------------------------------------------------------------

    async def load_fire_state(self) -> list[tuple[str, str, float, list[float]]]:
        async with self.db.connection() as c:
            rows = await (await c.execute('SELECT rule_id, key, last, "window" FROM fire_state')).fetchall()
        return [(r[0], r[1], float(r[2]), list(r[3])) for r in rows]

    async def delete_fire_state(self, keys: Iterable[tuple[str, str, float]]) -> None:
        keys = list(keys)
        if not keys:
            return
        async with self.db.transaction() as c, c.cursor() as cur:
            # A row another replica fired since (a shared key) has a later `last` and stays.
            await cur.executemany(
                "DELETE FROM fire_state WHERE rule_id = %s AND key = %s AND last <= %s", keys
            )

    async def rule_fires(self) -> dict[str, tuple[int, float]]:
        async with self.db.connection() as c:
            rows = await (await c.execute("SELECT rule_id, fire_count, last_fire FROM rule_fires")).fetchall()
        return {r[0]: (int(r[1]), float(r[2])) for r in rows}

    async def counters(self, rule_id: str = "") -> dict[str, dict[int, int]]:
        async with self.db.connection() as c:
            cur = await c.execute(
                "SELECT rule_id, reason, count FROM counters WHERE %(rule)s = '' OR rule_id = %(rule)s",
                {"rule": rule_id},
            )
            rows = await cur.fetchall()
        out: dict[str, dict[int, int]] = {}
        for r, reason, n in rows:
            out.setdefault(r, {})[int(reason)] = int(n)
        return out

    # Cursors ------------------------------------------------------------------------------------

    async def cursor(self, name: str) -> int:
        return await self.db.read_int("SELECT value FROM cursors WHERE name = %s", (name,))

    async def set_cursor(self, name: str, value: int) -> None:
        async with self.db.transaction() as c:
            await c.execute(
                "INSERT INTO cursors(name, value) VALUES (%s, %s)"
                " ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                (name, value),
            )

    async def set_cursor_fenced(
        self, name: str, value: int, scope: str, holder: str, lease: str, epoch: int
    ) -> None:
        """set_cursor, refused (leases.StaleEpoch) unless `holder` still holds `lease` at `epoch`."""
        q, params = leases.fence(scope, holder, {lease: epoch})
        try:
            async with self.db.transaction() as c:
                await c.execute(q, params)
                await c.execute(
                    "INSERT INTO cursors(name, value) VALUES (%s, %s)"
                    " ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                    (name, value),
                )
        except psycopg.Error as e:
            stale = leases.stale_from(e, scope)
            if stale is not None:
                raise stale from None
            raise

    # Housekeeping -------------------------------------------------------------------------------

    async def _maybe_prune(self) -> None:
        self._since_prune += 1
        if self._since_prune < self.retention.prune_every:
            return
        self._since_prune = 0
        await self.prune()

    async def prune(self) -> None:
        r = self.retention
        async with self.db.transaction() as c:
            # Never drop an evaluation whose actions are still pending.
            await c.execute(
                "DELETE FROM evaluations WHERE seq <= (SELECT MAX(seq) FROM evaluations) - %s AND status = 'done'",
                (r.evaluations,),
            )
            await c.execute(
                "DELETE FROM traces_matched WHERE seq <= (SELECT MAX(seq) FROM traces_matched) - %s",
                (r.matched,),
            )
            await c.execute(
                "DELETE FROM traces_skipped WHERE seq <= (SELECT MAX(seq) FROM traces_skipped) - %s",
                (r.skipped,),
            )
            await c.execute(
                "DELETE FROM action_results WHERE seq <= (SELECT MAX(seq) FROM action_results) - %s",
                (r.action_results,),
            )


_UPSERT_ACTION = (
    "INSERT INTO action_results(idempotency_key, ok, result_id, error) VALUES (%s, %s, %s, %s)"
    " ON CONFLICT (idempotency_key) DO UPDATE SET ok = excluded.ok, result_id = excluded.result_id,"
    " error = excluded.error"
)


# flynn db import / export ----------------------------------------------------------------------

_SQLITE_FILE = "reactions/reactions.db"

TABLES = (
    Table(
        "evaluations",
        ("seq", "event_id", "time", "revision", "event_type", "session_key", "status", "event", "traces"),
        json=("traces",),
        compact_json=("traces",),
        serial="seq",
    ),
    Table(
        "traces_matched",
        (
            "seq",
            "trace_id",
            "event_id",
            "rule_id",
            "matched",
            "reason",
            "detail",
            "actions",
            "time",
            "event_type",
            "session_key",
            "false_positive",
            "fp_reason",
        ),
        json=("actions",),
        flags=("matched", "false_positive"),
        serial="seq",
    ),  # fmt: skip
    Table(
        "traces_skipped",
        ("seq", "trace_id", "event_id", "rule_id", "reason", "detail", "time", "event_type", "session_key"),
        serial="seq",
    ),
    Table(
        "action_results",
        ("seq", "idempotency_key", "ok", "result_id", "error"),
        flags=("ok",),
        serial="seq",
        sqlite_exprs=(("seq", "rowid"),),
    ),
    Table("fire_state", ("rule_id", "key", "last", "window"), json=("window",)),
    Table("rule_fires", ("rule_id", "fire_count", "last_fire")),
    Table("counters", ("rule_id", "reason", "count")),
    Table("cursors", ("name", "value")),
)


async def import_sqlite(src: SqliteSource, db: Database) -> Counts:
    with src.open(_SQLITE_FILE) as lite:
        return await import_tables(lite, db, TABLES)


async def export_sqlite(db: Database, dest: Path) -> Counts:
    store = SqliteReactionStore(dest / "reactions")
    try:
        return await export_tables(db, store.db, TABLES)
    finally:
        await store.close()


COPIER = StoreCopier(
    service="reactions",
    schema=SCHEMA,
    migrations=MIGRATIONS,
    sqlite_files=(_SQLITE_FILE,),
    import_sqlite=import_sqlite,
    export_sqlite=export_sqlite,
    nonempty_query="SELECT (SELECT count(*) FROM evaluations) + (SELECT count(*) FROM cursors)",
)
