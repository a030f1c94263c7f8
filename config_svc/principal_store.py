"""The issued principals: who was given a token through flynn.v1.Principals, and what was revoked.

Only SHA-256 hashes of tokens are stored. Revocations of principals from the deployment's tokens
file (which the mesh cannot edit) are stored as revoked hashes too. `version` increases with every
change; WatchPrincipals sends a new snapshot when it does.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

from flynn_runtime.auth import Role, generate_token, hash_token
from flynn_runtime.sqlite_db import open_db, transaction

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

NAME_RE = re.compile(r"^[A-Za-z0-9._@-]{1,64}$")
ISSUABLE_ROLES = (Role.OPERATOR, Role.CHANNEL, Role.AGENT)


@dataclass(frozen=True)
class IssuedRecord:
    sha256: str
    name: str
    role: Role
    channels: tuple[str, ...]
    issued_by: str
    issue_time: float
    revoke_time: float | None

    @property
    def fingerprint(self) -> str:
        return self.sha256[:16]


def _row(r: tuple[object, ...]) -> IssuedRecord:
    revoke = r[6]
    return IssuedRecord(
        sha256=str(r[0]),
        name=str(r[1]),
        role=Role(str(r[2])),
        channels=tuple(json.loads(str(r[3]))),
        issued_by=str(r[4]),
        issue_time=float(r[5]),  # type: ignore[arg-type]
        revoke_time=float(revoke) if revoke is not None else None,  # type: ignore[arg-type]
    )


_COLS = "sha256, name, role, channels, issued_by, issue_time, revoke_time"


class PrincipalStore:
    def __init__(self, path: Path) -> None:
        self._db = open_db(path, schema=SCHEMA)
        self.version = int(time.time() * 1000)  # monotonic across restarts in practice

    def close(self) -> None:
        self._db.close()

    def issue(self, name: str, role: Role, channels: list[str], issued_by: str) -> tuple[IssuedRecord, str]:
        token = generate_token()
        rec = IssuedRecord(hash_token(token), name, role, tuple(channels), issued_by, time.time(), None)
        with transaction(self._db) as db:
            db.execute(
                f"INSERT INTO issued ({_COLS}) VALUES (?, ?, ?, ?, ?, ?, NULL)",
                (rec.sha256, name, role.value, json.dumps(list(channels)), issued_by, rec.issue_time),
            )
        self.version += 1
        return rec, token

    def issued(self, include_revoked: bool = True) -> list[IssuedRecord]:
        sql = f"SELECT {_COLS} FROM issued"
        if not include_revoked:
            sql += " WHERE revoke_time IS NULL"
        return [_row(r) for r in self._db.execute(sql + " ORDER BY issue_time")]

    def revoke_issued(self, name: str, fingerprint: str, by: str) -> list[IssuedRecord]:
        """Revoke unrevoked issued tokens of `name` (or the one with `fingerprint`); returns them."""
        now = time.time()
        hits = [
            r
            for r in self.issued(include_revoked=False)
            if (name and r.name == name) or (fingerprint and r.fingerprint == fingerprint)
        ]
        if not hits:
            return []
        with transaction(self._db) as db:
            for r in hits:
                db.execute(
                    "UPDATE issued SET revoke_time = ?, revoked_by = ? WHERE sha256 = ?", (now, by, r.sha256)
                )
        self.version += 1
        return [
            IssuedRecord(r.sha256, r.name, r.role, r.channels, r.issued_by, r.issue_time, now) for r in hits
        ]

    def revoke_file_hash(self, sha256: str, name: str, by: str) -> bool:
        with transaction(self._db) as db:
            cur = db.execute(
                "INSERT OR IGNORE INTO revoked_file (sha256, name, revoke_time, revoked_by) VALUES (?, ?, ?, ?)",
                (sha256, name, time.time(), by),
            )
        if cur.rowcount:
            self.version += 1
        return bool(cur.rowcount)

    def revoked_file(self) -> dict[str, float]:
        return {str(h): float(t) for h, t in self._db.execute("SELECT sha256, revoke_time FROM revoked_file")}

    def revoked_hashes(self) -> frozenset[str]:
        issued = {r.sha256 for r in self.issued() if r.revoke_time is not None}
        return frozenset(issued | set(self.revoked_file()))
