"""Canvas artifacts in PostgreSQL (schema flynn_nodes): content in bytea, no shared volume needed.

Same contract as the SQLite + files store (canvas_store.py): versions are never reused (last_version
survives deletes), the newest `max_versions` versions of a name are kept, `max_artifact_bytes` and
`max_total_bytes` are enforced, etags are compare-and-set. Every write takes the row lock of the
one-row `canvas_totals` table first, so puts and deletes from any number of callers or replicas are
serialized there and the total stays exact. A put is one statement, `canvas_put` (PUT_MIGRATION): one
round trip, its own transaction. The call returns after COMMIT (an ack means committed).
Reads verify the sha256 of what they return.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from typing import Any

from flynn.v1 import nodes_pb2

from flynn_runtime import errors
from flynn_runtime.database import Database, PooledStore
from flynn_runtime.errors import Code, FlynnError
from flynn_runtime.pg_migrations import Migration
from nodes_svc.canvas_store import (
    ArtifactMeta,
    CanvasLimits,
    _mismatch,
    canvas_full,
    check_restorable,
    check_size,
    make_etag,
    prefix_end,
)

MIGRATION = Migration(
    2,
    "canvas artifacts",
    """
    CREATE TABLE canvas_artifacts (
        name         TEXT COLLATE "C" PRIMARY KEY,  -- byte order, as in SQLite (paging by name)
        latest       BIGINT NOT NULL,   -- 0 when deleted
        last_version BIGINT NOT NULL    -- survives deletes, so versions (and etags) are never reused
    );
    CREATE TABLE canvas_versions (
        name         TEXT COLLATE "C" NOT NULL,
        version      BIGINT NOT NULL,
        etag         TEXT   NOT NULL,
        content_type TEXT   NOT NULL,
        sha256       TEXT   NOT NULL,
        size         BIGINT NOT NULL,
        update_time  DOUBLE PRECISION NOT NULL,
        actor        TEXT   NOT NULL,
        content      BYTEA  NOT NULL,
        PRIMARY KEY (name, version)
    );
    CREATE TABLE canvas_totals (
        id          BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (id),
        total_bytes BIGINT NOT NULL
    );
    INSERT INTO canvas_totals (id, total_bytes) VALUES (TRUE, 0);
    """,
)

#: A put as ONE statement (one round trip, its own transaction): the lock, the read, the checks, the
#: writes and the nodes event of the change (CANVAS_CHANGED, so that a put costs one WAL flush, and
#: its event is durable with it) run inside the server. Locks: canvas_totals, then event_head. In READ COMMITTED each statement of a (VOLATILE) PL/pgSQL function
#: takes a new snapshot, so the read after the lock sees every put committed before the lock was
#: granted, exactly as the two pipelined batches did before. A refused put (etag, restore, full)
#: writes nothing and says why in `o_outcome`. The etag is `make_etag` (canvas_store.py) in SQL.
PUT_MIGRATION = Migration(
    4,
    "canvas put in one statement (one round trip)",
    """
    CREATE FUNCTION canvas_put(
        p_name TEXT, p_content_type TEXT, p_content BYTEA, p_sha256 TEXT, p_etag TEXT, p_actor TEXT,
        p_restore_version BIGINT, p_keep BIGINT, p_max_total BIGINT, p_update_time DOUBLE PRECISION,
        p_event_type INTEGER,
        OUT o_outcome TEXT, OUT o_version BIGINT, OUT o_etag TEXT, OUT o_current_etag TEXT,
        OUT o_total BIGINT, OUT o_latest BIGINT, OUT o_event_seq BIGINT
    ) LANGUAGE plpgsql AS $$
    DECLARE
        v_last BIGINT;
        v_freed BIGINT;
        v_size BIGINT := octet_length(p_content);
    BEGIN
        SELECT t.total_bytes INTO o_total FROM canvas_totals t FOR UPDATE;
        SELECT a.last_version, a.latest, v.etag INTO v_last, o_latest, o_current_etag
          FROM canvas_artifacts a LEFT JOIN canvas_versions v ON v.name = a.name AND v.version = a.latest
         WHERE a.name = p_name;
        v_last := COALESCE(v_last, 0);
        o_latest := COALESCE(o_latest, 0);
        o_current_etag := COALESCE(o_current_etag, '');
        IF (p_etag = '*' AND o_current_etag <> '') OR (p_etag NOT IN ('', '*') AND p_etag <> o_current_etag) THEN
            o_outcome := 'ETAG_MISMATCH';
            RETURN;
        END IF;
        o_version := v_last + 1;
        IF p_restore_version > 0 THEN
            IF o_latest > 0 AND o_latest >= p_restore_version THEN
                o_outcome := 'VERSION_NOT_RESTORABLE';
                RETURN;
            END IF;
            o_version := p_restore_version;
        END IF;
        SELECT COALESCE(SUM(o.size), 0) INTO v_freed FROM canvas_versions o
         WHERE o.name = p_name AND o.version <= o_version - p_keep;
        IF o_total - v_freed + v_size > p_max_total THEN
            o_outcome := 'CANVAS_FULL';
            RETURN;
        END IF;
        o_etag := '"v' || o_version || '-' || left(p_sha256, 16) || '"';
        DELETE FROM canvas_versions o WHERE o.name = p_name AND o.version <= o_version - p_keep;
        INSERT INTO canvas_versions (name, version, etag, content_type, sha256, size, update_time, actor, content)
        VALUES (p_name, o_version, o_etag, p_content_type, p_sha256, v_size, p_update_time, p_actor, p_content);
        INSERT INTO canvas_artifacts AS a (name, latest, last_version) VALUES (p_name, o_version, o_version)
            ON CONFLICT (name) DO UPDATE SET latest = excluded.latest,
                last_version = GREATEST(a.last_version, excluded.last_version);
        o_total := o_total - v_freed + v_size;
        UPDATE canvas_totals SET total_bytes = o_total;
        -- The nodes event of the change, in the same transaction (one WAL flush for both).
        UPDATE event_head SET seq = seq + 1 RETURNING seq INTO o_event_seq;
        INSERT INTO events (seq, type, node_id, role, epoch, reason, artifact_name, time)
        VALUES (o_event_seq, p_event_type, '', '', 0, 'put', p_name, p_update_time);
        o_outcome := 'OK';
    END $$;
    """,
)

CANVAS_CHANGED = nodes_pb2.NODE_EVENT_TYPE_CANVAS_CHANGED

_COLS = "v.name, v.version, v.etag, v.content_type, v.sha256, v.size, v.update_time, v.actor"


_LIST = (
    "SELECT "
    + _COLS
    + " FROM canvas_artifacts a JOIN canvas_versions v ON v.name = a.name AND v.version = a.latest"
    " WHERE a.latest > 0 AND a.name > %s AND a.name >= %s"
)


def _meta(r: Sequence[Any]) -> ArtifactMeta:
    return ArtifactMeta(
        str(r[0]), int(r[1]), str(r[2]), str(r[3]), str(r[4]), int(r[5]), float(r[6]), str(r[7]), ""
    )


class PgCanvasStore(PooledStore):
    #: Puts and deletes append their nodes event (CANVAS_CHANGED) in their own transaction.
    records_events = True

    def __init__(self, db: Database, limits: CanvasLimits | None = None) -> None:
        super().__init__(db)
        self.limits = limits or CanvasLimits()
        self._total = 0

    @property
    def total_bytes(self) -> int:
        """As of this process's last read or write (metrics); the database row is the truth."""
        return self._total

    async def recover(self) -> dict[str, int]:
        self._total = await self.db.read_int("SELECT total_bytes FROM canvas_totals")
        return {"temp_files_removed": 0, "orphan_blobs_removed": 0, "missing_blobs": 0}

    async def get(self, name: str, version: int = 0) -> tuple[ArtifactMeta, bytes]:
        async with self.db.connection() as c:
            if version:
                cur = await c.execute(
                    "SELECT "
                    + _COLS
                    + ", v.content FROM canvas_versions v WHERE v.name = %s AND v.version = %s",
                    (name, version),
                )
            else:
                cur = await c.execute(
                    "SELECT " + _COLS + ", v.content FROM canvas_artifacts a JOIN canvas_versions v"
                    " ON v.name = a.name AND v.version = a.latest WHERE a.name = %s",
                    (name,),
                )
            row = await cur.fetchone()
        if row is None:
            what = f"{name}@{version}" if version else name
            raise errors.not_found("artifact", what, reason="ARTIFACT_NOT_FOUND")
        meta, content = _meta(row), bytes(row[8])
        if hashlib.sha256(content).hexdigest() != meta.sha256:
            raise FlynnError(
                Code.INTERNAL,
                f"artifact {name!r} version {meta.version} failed its checksum",
                reason="DATA_LOSS",
            )
        return meta, content

    async def list_latest(self, prefix: str, after: str, limit: int) -> list[ArtifactMeta]:
        async with self.db.connection() as c:
            # An index range (prefix <= name < prefix_end), so a page costs `limit` rows, not a scan of
            # every name (the planner cannot bound a filter on left(name, n)).
            end = prefix_end(prefix)
            if end:
                cur = await c.execute(
                    _LIST + " AND a.name < %s ORDER BY a.name LIMIT %s", (after, prefix, end, limit)
                )
            else:
                cur = await c.execute(_LIST + " ORDER BY a.name LIMIT %s", (after, prefix, limit))
            rows = await cur.fetchall()
        return [_meta(r) for r in rows]

    async def put(
        self, name: str, content_type: str, content: bytes, etag: str, actor: str, restore_version: int = 0
    ) -> ArtifactMeta:
        """Write the next version, or (restore_version > 0) that exact version, which must be above every
        version of the name still kept (an archive brought back after a purge)."""
        lim = self.limits
        check_size(content, lim)
        digest = hashlib.sha256(content).hexdigest()
        now = time.time()
        async with self.db.connection() as c:
            cur = await c.execute(
                "SELECT o_outcome, o_version, o_etag, o_current_etag, o_total, o_latest FROM"
                " canvas_put(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                (name, content_type, content, digest, etag, actor, restore_version,
                 lim.max_versions, lim.max_total_bytes, now, CANVAS_CHANGED),
            )  # fmt: skip
            row = await cur.fetchone()
        assert row is not None
        outcome, version, total = str(row[0]), int(row[1] or 0), int(row[4])
        if outcome == "ETAG_MISMATCH":
            raise _mismatch(name, str(row[3]), etag)
        if outcome == "VERSION_NOT_RESTORABLE":
            check_restorable(name, int(row[5]), restore_version)
        if outcome == "CANVAS_FULL":
            raise canvas_full(total, lim)
        meta = ArtifactMeta(name, version, str(row[2]), content_type, digest, len(content), now, actor, "")
        assert meta.etag == make_etag(digest, version), "canvas_put and make_etag disagree"
        self._total = total
        return meta

    async def delete(self, name: str, etag: str) -> int:
        async with self.db.transaction() as c:
            row = await (await c.execute("SELECT total_bytes FROM canvas_totals FOR UPDATE")).fetchone()
            total = int(row[0]) if row else 0
            cur = await c.execute(
                "SELECT v.etag FROM canvas_artifacts a JOIN canvas_versions v"
                " ON v.name = a.name AND v.version = a.latest WHERE a.name = %s",
                (name,),
            )
            found = await cur.fetchone()
            if found is None:
                raise errors.not_found("artifact", name, reason="ARTIFACT_NOT_FOUND")
            if etag and etag != str(found[0]):
                raise _mismatch(name, str(found[0]), etag)
            cur = await c.execute("DELETE FROM canvas_versions WHERE name = %s RETURNING size", (name,))
            sizes = [int(r[0]) for r in await cur.fetchall()]
            await c.execute("UPDATE canvas_artifacts SET latest = 0 WHERE name = %s", (name,))
            new_total = total - sum(sizes)
            await c.execute("UPDATE canvas_totals SET total_bytes = %s", (new_total,))
            await c.execute(
                "WITH h AS (UPDATE event_head SET seq = seq + 1 RETURNING seq)"
                " INSERT INTO events(seq, type, node_id, role, epoch, reason, artifact_name, time)"
                " SELECT h.seq, %s, '', '', 0, 'delete', %s, %s FROM h",
                (CANVAS_CHANGED, name, time.time()),
            )
        self._total = new_total
        return len(sizes)

    async def insert_exact(self, meta: ArtifactMeta, content: bytes, last_version: int, latest: int) -> None:
        """Copy one version as it is (flynn db import)."""
        async with self.db.transaction() as c:
            await c.execute(
                "INSERT INTO canvas_versions(name, version, etag, content_type, sha256, size, update_time, actor, content)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
                (
                    meta.name,
                    meta.version,
                    meta.etag,
                    meta.content_type,
                    meta.sha256,
                    meta.size,
                    meta.update_time,
                    meta.actor,
                    content,
                ),
            )
            await c.execute(
                "INSERT INTO canvas_artifacts(name, latest, last_version) VALUES (%s, %s, %s)"
                " ON CONFLICT (name) DO UPDATE SET latest = excluded.latest, last_version = excluded.last_version",
                (meta.name, latest, last_version),
            )
            await c.execute("UPDATE canvas_totals SET total_bytes = total_bytes + %s", (meta.size,))
