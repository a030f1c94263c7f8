"""Canvas artifacts in PostgreSQL (schema flynn_nodes): content in bytea, no shared volume needed.

Same contract as the SQLite + files store (canvas_store.py): versions are never reused (last_version
survives deletes), the newest `max_versions` versions of a name are kept, `max_artifact_bytes` and
`max_total_bytes` are enforced, etags are compare-and-set. Every write takes the row lock of the
one-row `canvas_totals` table first, so puts and deletes from any number of callers or replicas are
serialized there and the total stays exact; a put is one locking read, then its writes and COMMIT in
one pipelined batch. The call returns after COMMIT (an ack means committed).
Reads verify the sha256 of what they return.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from typing import Any

from flynn_runtime import errors
from flynn_runtime.database import Database
from flynn_runtime.errors import Code, FlynnError
from flynn_runtime.pg_migrations import Migration
from nodes_svc.canvas_store import (
    ArtifactMeta,
    CanvasLimits,
    _mismatch,
    check_etag,
    check_restorable,
    check_room,
    check_size,
    make_etag,
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

_COLS = "v.name, v.version, v.etag, v.content_type, v.sha256, v.size, v.update_time, v.actor"


def _meta(r: Sequence[Any]) -> ArtifactMeta:
    return ArtifactMeta(
        str(r[0]), int(r[1]), str(r[2]), str(r[3]), str(r[4]), int(r[5]), float(r[6]), str(r[7]), ""
    )


class PgCanvasStore:
    def __init__(self, db: Database, limits: CanvasLimits | None = None) -> None:
        self.db = db
        self.limits = limits or CanvasLimits()
        self._total = 0

    @property
    def total_bytes(self) -> int:
        """As of this process's last read or write (metrics); the database row is the truth."""
        return self._total

    async def recover(self) -> dict[str, int]:
        async with self.db.connection() as c:
            row = await (await c.execute("SELECT total_bytes FROM canvas_totals")).fetchone()
        self._total = int(row[0]) if row else 0
        return {"temp_files_removed": 0, "orphan_blobs_removed": 0, "missing_blobs": 0}

    async def close(self) -> None:
        """The pool belongs to the runtime, which closes it."""

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
            cur = await c.execute(
                "SELECT " + _COLS + " FROM canvas_artifacts a JOIN canvas_versions v"
                " ON v.name = a.name AND v.version = a.latest"
                " WHERE a.latest > 0 AND a.name > %s AND left(a.name, %s) = %s ORDER BY a.name LIMIT %s",
                (after, len(prefix), prefix, limit),
            )
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
        # Two round trips: BEGIN + the lock + the read, then the writes and COMMIT, each batch pipelined.
        # The read is its own statement after the lock, so its snapshot includes every put committed
        # before the lock was granted (a join inside the locking statement would see an older one).
        async with self.db.transaction(pipeline=True) as c:
            await c.execute("SELECT total_bytes FROM canvas_totals FOR UPDATE")
            cur = await c.execute(
                "SELECT t.total_bytes, a.last_version, v.etag,"
                " (SELECT COALESCE(SUM(o.size), 0) FROM canvas_versions o"
                "   WHERE o.name = %(name)s AND o.version <= COALESCE(a.last_version, 0) + 1 - %(keep)s),"
                " COALESCE(a.latest, 0)"
                " FROM canvas_totals t"
                " LEFT JOIN canvas_artifacts a ON a.name = %(name)s"
                " LEFT JOIN canvas_versions v ON v.name = a.name AND v.version = a.latest",
                {"name": name, "keep": lim.max_versions},
            )
            row = await cur.fetchone()
            assert row is not None
            total = int(row[0])
            last_version = int(row[1]) if row[1] is not None else 0
            current_etag = str(row[2]) if row[2] is not None else ""
            freed = int(row[3])
            check_etag(name, current_etag, etag)
            latest = int(row[4])
            version = last_version + 1
            if restore_version:
                check_restorable(name, latest, restore_version)
                version = restore_version
                cur = await c.execute(
                    "SELECT COALESCE(SUM(size), 0) FROM canvas_versions WHERE name = %s AND version <= %s",
                    (name, version - lim.max_versions),
                )
                freed_row = await cur.fetchone()
                freed = int(freed_row[0]) if freed_row is not None else 0
            cutoff = version - lim.max_versions
            check_room(total, freed, len(content), lim)
            meta = ArtifactMeta(
                name,
                version,
                make_etag(digest, version),
                content_type,
                digest,
                len(content),
                time.time(),
                actor,
                "",
            )
            new_total = total - freed + len(content)
            await c.execute("DELETE FROM canvas_versions WHERE name = %s AND version <= %s", (name, cutoff))
            await c.execute(
                "INSERT INTO canvas_versions(name, version, etag, content_type, sha256, size, update_time, actor, content)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
                (
                    name,
                    version,
                    meta.etag,
                    content_type,
                    digest,
                    len(content),
                    meta.update_time,
                    actor,
                    content,
                ),
            )
            await c.execute(
                "INSERT INTO canvas_artifacts(name, latest, last_version) VALUES (%s, %s, %s)"
                " ON CONFLICT (name) DO UPDATE SET latest = excluded.latest,"
                " last_version = GREATEST(canvas_artifacts.last_version, excluded.last_version)",
                (name, version, version),
            )
            await c.execute("UPDATE canvas_totals SET total_bytes = %s", (new_total,))
        self._total = new_total
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
