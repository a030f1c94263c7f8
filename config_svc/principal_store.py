"""The issued principals: who was given a token through flynn.v1.Principals, and what was revoked.

The interface (`PrincipalStore`) and the backend chosen by settings, like the revision history next
to it: principal_store_sqlite.py (embedded default, <data_dir>/config/principals.db) or
principal_store_pg.py (PostgreSQL schema flynn_config, tables `principals_*`, shared by every config
replica). Only SHA-256 hashes of tokens are stored. Revocations of principals from the deployment's
tokens file (which the mesh cannot edit) are stored as revoked hashes too. Every change increases
`version` (in the same transaction on PostgreSQL), and writes return after their COMMIT.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from flynn_runtime.auth import Role
from flynn_runtime.database import Database
from flynn_runtime.server import Runtime

NAME_RE = re.compile(r"^[A-Za-z0-9._@-]{1,64}$")
ISSUABLE_ROLES = (Role.OPERATOR, Role.CHANNEL, Role.AGENT)
FINGERPRINT_LEN = 16


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
        return self.sha256[:FINGERPRINT_LEN]


@dataclass(frozen=True)
class PrincipalSet:
    """Everything the store holds at one `version`: every issued principal (revoked ones included,
    oldest first) and the revoked hashes of tokens-file principals (hash -> revoke time)."""

    version: int
    issued: tuple[IssuedRecord, ...] = ()
    revoked_file: Mapping[str, float] = field(default_factory=dict)

    def active(self) -> list[IssuedRecord]:
        return [r for r in self.issued if r.revoke_time is None]

    def revoked_hashes(self) -> frozenset[str]:
        return frozenset(
            {r.sha256 for r in self.issued if r.revoke_time is not None} | set(self.revoked_file)
        )


class PrincipalStore(Protocol):
    async def version(self) -> int:
        """The current version (one cheap read: followers compare it before loading everything)."""
        ...

    async def load(self) -> PrincipalSet:
        """Everything, consistent with the version it carries."""
        ...

    async def issue(
        self, name: str, role: Role, channels: list[str], issued_by: str
    ) -> tuple[IssuedRecord, str]:
        """Create a token for a new principal; returns the record and the token (never stored)."""
        ...

    async def revoke_issued(self, name: str, fingerprint: str, by: str) -> list[IssuedRecord]:
        """Revoke the unrevoked issued tokens of `name` (or the one with `fingerprint`); returns them."""
        ...

    async def revoke_file_hash(self, sha256: str, name: str, by: str) -> bool:
        """Keep a tokens-file principal's hash as revoked; False when it already was."""
        ...

    async def close(self) -> None: ...


SQLITE_FILE = "config/principals.db"


def open_principal_store(runtime: Runtime, db: Database | None) -> PrincipalStore:
    """SQLite in the data dir without a database; else the config service's own `db` (flynn_config,
    already migrated with the principal tables by revision_store_pg.MIGRATIONS)."""
    if db is None:
        from config_svc.principal_store_sqlite import SqlitePrincipalStore

        return SqlitePrincipalStore(runtime.settings.data_dir / SQLITE_FILE)
    from config_svc.principal_store_pg import PgPrincipalStore

    return PgPrincipalStore(db)
