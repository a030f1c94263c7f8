"""Node store in PostgreSQL (schema flynn_nodes): identities, token hashes, registrations, event log.

Event sequence numbers come from the one-row `event_head` table, incremented inside the appending
transaction: its row lock serializes appenders until COMMIT, so sequence order is commit order and a
watcher reading `seq > cursor` can never skip an event that commits late (a SERIAL could).
Every method returns after its COMMIT.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import psycopg

from flynn_runtime import leases, replica_registry
from flynn_runtime.database import Database, PooledStore
from flynn_runtime.db_copy import (
    CopyError,
    Counts,
    SqliteSource,
    StoreCopier,
    Table,
    export_tables,
    import_tables,
)
from flynn_runtime.pg_migrations import Migration
from flynn_runtime.sqlite_db import transaction
from nodes_svc.canvas_store import CanvasStore
from nodes_svc.canvas_store_pg import MIGRATION as CANVAS_MIGRATION
from nodes_svc.canvas_store_pg import PUT_MIGRATION as CANVAS_PUT_MIGRATION
from nodes_svc.node_store import (
    DISCONNECTED,
    EVENT_COLS,
    SCHEMA,
    EpochConflict,
    EventRecord,
    NewEvent,
    NodeRecord,
    TokenRecord,
    event_record,
    node_params,
)
from nodes_svc.node_store_sqlite import SqliteNodeStore

NODES_MIGRATION = Migration(
    1,
    "tokens, nodes, events",
    """
    CREATE TABLE tokens (
        token_id      TEXT PRIMARY KEY,
        sha256        TEXT NOT NULL UNIQUE,
        node_id       TEXT NOT NULL,
        role          TEXT NOT NULL,
        description   TEXT NOT NULL DEFAULT '',
        created       DOUBLE PRECISION NOT NULL,
        revoked       DOUBLE PRECISION,
        revoke_reason TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX tokens_node ON tokens(node_id);
    CREATE TABLE nodes (
        node_id          TEXT COLLATE "C" PRIMARY KEY,
        role             TEXT NOT NULL,
        capabilities     JSONB NOT NULL,
        epoch            BIGINT NOT NULL,
        online           BOOLEAN NOT NULL,
        last_seen        DOUBLE PRECISION NOT NULL,
        connect_time     DOUBLE PRECISION NOT NULL,
        reconnect_count  BIGINT NOT NULL,
        protocol_version INTEGER NOT NULL,
        display_name     TEXT NOT NULL,
        platform         TEXT NOT NULL,
        offline_reason   TEXT NOT NULL DEFAULT '',
        token_id         TEXT NOT NULL DEFAULT ''
    );
    CREATE TABLE events (
        seq           BIGINT PRIMARY KEY,
        type          INTEGER NOT NULL,
        node_id       TEXT NOT NULL,
        role          TEXT NOT NULL,
        epoch         BIGINT NOT NULL,
        reason        TEXT NOT NULL,
        artifact_name TEXT NOT NULL,
        time          DOUBLE PRECISION NOT NULL
    );
    CREATE TABLE event_head (
        id  BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (id),
        seq BIGINT NOT NULL
    );
    INSERT INTO event_head (id, seq) VALUES (TRUE, 0);
    """,
)

PRESENCE_MIGRATION = Migration(
    3,
    "presence across replicas: node owner, replica leases, epoch notifications",
    """
    ALTER TABLE nodes ADD COLUMN owner TEXT NOT NULL DEFAULT '';
    ALTER TABLE nodes ADD COLUMN owner_address TEXT NOT NULL DEFAULT '';
    CREATE INDEX nodes_online_owner ON nodes(owner) WHERE online;
    """
    + leases.MIGRATION_SQL
    + """
    CREATE FUNCTION notify_presence() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM pg_notify('flynn_nodes_presence', NEW.node_id);
        RETURN NULL;
    END $$;
    CREATE TRIGGER nodes_presence_notify AFTER UPDATE OF epoch ON nodes
        FOR EACH ROW WHEN (OLD.epoch IS DISTINCT FROM NEW.epoch) EXECUTE FUNCTION notify_presence();
    CREATE TRIGGER tokens_revoked_notify AFTER UPDATE OF revoked ON tokens
        FOR EACH ROW WHEN (NEW.revoked IS NOT NULL) EXECUTE FUNCTION notify_presence();
    """,
)

#: Every migration of schema flynn_nodes (nodes and canvas share the schema of their service).
REPLICAS_MIGRATION = Migration(
    5, "every replica as it knows itself, with a heartbeat", replica_registry.MIGRATION_SQL
)

MIGRATIONS = [NODES_MIGRATION, CANVAS_MIGRATION, PRESENCE_MIGRATION, CANVAS_PUT_MIGRATION, REPLICAS_MIGRATION]

_NODE_COLS = (
    "node_id, role, capabilities, epoch, online, last_seen, connect_time, reconnect_count,"
    " protocol_version, display_name, platform, offline_reason, token_id"
)
_TOKEN_COLS = "token_id, sha256, node_id, role, description, created, revoked"
Conn = psycopg.AsyncConnection[tuple[Any, ...]]


def _node(r: Sequence[Any]) -> NodeRecord:
    caps = r[2] if isinstance(r[2], list) else json.loads(r[2])
    return NodeRecord(
        node_id=r[0],
        role=r[1],
        capabilities=list(caps),
        epoch=int(r[3]),
        online=bool(r[4]),
        last_seen=float(r[5]),
        connect_time=float(r[6]),
        reconnect_count=int(r[7]),
        protocol_version=int(r[8]),
        display_name=r[9],
        platform=r[10],
        offline_reason=r[11],
        token_id=r[12],
    )


def _token(r: Sequence[Any]) -> TokenRecord:
    return TokenRecord(r[0], r[1], r[2], r[3], r[4], float(r[5]), None if r[6] is None else float(r[6]))


class PgNodeStore(PooledStore):
    def __init__(self, db: Database, owner: str = "", owner_address: str = "") -> None:
        super().__init__(db)
        #: This replica (nodes_svc/presence.py): written on each registration it accepts.
        self.owner = owner
        self.owner_address = owner_address

    # tokens -------------------------------------------------------------------------------

    async def insert_token(self, rec: TokenRecord) -> None:
        async with self.db.transaction() as c:
            await c.execute(
                "INSERT INTO tokens(token_id, sha256, node_id, role, description, created, revoked)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s)",
                (rec.token_id, rec.sha256, rec.node_id, rec.role, rec.description, rec.created, rec.revoked),
            )

    async def revoke_token(self, token_id: str, reason: str, when: float) -> TokenRecord | None:
        async with self.db.transaction() as c:
            cur = await c.execute(
                "SELECT " + _TOKEN_COLS + " FROM tokens WHERE token_id = %s FOR UPDATE", (token_id,)
            )
            row = await cur.fetchone()
            if row is None:
                return None
            if row[6] is None:
                await c.execute(
                    "UPDATE tokens SET revoked = %s, revoke_reason = %s WHERE token_id = %s",
                    (when, reason, token_id),
                )
            return _token(row)

    async def all_tokens(self) -> list[TokenRecord]:
        async with self.db.connection() as c:
            rows = await (await c.execute("SELECT " + _TOKEN_COLS + " FROM tokens")).fetchall()
        return [_token(r) for r in rows]

    async def get_token(self, sha256: str) -> TokenRecord | None:
        async with self.db.connection() as c:
            cur = await c.execute("SELECT " + _TOKEN_COLS + " FROM tokens WHERE sha256 = %s", (sha256,))
            row = await cur.fetchone()
        return _token(row) if row else None

    async def revoked_tokens(self, token_ids: Sequence[str]) -> list[str]:
        """Of these token ids, the revoked ones (a revocation through another replica)."""
        if not token_ids:
            return []
        async with self.db.connection() as c:
            cur = await c.execute(
                "SELECT token_id FROM tokens WHERE revoked IS NOT NULL AND token_id = ANY(%s::text[])",
                (list(token_ids),),
            )
            return [str(r[0]) for r in await cur.fetchall()]

    # nodes --------------------------------------------------------------------------------

    async def get_node(self, node_id: str) -> NodeRecord | None:
        async with self.db.connection() as c:
            cur = await c.execute("SELECT " + _NODE_COLS + " FROM nodes WHERE node_id = %s", (node_id,))
            row = await cur.fetchone()
        return _node(row) if row else None

    async def list_nodes(self, after: str, limit: int, online: bool | None) -> list[NodeRecord]:
        async with self.db.connection() as c:
            if online is None:
                cur = await c.execute(
                    "SELECT " + _NODE_COLS + " FROM nodes WHERE node_id > %s ORDER BY node_id LIMIT %s",
                    (after, limit),
                )
            else:
                cur = await c.execute(
                    "SELECT " + _NODE_COLS + " FROM nodes WHERE node_id > %s AND online = %s"
                    " ORDER BY node_id LIMIT %s",
                    (after, online, limit),
                )
            rows = await cur.fetchall()
        return [_node(r) for r in rows]

    async def node_ids(self) -> set[str]:
        async with self.db.connection() as c:
            rows = await (await c.execute("SELECT node_id FROM nodes")).fetchall()
        return {str(r[0]) for r in rows}

    async def save_registration(self, rec: NodeRecord, event: NewEvent) -> int:
        """Compare-and-set on the epoch: `rec.epoch` must be the stored epoch + 1 (or 1 for a new
        node), else EpochConflict (another replica registered the node since it was read)."""
        async with self.db.transaction() as c:
            cur = await c.execute("SELECT epoch FROM nodes WHERE node_id = %s FOR UPDATE", (rec.node_id,))
            row = await cur.fetchone()
            current = int(row[0]) if row else 0
            if rec.epoch != current + 1:
                raise EpochConflict(rec.node_id, current)
            await self._upsert(c, rec)
            await c.execute(
                "UPDATE nodes SET owner = %s, owner_address = %s WHERE node_id = %s",
                (self.owner, self.owner_address, rec.node_id),
            )
            return await self._append(c, event)

    @staticmethod
    async def _upsert(c: Conn, rec: NodeRecord) -> None:
        await c.execute(
            "INSERT INTO nodes(" + _NODE_COLS + ")"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
            " ON CONFLICT (node_id) DO UPDATE SET role = excluded.role, capabilities = excluded.capabilities,"
            " epoch = excluded.epoch, online = excluded.online, last_seen = excluded.last_seen,"
            " connect_time = excluded.connect_time, reconnect_count = excluded.reconnect_count,"
            " protocol_version = excluded.protocol_version, display_name = excluded.display_name,"
            " platform = excluded.platform, offline_reason = excluded.offline_reason, token_id = excluded.token_id",
            node_params(rec),
        )

    async def mark_offline(
        self, node_id: str, epoch: int, reason: str, last_seen: float, event: NewEvent | None
    ) -> int:
        async with self.db.transaction() as c:
            cur = await c.execute(
                "UPDATE nodes SET online = FALSE, offline_reason = %s, last_seen = GREATEST(last_seen, %s)"
                " WHERE node_id = %s AND epoch = %s",
                (reason, last_seen, node_id, epoch),
            )
            if cur.rowcount == 0 or event is None:
                return 0
            return await self._append(c, event)

    async def mark_all_offline(self, reason: str) -> list[NodeRecord]:
        """At start-up: nodes left online by a replica that is gone (its liveness lease expired, or
        it had this replica's address: the previous process here), never another live replica's."""
        async with self.db.transaction() as c:
            cur = await c.execute(
                "UPDATE nodes n SET online = FALSE, offline_reason = %s WHERE n.online AND ("
                " (n.owner_address <> '' AND n.owner_address = %s) OR NOT EXISTS ("
                " SELECT 1 FROM leases l WHERE l.scope = 'replica' AND l.name = n.owner"
                " AND l.holder = n.owner AND l.expires_at > now())) RETURNING " + _NODE_COLS,
                (reason, self.owner_address),
            )
            rows = [_node(r) for r in await cur.fetchall()]
            now = time.time()
            for r in sorted(rows, key=lambda n: n.node_id):
                await self._append(c, NewEvent(DISCONNECTED, r.node_id, r.role, r.epoch, reason, "", now))
            return rows

    async def mark_owners_offline(self, owners: Sequence[str], reason: str) -> list[NodeRecord]:
        """Nodes whose owning replica died: offline, with a DISCONNECTED event each."""
        if not owners:
            return []
        async with self.db.transaction() as c:
            cur = await c.execute(
                "UPDATE nodes SET online = FALSE, offline_reason = %s WHERE online AND owner = ANY(%s::text[])"
                " RETURNING " + _NODE_COLS,
                (reason, list(owners)),
            )
            rows = [_node(r) for r in await cur.fetchall()]
            now = time.time()
            for r in sorted(rows, key=lambda n: n.node_id):
                await self._append(c, NewEvent(DISCONNECTED, r.node_id, r.role, r.epoch, reason, "", now))
            return rows

    async def touch_many(self, seen: Iterable[tuple[str, float]]) -> None:
        items = [(t, n) for n, t in seen]
        if not items:
            return
        async with self.db.transaction() as c:
            async with c.cursor() as cur:
                await cur.executemany(
                    "UPDATE nodes SET last_seen = GREATEST(last_seen, %s) WHERE node_id = %s", items
                )

    async def upsert_exact(self, rec: NodeRecord) -> None:
        """Copy one node row as it is (flynn db import)."""
        async with self.db.transaction() as c:
            await self._upsert(c, rec)

    # events -------------------------------------------------------------------------------

    @staticmethod
    async def _append(c: Conn, e: NewEvent, seq: int = 0) -> int:
        if seq:
            await c.execute("UPDATE event_head SET seq = GREATEST(seq, %s)", (seq,))
        else:
            row = await (await c.execute("UPDATE event_head SET seq = seq + 1 RETURNING seq")).fetchone()
            assert row is not None
            seq = int(row[0])
        await c.execute(
            "INSERT INTO events(seq, type, node_id, role, epoch, reason, artifact_name, time)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
            (seq, e.type, e.node_id, e.role, e.epoch, e.reason, e.artifact_name, e.time),
        )
        return seq

    async def append_event(self, e: NewEvent) -> int:
        # One statement, its own transaction: one round trip (every canvas put and presence change
        # appends one). The head row's lock serializes appenders, so numbers stay gapless and ordered.
        async with self.db.connection() as c:
            cur = await c.execute(
                "WITH h AS (UPDATE event_head SET seq = seq + 1 RETURNING seq)"
                " INSERT INTO events(seq, type, node_id, role, epoch, reason, artifact_name, time)"
                " SELECT h.seq, %s, %s, %s, %s, %s, %s, %s FROM h RETURNING seq",
                (e.type, e.node_id, e.role, e.epoch, e.reason, e.artifact_name, e.time),
            )
            row = await cur.fetchone()
        assert row is not None
        return int(row[0])

    async def insert_event_exact(self, r: EventRecord) -> None:
        """Copy one event with its seq (flynn db import)."""
        async with self.db.transaction() as c:
            await self._append(
                c, NewEvent(r.type, r.node_id, r.role, r.epoch, r.reason, r.artifact_name, r.time), r.seq
            )

    async def events_after(self, after_seq: int, limit: int) -> list[EventRecord]:
        async with self.db.connection() as c:
            cur = await c.execute(
                "SELECT " + EVENT_COLS + " FROM events WHERE seq > %s ORDER BY seq LIMIT %s",
                (after_seq, limit),
            )
            rows = await cur.fetchall()
        return [event_record(r) for r in rows]

    async def last_seq(self) -> int:
        return await self.db.read_int("SELECT seq FROM event_head")

    async def prune_events(self, keep: int) -> int:
        async with self.db.transaction() as c:
            cur = await c.execute(
                "DELETE FROM events WHERE seq <= (SELECT seq FROM event_head) - %s", (keep,)
            )
            return cur.rowcount


# flynn db import / export (nodes and canvas: both live in schema flynn_nodes) -------------------

_NODES_FILE = "nodes/nodes.sqlite"
_CANVAS_DIR = "canvas"

NODE_TABLES = (
    Table(
        "tokens",
        ("token_id", "sha256", "node_id", "role", "description", "created", "revoked", "revoke_reason"),
    ),
    Table(
        "nodes",
        (
            "node_id",
            "role",
            "capabilities",
            "epoch",
            "online",
            "last_seen",
            "connect_time",
            "reconnect_count",
            "protocol_version",
            "display_name",
            "platform",
            "offline_reason",
            "token_id",
        ),
        json=("capabilities",),
        flags=("online",),
    ),  # fmt: skip
    Table("events", ("seq", "type", "node_id", "role", "epoch", "reason", "artifact_name", "time")),
)

_VERSION_COLS = ("name", "version", "etag", "content_type", "sha256", "size", "update_time", "actor")


async def import_sqlite(src: SqliteSource, db: Database) -> Counts:
    with src.open(_NODES_FILE) as lite:
        counts = await import_tables(lite, db, NODE_TABLES)
    async with db.transaction() as c:
        await c.execute("UPDATE event_head SET seq = COALESCE((SELECT MAX(seq) FROM events), 0)")
    canvas_index = src.path(_CANVAS_DIR) / "index.sqlite"
    if not canvas_index.exists():
        return {**counts, "artifact_versions": 0}
    blobs = src.path(_CANVAS_DIR) / "blobs"
    with src.open(f"{_CANVAS_DIR}/index.sqlite") as lite:
        artifacts = lite.execute("SELECT name, latest, last_version FROM artifacts").fetchall()
        versions = lite.execute("SELECT " + ", ".join(_VERSION_COLS) + ", blob FROM versions").fetchall()
    rows = []
    total = 0
    for v in versions:
        content = (blobs / v[8]).read_bytes()
        if hashlib.sha256(content).hexdigest() != v[4]:
            raise CopyError(f"canvas artifact {v[0]!r} version {v[1]}: blob {v[8]} fails its sha256")
        rows.append((*v[:8], content))
        total += int(v[5])
    async with db.transaction() as c, c.cursor() as cur:
        if artifacts:
            await cur.executemany(
                "INSERT INTO canvas_artifacts(name, latest, last_version) VALUES (%s, %s, %s)", artifacts
            )
        if rows:
            await cur.executemany(
                "INSERT INTO canvas_versions(name, version, etag, content_type, sha256, size, update_time, actor,"
                " content) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
                rows,
            )
        await cur.execute("UPDATE canvas_totals SET total_bytes = %s", (total,))
    return {**counts, "artifacts": len(artifacts), "artifact_versions": len(rows)}


async def export_sqlite(db: Database, dest: Path) -> Counts:
    store = SqliteNodeStore(dest / _NODES_FILE)
    try:
        counts = await export_tables(db, store._db, NODE_TABLES)
    finally:
        await store.close()
    async with db.connection() as c:
        artifacts = await (
            await c.execute("SELECT name, latest, last_version FROM canvas_artifacts")
        ).fetchall()
        versions = await (
            await c.execute("SELECT " + ", ".join(_VERSION_COLS) + ", content FROM canvas_versions")
        ).fetchall()
    canvas = CanvasStore(dest / _CANVAS_DIR)
    try:
        rows = []
        for v in versions:
            key = hashlib.sha256(str(v[0]).encode("utf-8")).hexdigest()[:40]
            blob = f"{key[:2]}/{key}-{v[1]}.bin"
            canvas._write_blob(blob, bytes(v[8]))
            rows.append((*v[:8], blob))
        with transaction(canvas._db):
            canvas._db.executemany(
                "INSERT INTO artifacts(name, latest, last_version) VALUES (?, ?, ?)", artifacts
            )
            canvas._db.executemany(
                "INSERT INTO versions(name, version, etag, content_type, sha256, size, update_time, actor, blob)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
    finally:
        canvas.close()
    return {**counts, "artifacts": len(artifacts), "artifact_versions": len(versions)}


COPIER = StoreCopier(
    service="nodes",
    schema=SCHEMA,
    migrations=MIGRATIONS,
    sqlite_files=(_NODES_FILE, f"{_CANVAS_DIR}/index.sqlite"),
    import_sqlite=import_sqlite,
    export_sqlite=export_sqlite,
    nonempty_query="SELECT (SELECT count(*) FROM tokens) + (SELECT count(*) FROM nodes)"
    " + (SELECT count(*) FROM canvas_artifacts)",
)
