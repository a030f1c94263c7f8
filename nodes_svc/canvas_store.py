"""Canvas: named, versioned artifacts stored crash-safely under <data_dir>/canvas.

Layout:
    canvas/index.sqlite                 metadata (WAL, synchronous=FULL): one row per kept version
    canvas/blobs/<h2>/<h>-<version>.bin content of one version; h = sha256(name), never the name itself

A put writes the content to a temp file in the blob's directory, fsyncs it, renames it into place,
fsyncs the directory, and only then commits the metadata row. The row is the commit point: a reader
only finds content through a committed row, so it never sees a half-written version, and a crash
at any step leaves at most a temp file or an unreferenced blob, both removed on the next start.
Storage paths derive from a hash, so no name can reach outside the canvas directory; names are
still validated (`validate_name`) so operators get a clear INVALID_ARGUMENT.

All operations run on one worker thread (`CanvasStore` is synchronous and single-threaded), which
serializes compare-and-set and keeps fsyncs off the event loop. With --database-url the canvas lives in
PostgreSQL instead (canvas_store_pg.py: content in bytea, same limits, no volume); `Canvas` is the
async face over either backend (`CanvasBackend`).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import sqlite3
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

from flynn_runtime import errors
from flynn_runtime.audit import AuditLog
from flynn_runtime.errors import Code, FieldViolation, FlynnError
from flynn_runtime.sqlite_db import open_db, transaction
from nodes_svc import metrics

T = TypeVar("T")

MAX_NAME_LEN = 200
DEFAULT_MAX_ARTIFACT_BYTES = 1024 * 1024
DEFAULT_MAX_TOTAL_BYTES = 256 * 1024 * 1024
DEFAULT_MAX_VERSIONS = 20
MAX_CONTENT_TYPE_LEN = 255

_SEGMENT_RE = re.compile(r"^[A-Za-z0-9._-]+$")
_CONTENT_TYPE_RE = re.compile(r"^[A-Za-z0-9!#$&^_.+-]+/[A-Za-z0-9!#$&^_.+-]+(\s*;.*)?$")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS artifacts (
    name TEXT PRIMARY KEY,
    latest INTEGER NOT NULL,          -- 0 when deleted
    last_version INTEGER NOT NULL     -- survives deletes, so versions (and etags) are never reused
);
CREATE TABLE IF NOT EXISTS versions (
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    etag TEXT NOT NULL,
    content_type TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    size INTEGER NOT NULL,
    update_time REAL NOT NULL,
    actor TEXT NOT NULL,
    blob TEXT NOT NULL,
    PRIMARY KEY (name, version)
);
"""


def name_problem(name: str) -> str | None:
    """Why `name` is not a valid artifact name (None when it is)."""
    if not name:
        return "is required"
    if "\x00" in name:
        return "must not contain NUL characters"
    if "\\" in name:
        return "must not contain backslashes"
    if len(name) > MAX_NAME_LEN:
        return f"is {len(name)} characters; at most {MAX_NAME_LEN} allowed"
    if name.startswith("/"):
        return "must be relative (no leading '/')"
    segments = name.split("/")
    for seg in segments:
        if seg in (".", ".."):
            return "must not contain '.' or '..' segments"
        if not seg:
            return "must not contain empty segments ('//' or a trailing '/')"
        if not _SEGMENT_RE.match(seg):
            return "segments may contain only letters, digits and . _ -"
    return None


def validate_name(name: str, field_path: str = "name") -> None:
    problem = name_problem(name)
    if problem is not None:
        raise errors.invalid_argument(field_path, problem, reason="INVALID_ARTIFACT_NAME")


def content_type_problem(ct: str) -> str | None:
    if not ct:
        return "is required"
    if len(ct) > MAX_CONTENT_TYPE_LEN or not _CONTENT_TYPE_RE.match(ct):
        return "must be a MIME type such as text/markdown"
    return None


@dataclass(frozen=True)
class ArtifactMeta:
    name: str
    version: int
    etag: str
    content_type: str
    sha256: str
    size: int
    update_time: float
    actor: str
    blob: str


@dataclass(frozen=True)
class CanvasLimits:
    max_artifact_bytes: int = DEFAULT_MAX_ARTIFACT_BYTES
    max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES
    max_versions: int = DEFAULT_MAX_VERSIONS


def prefix_end(prefix: str) -> str:
    """The smallest string above every string that starts with `prefix` ("" when there is none), so a
    prefix is the index range `prefix <= name < prefix_end(prefix)`: code-point order, which is the
    byte order of UTF-8 that both stores compare names in (SQLite BINARY, PostgreSQL COLLATE "C")."""
    for i in range(len(prefix) - 1, -1, -1):
        c = ord(prefix[i]) + 1
        if c == 0xD800:  # past the surrogates
            c = 0xE000
        if c <= 0x10FFFF:
            return prefix[:i] + chr(c)
    return ""


#: Listing by name from `after`, within a prefix: an index range scan that stops after `limit` names,
#: whatever the number of artifacts (a filter on the prefix alone scanned every name after `after`).
LIST_LATEST_SQLITE = (
    "SELECT v.* FROM artifacts a JOIN versions v ON v.name=a.name AND v.version=a.latest"
    " WHERE a.latest > 0 AND a.name > ? AND a.name >= ? ORDER BY a.name LIMIT ?"
)
LIST_LATEST_SQLITE_BOUNDED = (
    "SELECT v.* FROM artifacts a JOIN versions v ON v.name=a.name AND v.version=a.latest"
    " WHERE a.latest > 0 AND a.name > ? AND a.name >= ? AND a.name < ? ORDER BY a.name LIMIT ?"
)


def make_etag(sha256: str, version: int) -> str:
    return f'"v{version}-{sha256[:16]}"'


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _meta(row: sqlite3.Row) -> ArtifactMeta:
    return ArtifactMeta(
        row["name"],
        row["version"],
        row["etag"],
        row["content_type"],
        row["sha256"],
        row["size"],
        row["update_time"],
        row["actor"],
        row["blob"],
    )


def _mismatch(name: str, current: str, wanted: str) -> FlynnError:
    if wanted == "*":
        msg = f"artifact {name!r} already exists (etag '*' only creates)"
    elif not current:
        msg = f"artifact {name!r} does not exist; etag {wanted} does not match"
    else:
        msg = f"artifact {name!r} changed: current etag is {current}, the request was based on {wanted}"
    return errors.failed_precondition(msg, reason="ETAG_MISMATCH", name=name, current_etag=current)


def check_size(content: bytes, lim: CanvasLimits) -> None:
    """A put's content fits one artifact (both backends)."""
    if len(content) > lim.max_artifact_bytes:
        raise FlynnError(
            Code.INVALID_ARGUMENT,
            f"content is {len(content)} bytes; at most {lim.max_artifact_bytes} allowed per artifact",
            reason="ARTIFACT_TOO_LARGE",
            violations=[FieldViolation("content", f"at most {lim.max_artifact_bytes} bytes")],
        )


def check_etag(name: str, current_etag: str, etag: str) -> None:
    """A put's etag: "" writes anyway, "*" only creates, any other must be the current one."""
    if etag == "*" and current_etag:
        raise _mismatch(name, current_etag, etag)
    if etag and etag != "*" and etag != current_etag:
        raise _mismatch(name, current_etag, etag)


def check_restorable(name: str, latest: int, restore_version: int) -> None:
    """A version brought back from an archive must be above every version of the name still kept."""
    if latest > 0 and latest >= restore_version:
        raise errors.failed_precondition(
            f"artifact {errors.shown(name)!r} already keeps version {latest}; "
            f"version {restore_version} can only be restored above every kept version",
            reason="VERSION_NOT_RESTORABLE",
            latest_version=str(latest),
        )


def canvas_full(total: int, lim: CanvasLimits) -> FlynnError:
    """The error of a put that does not fit the canvas's total (both backends)."""
    return errors.resource_exhausted(
        f"canvas is full: {total} of {lim.max_total_bytes} bytes used; delete artifacts first",
        reason="CANVAS_FULL",
        used_bytes=str(total),
        max_total_bytes=str(lim.max_total_bytes),
    )


def check_room(total: int, freed: int, size: int, lim: CanvasLimits) -> None:
    """The canvas stays within its total once the put's `size` is in and `freed` bytes are pruned."""
    if total - freed + size > lim.max_total_bytes:
        raise canvas_full(total, lim)


class CanvasStore:
    def __init__(self, root: Path, limits: CanvasLimits | None = None) -> None:
        self.root = root
        self.blobs = root / "blobs"
        self.limits = limits or CanvasLimits()
        self.blobs.mkdir(parents=True, exist_ok=True)
        self._db = open_db(root / "index.sqlite", rows=True, schema=_SCHEMA)
        self.total_bytes = 0
        self.recovered: dict[str, int] = {}

    # lifecycle ----------------------------------------------------------------------------

    def recover(self) -> dict[str, int]:
        """Remove leftovers of interrupted writes: temp files and blobs no committed row references."""
        referenced = {r[0] for r in self._db.execute("SELECT blob FROM versions")}
        temps = orphans = 0
        for sub in self.blobs.iterdir():
            if not sub.is_dir():
                continue
            for f in sub.iterdir():
                if f.name.endswith(".tmp"):
                    f.unlink(missing_ok=True)
                    temps += 1
                elif f"{sub.name}/{f.name}" not in referenced:
                    f.unlink(missing_ok=True)
                    orphans += 1
        missing = sum(1 for b in referenced if not (self.blobs / b).exists())
        row = self._db.execute("SELECT COALESCE(SUM(size), 0) FROM versions").fetchone()
        self.total_bytes = int(row[0])
        self.recovered = {
            "temp_files_removed": temps,
            "orphan_blobs_removed": orphans,
            "missing_blobs": missing,
        }
        return self.recovered

    def close(self) -> None:
        self._db.close()

    def _tx(self) -> AbstractContextManager[sqlite3.Connection]:
        return transaction(self._db)

    # reads --------------------------------------------------------------------------------

    def _latest(self, name: str) -> ArtifactMeta | None:
        row = self._db.execute(
            "SELECT v.* FROM artifacts a JOIN versions v ON v.name=a.name AND v.version=a.latest WHERE a.name=?",
            (name,),
        ).fetchone()
        return _meta(row) if row else None

    def get(self, name: str, version: int = 0) -> tuple[ArtifactMeta, bytes]:
        if version:
            row = self._db.execute(
                "SELECT * FROM versions WHERE name=? AND version=?", (name, version)
            ).fetchone()
            meta = _meta(row) if row else None
        else:
            meta = self._latest(name)
        if meta is None:
            what = f"{name}@{version}" if version else name
            raise errors.not_found("artifact", what, reason="ARTIFACT_NOT_FOUND")
        content = (self.blobs / meta.blob).read_bytes()
        if hashlib.sha256(content).hexdigest() != meta.sha256:
            raise FlynnError(
                Code.INTERNAL,
                f"artifact {name!r} version {meta.version} failed its checksum",
                reason="DATA_LOSS",
            )
        return meta, content

    def list_latest(self, prefix: str, after: str, limit: int) -> list[ArtifactMeta]:
        end = prefix_end(prefix)
        if end:
            rows = self._db.execute(LIST_LATEST_SQLITE_BOUNDED, (after, prefix, end, limit))
        else:
            rows = self._db.execute(LIST_LATEST_SQLITE, (after, prefix, limit))
        return [_meta(r) for r in rows]

    # writes -------------------------------------------------------------------------------

    def put(
        self, name: str, content_type: str, content: bytes, etag: str, actor: str, restore_version: int = 0
    ) -> ArtifactMeta:
        """Write the next version, or (restore_version > 0) that exact version, which must be above every
        version of the name still kept (an archive brought back after a purge)."""
        lim = self.limits
        check_size(content, lim)
        current = self._latest(name)
        check_etag(name, current.etag if current else "", etag)
        row = self._db.execute("SELECT last_version FROM artifacts WHERE name=?", (name,)).fetchone()
        last_version = int(row[0]) if row else 0
        version = last_version + 1
        if restore_version:
            check_restorable(name, current.version if current is not None else 0, restore_version)
            version = restore_version
        # Versions this put pushes out of the window are freed by it, so count them out of the total.
        freed = self._db.execute(
            "SELECT COALESCE(SUM(size), 0) FROM versions WHERE name=? AND version <= ?",
            (name, version - lim.max_versions),
        ).fetchone()[0]
        check_room(self.total_bytes, int(freed), len(content), lim)
        digest = hashlib.sha256(content).hexdigest()
        key = hashlib.sha256(name.encode("utf-8")).hexdigest()[:40]
        blob = f"{key[:2]}/{key}-{version}.bin"
        self._write_blob(blob, content)
        meta = ArtifactMeta(
            name,
            version,
            make_etag(digest, version),
            content_type,
            digest,
            len(content),
            time.time(),
            actor,
            blob,
        )
        with self._tx() as db:
            db.execute(
                "INSERT INTO versions(name, version, etag, content_type, sha256, size, update_time, actor, blob)"
                " VALUES (?,?,?,?,?,?,?,?,?)",
                (name, version, meta.etag, content_type, digest, len(content), meta.update_time, actor, blob),
            )
            db.execute(
                "INSERT INTO artifacts(name, latest, last_version) VALUES (?,?,?)"
                " ON CONFLICT(name) DO UPDATE SET latest=excluded.latest, last_version=excluded.last_version",
                (name, version, max(version, last_version)),
            )
            pruned = [
                r["blob"]
                for r in db.execute(
                    "SELECT blob FROM versions WHERE name=? AND version <= ?",
                    (name, version - lim.max_versions),
                )
            ]
            db.execute(
                "DELETE FROM versions WHERE name=? AND version <= ?", (name, version - lim.max_versions)
            )
        self.total_bytes += len(content) - int(freed)
        self._unlink(pruned)
        return meta

    def delete(self, name: str, etag: str) -> int:
        current = self._latest(name)
        if current is None:
            raise errors.not_found("artifact", name, reason="ARTIFACT_NOT_FOUND")
        if etag and etag != current.etag:
            raise _mismatch(name, current.etag, etag)
        with self._tx() as db:
            rows = [
                (r["blob"], r["size"])
                for r in db.execute("SELECT blob, size FROM versions WHERE name=?", (name,))
            ]
            db.execute("DELETE FROM versions WHERE name=?", (name,))
            db.execute("UPDATE artifacts SET latest=0 WHERE name=?", (name,))
        self.total_bytes -= sum(size for _, size in rows)
        self._unlink([b for b, _ in rows])
        return len(rows)

    # files --------------------------------------------------------------------------------

    def _write_blob(self, blob: str, content: bytes) -> None:
        final = self.blobs / blob
        if not final.parent.is_dir():
            final.parent.mkdir(exist_ok=True)
            _fsync_dir(self.blobs)
        tmp = final.with_name(f".{final.name}.{os.getpid()}.{time.monotonic_ns()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            view = memoryview(content)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final)
        _fsync_dir(final.parent)

    def _unlink(self, blobs: list[str]) -> None:
        # After the rows are gone: a crash before this leaves unreferenced blobs, removed by recover().
        for b in blobs:
            (self.blobs / b).unlink(missing_ok=True)


class CanvasBackend(Protocol):
    """What the async face needs from a storage backend (SQLite + files, or PostgreSQL bytea)."""

    limits: CanvasLimits
    #: Whether a put or delete appends its nodes event itself, in its own transaction (PostgreSQL);
    #: otherwise the registry appends it after the change (SQLite: another file).
    records_events: bool

    @property
    def total_bytes(self) -> int: ...

    async def recover(self) -> dict[str, int]: ...

    async def put(
        self, name: str, content_type: str, content: bytes, etag: str, actor: str, restore_version: int = 0
    ) -> ArtifactMeta: ...

    async def get(self, name: str, version: int = 0) -> tuple[ArtifactMeta, bytes]: ...

    async def list_latest(self, prefix: str, after: str, limit: int) -> list[ArtifactMeta]: ...

    async def delete(self, name: str, etag: str) -> int: ...

    async def close(self) -> None: ...


class SqliteCanvasBackend:
    """The SQLite + files store on its one worker thread (serializes compare-and-set, fsyncs off the loop)."""

    records_events = False

    def __init__(self, store: CanvasStore) -> None:
        self.store = store
        self.limits = store.limits
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="canvas")

    @property
    def total_bytes(self) -> int:
        return self.store.total_bytes

    async def _run(self, fn: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def recover(self) -> dict[str, int]:
        return await self._run(self.store.recover)

    async def put(
        self, name: str, content_type: str, content: bytes, etag: str, actor: str, restore_version: int = 0
    ) -> ArtifactMeta:
        return await self._run(self.store.put, name, content_type, content, etag, actor, restore_version)

    async def get(self, name: str, version: int = 0) -> tuple[ArtifactMeta, bytes]:
        return await self._run(self.store.get, name, version)

    async def list_latest(self, prefix: str, after: str, limit: int) -> list[ArtifactMeta]:
        return await self._run(self.store.list_latest, prefix, after, limit)

    async def delete(self, name: str, etag: str) -> int:
        return await self._run(self.store.delete, name, etag)

    async def close(self) -> None:
        await self._run(self.store.close)
        self._pool.shutdown(wait=True)


class Canvas:
    """Async face of the store: the gate, audit, metrics and change events over either backend."""

    def __init__(
        self,
        store: CanvasBackend | CanvasStore,
        audit: AuditLog,
        enabled: Callable[[], bool],
        on_change: Callable[[str, str], None],
    ) -> None:
        self.store: CanvasBackend = SqliteCanvasBackend(store) if isinstance(store, CanvasStore) else store
        self.audit = audit
        self._enabled = enabled
        self._on_change = on_change

    async def start(self) -> dict[str, int]:
        recovered = await self.store.recover()
        metrics.CANVAS_BYTES.set(self.store.total_bytes)
        return recovered

    async def close(self) -> None:
        await self.store.close()

    def check_enabled(self, op: str) -> None:
        if not self._enabled():
            metrics.CANVAS_OPS.labels(op, "disabled").inc()
            raise errors.failed_precondition(
                "the canvas is off (server.nodes.feature_gates.ui.canvas is false)", reason="CANVAS_DISABLED"
            )

    async def _op(self, op: str, fn: Callable[..., Awaitable[T]], *args: object) -> T:
        self.check_enabled(op)
        start = time.perf_counter()
        try:
            result = await fn(*args)
        except FlynnError as e:
            metrics.CANVAS_OPS.labels(op, e.reason or e.code.value).inc()
            raise
        metrics.CANVAS_OPS.labels(op, "ok").inc()
        metrics.CANVAS_LATENCY.labels(op).observe(time.perf_counter() - start)
        return result

    async def put(
        self, name: str, content_type: str, content: bytes, etag: str, actor: str, restore_version: int = 0
    ) -> ArtifactMeta:
        meta = await self._op(
            "put", self.store.put, name, content_type, content, etag, actor, restore_version
        )
        metrics.CANVAS_BYTES.set(self.store.total_bytes)
        self.audit.record(
            "canvasRestore" if restore_version else "canvasPut",
            actor=actor,
            name=name,
            version=meta.version,
            sha256=meta.sha256,
            size_bytes=meta.size,
            etag=meta.etag,
        )
        self._on_change(name, "put")
        return meta

    async def get(self, name: str, version: int) -> tuple[ArtifactMeta, bytes]:
        return await self._op("get", self.store.get, name, version)

    async def list_latest(self, prefix: str, after: str, limit: int) -> list[ArtifactMeta]:
        return await self._op("list", self.store.list_latest, prefix, after, limit)

    async def delete(self, name: str, etag: str, actor: str, reason: str = "") -> int:
        n = await self._op("delete", self.store.delete, name, etag)
        metrics.CANVAS_BYTES.set(self.store.total_bytes)
        self.audit.record("canvasDelete", actor=actor, name=name, deleted_versions=n, reason=reason or None)
        self._on_change(name, "delete")
        return n
