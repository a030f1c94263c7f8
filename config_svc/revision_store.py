"""The config's append-only revision history: the interface and the backend chosen by settings.

Backends (one module each): revision_store_sqlite.py (embedded default, <data_dir>/config/config.db)
and revision_store_pg.py (PostgreSQL schema flynn_config, when --database-url is set). Both keep one
row per revision holding the whole config blob next to its metadata, written in one transaction: a
crash keeps the whole revision or none of it, a revision number is never reused, and `append` with
`expected_head` is a compare-and-set that concurrent callers (other replicas included) cannot both win.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, TypeAlias

from flynn.v1 import config_pb2

from flynn_runtime.server import Runtime

SCHEMA = "flynn_config"


RevisionKind: TypeAlias = config_pb2.ConfigRevisionKind.ValueType


@dataclass(frozen=True)
class StoredRevision:
    revision: int
    kind: RevisionKind
    actor: str
    reason: str
    create_time_ns: int
    diff: list[tuple[str, str, str]] = field(default_factory=list)
    restored_revision: int = 0
    config: bytes = b""


class StaleHead(Exception):
    def __init__(self, head: int) -> None:
        super().__init__(f"head is {head}")
        self.head = head


class RevisionStore(Protocol):
    async def head(self) -> int: ...

    async def append(
        self,
        kind: RevisionKind,
        actor: str,
        reason: str,
        diff: list[tuple[str, str, str]],
        config: bytes,
        restored_revision: int = 0,
        expected_head: int | None = None,
    ) -> StoredRevision:
        """Commit the next revision (returns after COMMIT); StaleHead when the head moved past
        expected_head."""
        ...

    async def get(self, revision: int) -> StoredRevision | None: ...

    async def range(self, after: int, upto: int, limit: int = 1000) -> list[StoredRevision]:
        """Revisions after < r <= upto, oldest first."""
        ...

    async def newest_first(self, before: int, limit: int) -> list[StoredRevision]:
        """Up to `limit` revisions below `before` (0 = from the head), newest first."""
        ...

    async def close(self) -> None: ...


async def open_revision_store(runtime: Runtime) -> RevisionStore:
    if runtime.database_settings is None:
        from config_svc.revision_store_sqlite import SqliteRevisionStore

        return SqliteRevisionStore(runtime.settings.data_dir / "config" / "config.db")
    from config_svc.revision_store_pg import MIGRATIONS, PgRevisionStore

    return PgRevisionStore(await runtime.open_database(SCHEMA, MIGRATIONS))
