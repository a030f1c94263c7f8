"""Fills for bench/state_growth: rows written straight into each service's own store, as it writes them.

The schemas are the services' own (each service is started once on the empty store first, which
creates its tables or runs its migrations), the rows are the ones the services write:

- run control (queue_svc): per session one completed run, its message, its final reply and
  `events / sessions` run events (serialized RunEvents, numbered like the store numbers them), and
  on PostgreSQL its released lease;
- config (config_svc): revisions 2..N after the seed, each the seed with `server.queue.cap` changed,
  with the head row following (PostgreSQL);
- canvas (nodes_svc): N artifacts of `size` bytes, one version each: on SQLite a blob file per
  version under canvas/blobs plus its index row, on PostgreSQL the bytea row; the total follows.

PostgreSQL is filled with COPY and then VACUUM ANALYZEd, as an operator does after a bulk restore
(docs/operations/DATABASE.md), and checkpointed, so the figures are those of a settled database, not
of a minute in which autovacuum and the checkpointer are still catching up with a million fresh rows.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
from flynn.v1 import config_pb2
from flynn.v1 import run_control_pb2 as pb
from psycopg import sql

Row = tuple[object, ...]

# --- run control --------------------------------------------------------------------------------

QUEUE_COLS = {
    "sessions": "session_key, channel, message_count, run_count, last_session_seq",
    "messages": "message_id, session_key, idempotency_key, channel, sender, text, mode, disposition, run_id, "
    "interrupted_run_id, effective_mode, event_seq, receive_time, causation",
    "runs": "run_id, session_key, channel, state, mode, inputs, steered, error_kind, error_message, output, "
    "final_reply_id, create_time, start_time, cancel_request_time, end_time, attempt, cancel_reason, causation",
    "events": "global_seq, session_key, session_seq, type, data",
    "replies": "reply_id, cursor, kind, run_id, session_key, channel, idempotency_key, speech_state, data",
}


def queue_rows(sessions: int, events: int) -> Iterator[tuple[str, list[Row]]]:
    """(table, rows) chunks of a filled run-control store, in insert order. Session i is `g{i}`."""
    per = max(events // max(sessions, 1), 4)
    gseq = 0
    chunk = 5000
    eff = pb.EffectiveMode(mode=config_pb2.QUEUE_MODE_FOLLOWUP).SerializeToString()
    for base in range(0, sessions, chunk):
        ses: list[Row] = []
        msgs: list[Row] = []
        runs: list[Row] = []
        evs: list[Row] = []
        reps: list[Row] = []
        for i in range(base, min(base + chunk, sessions)):
            key, run_id, mid = f"g{i}", f"run_G{i:025d}", f"msg_G{i:025d}"
            ses.append((key, "bench", 1, 1, per))
            msgs.append((mid, key, f"k{i}", "bench", "u", "hello", 2, 1, run_id, "", eff, gseq + 1, 1.0, b""))
            inputs = json.dumps([{"id": mid, "sender": "u", "text": "hello"}])
            runs.append((run_id, key, "bench", pb.RUN_STATE_COMPLETED, 2, inputs, "[]", "", "", "echo: hello",
                         "rpl_" + run_id[4:], 1.0, 1.0, None, 2.0, 1, "", b""))  # fmt: skip
            for j in range(per):
                gseq += 1
                ev = pb.RunEvent(global_seq=gseq, session_seq=j + 1, event_id=f"evt_{gseq}", session_key=key,
                                 channel="bench", run_id=run_id, type=pb.RUN_EVENT_TYPE_RUN_OUTPUT, text="x")  # fmt: skip
                evs.append((gseq, key, j + 1, int(ev.type), ev.SerializeToString()))
            reply = pb.Reply(reply_id="rpl_" + run_id[4:], kind=pb.REPLY_KIND_FINAL, run_id=run_id,
                             session_key=key, channel="bench", text="echo: hello", cursor=i + 1)  # fmt: skip
            reps.append(
                (reply.reply_id, i + 1, 1, run_id, key, "bench", "", "none", reply.SerializeToString())
            )
        yield "sessions", ses
        yield "messages", msgs
        yield "runs", runs
        yield "events", evs
        yield "replies", reps


def fill_queue_sqlite(path: Path, sessions: int, events: int) -> None:
    db = sqlite3.connect(path)
    try:
        db.execute("BEGIN")
        for table, chunk in queue_rows(sessions, events):
            marks = ", ".join("?" * len(QUEUE_COLS[table].split(",")))
            db.executemany(f"INSERT INTO {table} ({QUEUE_COLS[table]}) VALUES ({marks})", chunk)
        db.execute("COMMIT")
    finally:
        db.close()


def fill_queue_pg(conn: psycopg.Connection[Row], sessions: int, events: int) -> None:
    """The rows, plus the released lease each session leaves behind on PostgreSQL (a session that
    lived on a replica and went idle keeps its lease row, free, with its last epoch)."""
    with conn.cursor() as cur:
        for table, chunk in queue_rows(sessions, events):
            with cur.copy(f"COPY flynn_queue.{table} ({QUEUE_COLS[table]}) FROM STDIN") as copy:
                for r in chunk:
                    copy.write_row(r)
        cur.execute(
            "INSERT INTO flynn_queue.leases (scope, name, holder, address, epoch, expires_at)"
            " SELECT 'session', session_key, '', '', 2, now() FROM flynn_queue.sessions WHERE session_key LIKE 'g%'"
        )
    conn.commit()


# --- config -------------------------------------------------------------------------------------

REVISION_COLS = "revision, kind, actor, reason, create_time_ns, diff, restored_revision, config"


def revision_rows(seed: bytes, revisions: int) -> Iterator[Row]:
    """Revisions 2..`revisions` after the seed (revision 1): each changes server.queue.cap."""
    cfg = config_pb2.FlynnConfig.FromString(seed)
    now = time.time_ns()
    old = str(cfg.server.queue.cap)
    for rev in range(2, revisions + 1):
        cfg.server.queue.cap = 100 + rev
        new = str(cfg.server.queue.cap)
        diff = json.dumps([["server.queue.cap", old, new]])
        old = new
        kind = config_pb2.CONFIG_REVISION_KIND_UPDATE
        yield (rev, kind, "bench", f"bench fill {rev}", now + rev, diff, 0, cfg.SerializeToString())


def fill_config_sqlite(path: Path, revisions: int) -> None:
    db = sqlite3.connect(path)
    try:
        seed = db.execute("SELECT config FROM revisions WHERE revision = 1").fetchone()[0]
        db.execute("BEGIN")
        db.executemany(f"INSERT INTO revisions ({REVISION_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                       revision_rows(bytes(seed), revisions))  # fmt: skip
        db.execute("COMMIT")
    finally:
        db.close()


def fill_config_pg(conn: psycopg.Connection[tuple[Any, ...]], revisions: int) -> None:
    row = conn.execute("SELECT config FROM flynn_config.revisions WHERE revision = 1").fetchone()
    assert row is not None, "the config service seeds revision 1 at its first start"
    with conn.cursor() as cur:
        with cur.copy(f"COPY flynn_config.revisions ({REVISION_COLS}) FROM STDIN") as copy:
            for r in revision_rows(bytes(row[0]), revisions):
                copy.write_row(r)
        cur.execute("UPDATE flynn_config.head SET revision = GREATEST(revision, %s)", (revisions,))
    conn.commit()


# --- canvas -------------------------------------------------------------------------------------


def artifact_rows(artifacts: int, size: int) -> Iterator[tuple[Row, bytes, str]]:
    """(version row without content, content, blob path) of artifacts `fill/{i:06d}`, version 1 each."""
    now = time.time()
    for i in range(artifacts):
        name = f"fill/{i:06d}"
        content = hashlib.sha256(name.encode()).digest() * (size // 32) + b"\0" * (size % 32)
        digest = hashlib.sha256(content).hexdigest()
        key = hashlib.sha256(name.encode("utf-8")).hexdigest()[:40]
        etag = f'"v1-{digest[:16]}"'
        yield (
            (name, 1, etag, "application/octet-stream", digest, len(content), now, "bench"),
            content,
            f"{key[:2]}/{key}-1.bin",
        )


def fill_canvas_sqlite(root: Path, artifacts: int, size: int) -> None:
    """Blob files (no fsync each: a fill, not a put) and their index rows."""
    blobs = root / "blobs"
    db = sqlite3.connect(root / "index.sqlite")
    try:
        db.execute("BEGIN")
        for row, content, blob in artifact_rows(artifacts, size):
            path = blobs / blob
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
            db.execute(
                "INSERT INTO versions (name, version, etag, content_type, sha256, size, update_time, actor, blob)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (*row, blob),
            )
            db.execute("INSERT INTO artifacts (name, latest, last_version) VALUES (?, 1, 1)", (row[0],))
        db.execute("COMMIT")
    finally:
        db.close()
    os.sync()


def fill_canvas_pg(conn: psycopg.Connection[Row], artifacts: int, size: int) -> None:
    cols = "name, version, etag, content_type, sha256, size, update_time, actor, content"
    with conn.cursor() as cur:
        with (
            cur.copy(f"COPY flynn_nodes.canvas_versions ({cols}) FROM STDIN") as versions,
        ):
            for row, content, _ in artifact_rows(artifacts, size):
                versions.write_row((*row, content))
        cur.execute(
            "INSERT INTO flynn_nodes.canvas_artifacts (name, latest, last_version)"
            " SELECT name, version, version FROM flynn_nodes.canvas_versions WHERE name LIKE 'fill/%'"
        )
        cur.execute(
            "UPDATE flynn_nodes.canvas_totals SET total_bytes ="
            " (SELECT COALESCE(SUM(size), 0) FROM flynn_nodes.canvas_versions)"
        )
    conn.commit()


def settle_pg(url: str) -> None:
    """VACUUM ANALYZE every table of the services' schemas: planner statistics and visibility map of a
    settled database (what an operator runs after a bulk restore); then a CHECKPOINT, so the fill's
    hundreds of MB of dirty pages are written out before the measurement, not during it (the WAL is
    the whole server's: that I/O would stall the empty store's commits as much as the full one's)."""
    with psycopg.connect(url, autocommit=True) as conn:
        tables = conn.execute(
            "SELECT schemaname, tablename FROM pg_tables WHERE schemaname LIKE 'flynn\\_%' ORDER BY 1, 2"
        ).fetchall()
        for schema, table in tables:
            conn.execute(
                sql.SQL("VACUUM (ANALYZE) {}.{}").format(
                    sql.Identifier(str(schema)), sql.Identifier(str(table))
                )
            )
        conn.execute("CHECKPOINT")
