"""Issued principals in SQLite (WAL, synchronous=FULL) under <data_dir>/config/principals.db.

The embedded default: one config process, so `version` lives in memory (it starts at the start-up
time in milliseconds, so it still grows across restarts in practice) and grows with every change.
Every call runs on a worker thread, off the event loop (sqlite_db.LockedSqliteStore).
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from config_svc.principal_store import IssuedRecord, PrincipalSet
from flynn_runtime.auth import Role, generate_token, hash_token
from flynn_runtime.sqlite_db import LockedSqliteStore, transaction

SCHEMA = """
CREATE TABLE IF NOT EXISTS issued (
  sha256 TEXT PRIMARY KEY,
  name TEXT NOT NULL,
  role TEXT NOT NULL,
  channels TEXT NOT NULL,
  issued_by TEXT NOT NULL,
  issue_time REAL NOT NULL,
  revoke_time REAL,
  revoked_by TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS issued_by_name ON issued (name);
CREATE TABLE IF NOT EXISTS revoked_file (
  sha256 TEXT PRIMARY KEY,
  name TEXT NOT NULL,
  revoke_time REAL NOT NULL,
  revoked_by TEXT NOT NULL
);
"""


def row_to_record(r: Sequence[Any]) -> IssuedRecord:
    """A row of (sha256, name, role, channels, issued_by, issue_time, revoke_time) (channels as JSON text in SQLite, a list from PostgreSQL's JSONB)."""
    channels = r[3] if isinstance(r[3], list) else json.loads(str(r[3]))
    revoke = r[6]
    return IssuedRecord(
        sha256=str(r[0]),
        name=str(r[1]),
        role=Role(str(r[2])),
        channels=tuple(str(c) for c in channels),
        issued_by=str(r[4]),
        issue_time=float(r[5]),
        revoke_time=float(revoke) if revoke is not None else None,
    )


class SqlitePrincipalStore(LockedSqliteStore):
    def __init__(self, path: Path) -> None:
        super().__init__(path, schema=SCHEMA)
        self._version = int(time.time() * 1000)

    @property
    def sqlite(self) -> sqlite3.Connection:
        """The connection itself (flynn db export writes the copied rows through it)."""
        return self._db

    async def version(self) -> int:
        return self._version

    async def load(self) -> PrincipalSet:
        return await asyncio.to_thread(self._load)

    def _load(self) -> PrincipalSet:
        with self._lock:
            issued = tuple(
                row_to_record(r)
                for r in self._db.execute(
                    "SELECT sha256, name, role, channels, issued_by, issue_time, revoke_time"
                    " FROM issued ORDER BY issue_time, sha256"
                )
            )
            revoked = {
                str(h): float(t) for h, t in self._db.execute("SELECT sha256, revoke_time FROM revoked_file")
            }
            return PrincipalSet(self._version, issued, revoked)

    async def issue(
        self, name: str, role: Role, channels: list[str], issued_by: str
    ) -> tuple[IssuedRecord, str]:
        return await asyncio.to_thread(self._issue, name, role, channels, issued_by)

    def _issue(self, name: str, role: Role, channels: list[str], issued_by: str) -> tuple[IssuedRecord, str]:
        token = generate_token()
        rec = IssuedRecord(hash_token(token), name, role, tuple(channels), issued_by, time.time(), None)
        with self._lock, transaction(self._db) as db:
            db.execute(
                "INSERT INTO issued (sha256, name, role, channels, issued_by, issue_time, revoke_time)"
                " VALUES (?, ?, ?, ?, ?, ?, NULL)",
                (rec.sha256, name, role.value, json.dumps(list(channels)), issued_by, rec.issue_time),
            )
            self._version += 1
        return rec, token

    async def revoke_issued(self, name: str, fingerprint: str, by: str) -> list[IssuedRecord]:
        return await asyncio.to_thread(self._revoke_issued, name, fingerprint, by)

    def _revoke_issued(self, name: str, fingerprint: str, by: str) -> list[IssuedRecord]:
        now = time.time()
        with self._lock, transaction(self._db) as db:
            hits = [
                row_to_record(r)
                for r in db.execute(
                    "SELECT sha256, name, role, channels, issued_by, issue_time, revoke_time"
                    " FROM issued WHERE revoke_time IS NULL"
                    " AND ((? <> '' AND name = ?) OR (? <> '' AND substr(sha256, 1, 16) = ?))"
                    " ORDER BY issue_time, sha256",
                    (name, name, fingerprint, fingerprint),
                )
            ]
            for r in hits:
                db.execute(
                    "UPDATE issued SET revoke_time = ?, revoked_by = ? WHERE sha256 = ?", (now, by, r.sha256)
                )
            if hits:
                self._version += 1
        return [
            IssuedRecord(r.sha256, r.name, r.role, r.channels, r.issued_by, r.issue_time, now) for r in hits
        ]

    async def revoke_file_hash(self, sha256: str, name: str, by: str) -> bool:
        return await asyncio.to_thread(self._revoke_file_hash, sha256, name, by)

    def _revoke_file_hash(self, sha256: str, name: str, by: str) -> bool:
        with self._lock, transaction(self._db) as db:
            cur = db.execute(
                "INSERT OR IGNORE INTO revoked_file (sha256, name, revoke_time, revoked_by) VALUES (?, ?, ?, ?)",
                (sha256, name, time.time(), by),
            )
            if cur.rowcount:
                self._version += 1
        return bool(cur.rowcount)
