"""Node store in SQLite: identities, token hashes, registrations and the node event log.

Lives at <data_dir>/nodes/nodes.sqlite (WAL). Presence writes run with synchronous=NORMAL: in WAL
mode that survives a process crash (kill -9), which is what presence needs; token issue/revoke
switch to synchronous=FULL for their commit because an issued or revoked token must survive power
loss too. Heartbeats never write here: last_seen is flushed in batches (`touch_many`).

The methods are `async` to match the PostgreSQL backend (node_store.NodeStore); SQLite calls run
inline on the event loop as before (local file, no network round trip).
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from flynn_runtime.sqlite_db import open_db, transaction
from nodes_svc import node_store
from nodes_svc.node_store import EventRecord, NewEvent, NodeRecord, TokenRecord

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tokens (
    token_id TEXT PRIMARY KEY,
    sha256 TEXT NOT NULL UNIQUE,
    node_id TEXT NOT NULL,
    role TEXT NOT NULL,
    description TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL,
    revoked REAL,
    revoke_reason TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS tokens_node ON tokens(node_id);
CREATE TABLE IF NOT EXISTS nodes (
    node_id TEXT PRIMARY KEY,
    role TEXT NOT NULL,
    capabilities TEXT NOT NULL,
    epoch INTEGER NOT NULL,
    online INTEGER NOT NULL,
    last_seen REAL NOT NULL,
    connect_time REAL NOT NULL,
    reconnect_count INTEGER NOT NULL,
    protocol_version INTEGER NOT NULL,
    display_name TEXT NOT NULL,
    platform TEXT NOT NULL,
    offline_reason TEXT NOT NULL DEFAULT '',
    token_id TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    type INTEGER NOT NULL,
    node_id TEXT NOT NULL,
    role TEXT NOT NULL,
    epoch INTEGER NOT NULL,
    reason TEXT NOT NULL,
    artifact_name TEXT NOT NULL,
    time REAL NOT NULL
);
"""


def _node(row: sqlite3.Row) -> NodeRecord:
    return NodeRecord(
        node_id=row["node_id"],
        role=row["role"],
        capabilities=json.loads(row["capabilities"]),
        epoch=row["epoch"],
        online=bool(row["online"]),
        last_seen=row["last_seen"],
        connect_time=row["connect_time"],
        reconnect_count=row["reconnect_count"],
        protocol_version=row["protocol_version"],
        display_name=row["display_name"],
        platform=row["platform"],
        offline_reason=row["offline_reason"],
        token_id=row["token_id"],
    )


def _token(row: sqlite3.Row) -> TokenRecord:
    return TokenRecord(
        row["token_id"],
        row["sha256"],
        row["node_id"],
        row["role"],
        row["description"],
        row["created"],
        row["revoked"],
    )


class SqliteNodeStore:
    """All SQL of the nodes registry; callers hold the event loop, so calls are serialized."""

    def __init__(self, path: Path) -> None:
        self.path = path
        # NORMAL by default (presence bookkeeping); token issue/revoke commit with durable=True.
        self._db = open_db(path, synchronous="NORMAL", rows=True, schema=_SCHEMA)

    async def close(self) -> None:
        self._db.close()

    @contextmanager
    def _tx(self, durable: bool = False) -> Iterator[sqlite3.Connection]:
        if durable:
            self._db.execute("PRAGMA synchronous=FULL")
        try:
            with transaction(self._db) as db:
                yield db
        finally:
            if durable:
                self._db.execute("PRAGMA synchronous=NORMAL")

    # tokens -------------------------------------------------------------------------------

    async def insert_token(self, rec: TokenRecord) -> None:
        with self._tx(durable=True) as db:
            db.execute(
                "INSERT INTO tokens(token_id, sha256, node_id, role, description, created) VALUES (?,?,?,?,?,?)",
                (rec.token_id, rec.sha256, rec.node_id, rec.role, rec.description, rec.created),
            )

    async def revoke_token(self, token_id: str, reason: str, when: float) -> TokenRecord | None:
        """Revoke; returns the record as it was before (None when unknown)."""
        with self._tx(durable=True) as db:
            row = db.execute("SELECT * FROM tokens WHERE token_id=?", (token_id,)).fetchone()
            if row is None:
                return None
            if row["revoked"] is None:
                db.execute(
                    "UPDATE tokens SET revoked=?, revoke_reason=? WHERE token_id=?", (when, reason, token_id)
                )
            return _token(row)

    async def all_tokens(self) -> list[TokenRecord]:
        return [_token(r) for r in self._db.execute("SELECT * FROM tokens")]

    async def get_token(self, sha256: str) -> TokenRecord | None:
        row = self._db.execute("SELECT * FROM tokens WHERE sha256=?", (sha256,)).fetchone()
        return _token(row) if row else None

    # nodes --------------------------------------------------------------------------------

    async def get_node(self, node_id: str) -> NodeRecord | None:
        row = self._db.execute("SELECT * FROM nodes WHERE node_id=?", (node_id,)).fetchone()
        return _node(row) if row else None

    async def list_nodes(self, after: str, limit: int, online: bool | None) -> list[NodeRecord]:
        if online is None:
            rows = self._db.execute(
                "SELECT * FROM nodes WHERE node_id > ? ORDER BY node_id LIMIT ?", (after, limit)
            )
        else:
            rows = self._db.execute(
                "SELECT * FROM nodes WHERE node_id > ? AND online=? ORDER BY node_id LIMIT ?",
                (after, int(online), limit),
            )
        return [_node(r) for r in rows]

    async def node_ids(self) -> set[str]:
        return {r[0] for r in self._db.execute("SELECT node_id FROM nodes")}

    async def save_registration(self, rec: NodeRecord, event: NewEvent) -> int:
        """Upsert the node row and append its event in one transaction; returns the event seq."""
        with self._tx() as db:
            db.execute(
                "INSERT INTO nodes(node_id, role, capabilities, epoch, online, last_seen, connect_time,"
                " reconnect_count, protocol_version, display_name, platform, offline_reason, token_id)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)"
                " ON CONFLICT(node_id) DO UPDATE SET role=excluded.role, capabilities=excluded.capabilities,"
                " epoch=excluded.epoch, online=excluded.online, last_seen=excluded.last_seen,"
                " connect_time=excluded.connect_time, reconnect_count=excluded.reconnect_count,"
                " protocol_version=excluded.protocol_version, display_name=excluded.display_name,"
                " platform=excluded.platform, offline_reason=excluded.offline_reason, token_id=excluded.token_id",
                node_store.node_params(rec),
            )
            return self._append(db, event)

    async def mark_offline(
        self, node_id: str, epoch: int, reason: str, last_seen: float, event: NewEvent | None
    ) -> int:
        """Mark a node offline if it is still at `epoch`; returns the event seq (0 when none was written)."""
        with self._tx() as db:
            cur = db.execute(
                "UPDATE nodes SET online=0, offline_reason=?, last_seen=MAX(last_seen, ?) WHERE node_id=? AND epoch=?",
                (reason, last_seen, node_id, epoch),
            )
            if cur.rowcount == 0 or event is None:
                return 0
            return self._append(db, event)

    async def mark_all_offline(self, reason: str) -> list[NodeRecord]:
        """On start: nodes a previous process left online are offline now; returns them."""
        with self._tx() as db:
            rows = [_node(r) for r in db.execute("SELECT * FROM nodes WHERE online=1")]
            db.execute("UPDATE nodes SET online=0, offline_reason=? WHERE online=1", (reason,))
            now = time.time()
            for r in rows:
                self._append(
                    db, NewEvent(node_store.DISCONNECTED, r.node_id, r.role, r.epoch, reason, "", now)
                )
            return rows

    async def touch_many(self, seen: Iterable[tuple[str, float]]) -> None:
        """Batch update of last_seen (one transaction for all nodes heard from since the last flush)."""
        items = [(t, n) for n, t in seen]
        if not items:
            return
        with self._tx() as db:
            db.executemany("UPDATE nodes SET last_seen=MAX(last_seen, ?) WHERE node_id=?", items)

    # events -------------------------------------------------------------------------------

    @staticmethod
    def _append(db: sqlite3.Connection, e: NewEvent) -> int:
        cur = db.execute(
            "INSERT INTO events(type, node_id, role, epoch, reason, artifact_name, time) VALUES (?,?,?,?,?,?,?)",
            (e.type, e.node_id, e.role, e.epoch, e.reason, e.artifact_name, e.time),
        )
        return int(cur.lastrowid or 0)

    async def append_event(self, e: NewEvent) -> int:
        with self._tx() as db:
            return self._append(db, e)

    async def events_after(self, after_seq: int, limit: int) -> list[EventRecord]:
        rows = self._db.execute(
            f"SELECT {node_store.EVENT_COLS} FROM events WHERE seq > ? ORDER BY seq LIMIT ?",
            (after_seq, limit),
        )
        return [node_store.event_record(r) for r in rows]

    async def last_seq(self) -> int:
        row = self._db.execute("SELECT MAX(seq) FROM events").fetchone()
        return int(row[0] or 0)

    async def prune_events(self, keep: int) -> int:
        """Keep the newest `keep` events (AUTOINCREMENT keeps seq increasing after deletes)."""
        with self._tx() as db:
            cur = db.execute("DELETE FROM events WHERE seq <= (SELECT MAX(seq) FROM events) - ?", (keep,))
            return cur.rowcount
