"""Every replica of a stateful service as it knows itself: a row per replica in the service's own
schema, refreshed by a heartbeat, so any replica can list them all (`Replicas/ListReplicas`, the
gateway's `System/GetStatus`, `flynn-dev status`, the console) without knowing ports or pods.

    registry = ReplicaRegistry(db, replica_id, address, report, gone_after=5.0)
    await registry.join()           # at start: started_at = now(); rows silent for an hour pruned
    await registry.beat(c)          # from the service's existing lease-renewal loop (one statement)
    rows = await registry.list()    # every replica heard from in the last hour, live ones first
    await registry.leave()          # graceful stop: shown as gone ("stopped") at once

- **No timer of its own.** `beat` is called by the loop that already renews the service's leases
  every lease/3 (config: the watcher table, run control: the session-lease renewal, reactions: the
  partition balance, nodes: the presence lease), on the connection it already holds: one small
  upsert per replica every ≈ 1.7 s with the default 5 s lease.
- **Gone after a bound, by the database's clock.** A row whose heartbeat is older than its
  `gone_after_seconds` (the service's lease, written by the replica itself) is listed as GONE: its
  leases have expired too, so the other replicas have taken (or will take) over what it held.
  A replica that cannot reach its database stops heart-beating, so it turns GONE as well: from the
  database's point of view it owns nothing. Rows silent for longer than `RETAIN_SECONDS` are
  deleted when a replica joins.
- **Without a database** (SQLite: exactly one process) `list` answers this replica from memory.
- `report` is the service's own view, read at each heartbeat: readiness, whether its liveness lease
  is held, and what it holds (`holdings`: sessions owned, watch streams, partitions, nodes).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg

from flynn_runtime import VERSION
from flynn_runtime.database import Database

log = logging.getLogger(__name__)

Conn = psycopg.AsyncConnection[tuple[Any, ...]]

#: Rows of replicas silent for longer than this are deleted (at the next join of any replica).
RETAIN_SECONDS = 3600.0

MIGRATION_SQL = """
CREATE TABLE replicas (
  replica_id TEXT PRIMARY KEY,
  address TEXT NOT NULL DEFAULT '',
  version TEXT NOT NULL DEFAULT '',
  started_at TIMESTAMPTZ NOT NULL DEFAULT now(),
  heartbeat_at TIMESTAMPTZ NOT NULL DEFAULT now(),
  gone_after_seconds DOUBLE PRECISION NOT NULL DEFAULT 5,
  ready BOOLEAN NOT NULL DEFAULT FALSE,
  database_reachable BOOLEAN NOT NULL DEFAULT TRUE,
  lease_held BOOLEAN NOT NULL DEFAULT FALSE,
  holdings JSONB NOT NULL DEFAULT '[]',
  detail TEXT NOT NULL DEFAULT '',
  stopped BOOLEAN NOT NULL DEFAULT FALSE
);
"""


@dataclass(frozen=True)
class Report:
    """What a replica says about itself at a heartbeat."""

    ready: bool
    lease_held: bool
    database_reachable: bool = True
    #: (name, count) pairs in the order they are shown.
    holdings: tuple[tuple[str, float], ...] = ()
    detail: str = ""


@dataclass(frozen=True)
class ReplicaRow:
    replica_id: str
    address: str
    version: str
    started_at: float  # Unix seconds
    heartbeat_at: float  # Unix seconds
    heartbeat_age: float  # seconds, by the database's clock
    gone_after: float
    ready: bool
    database_reachable: bool
    lease_held: bool
    holdings: tuple[tuple[str, float], ...] = field(default=())
    detail: str = ""
    stopped: bool = False

    @property
    def gone(self) -> bool:
        return self.stopped or self.heartbeat_age > self.gone_after

    @property
    def state(self) -> str:
        """ "ready", "not_ready" or "gone"."""
        if self.gone:
            return "gone"
        return "ready" if self.ready else "not_ready"


_UPSERT = """
INSERT INTO replicas AS r (replica_id, address, version, started_at, heartbeat_at, gone_after_seconds,
                           ready, database_reachable, lease_held, holdings, detail, stopped)
VALUES (%(id)s, %(address)s, %(version)s, now(), now(), %(gone_after)s, %(ready)s, %(db)s, %(lease)s,
        %(holdings)s::jsonb, %(detail)s, FALSE)
ON CONFLICT (replica_id) DO UPDATE SET
  address = EXCLUDED.address, version = EXCLUDED.version, heartbeat_at = now(),
  gone_after_seconds = EXCLUDED.gone_after_seconds, ready = EXCLUDED.ready,
  database_reachable = EXCLUDED.database_reachable, lease_held = EXCLUDED.lease_held,
  holdings = EXCLUDED.holdings, detail = EXCLUDED.detail, stopped = FALSE,
  started_at = CASE WHEN %(joining)s THEN now() ELSE r.started_at END
"""

_PRUNE = "DELETE FROM replicas WHERE heartbeat_at < now() - %s * interval '1 second'"

_LIST = """
SELECT replica_id, address, version, EXTRACT(EPOCH FROM started_at)::float8,
       EXTRACT(EPOCH FROM heartbeat_at)::float8, EXTRACT(EPOCH FROM now() - heartbeat_at)::float8,
       gone_after_seconds, ready, database_reachable, lease_held, holdings, detail, stopped
FROM replicas WHERE heartbeat_at >= now() - %s * interval '1 second'
"""


def _sorted(rows: list[ReplicaRow]) -> list[ReplicaRow]:
    return sorted(rows, key=lambda r: (r.gone, r.address, r.replica_id))


class ReplicaRegistry:
    def __init__(
        self,
        db: Database | None,
        replica_id: str,
        address: str,
        report: Callable[[], Report],
        *,
        gone_after: float = 5.0,
    ) -> None:
        self.db = db
        self.replica_id = replica_id
        self.address = address
        self.report = report
        self.gone_after = gone_after
        self.started_at = time.time()
        self.beats = 0
        self.failures = 0
        self._left = False

    def _params(self, joining: bool) -> dict[str, object]:
        rep = self.report()
        return {
            "id": self.replica_id,
            "address": self.address,
            "version": VERSION,
            "gone_after": float(self.gone_after),
            "ready": rep.ready,
            "db": rep.database_reachable,
            "lease": rep.lease_held,
            "holdings": json.dumps([[name, float(n)] for name, n in rep.holdings]),
            "detail": rep.detail[:500],
            "joining": joining,
        }

    async def join(self) -> None:
        """Record this replica (started now) and delete rows silent for longer than RETAIN_SECONDS
        (nothing to record without a database)."""
        if self.db is None:
            return
        async with self.db.connection() as conn:
            await conn.execute(_PRUNE, (RETAIN_SECONDS,))
            await conn.execute(_UPSERT, self._params(joining=True))

    async def beat(self, conn: Conn) -> None:
        """One heartbeat: the row's heartbeat time and this replica's report, in one statement. Never
        raises a database error: a missed heartbeat must not cost the renewal loop that carries it
        (the row just ages; the bound says gone if they keep failing)."""
        if self._left:
            return  # stopping: the "stopped" mark stays
        try:
            await conn.execute(_UPSERT, self._params(joining=False))
        except psycopg.Error as e:
            self.failures += 1
            log.warning("replica heartbeat not written", extra={"error": str(e)[:200]})
            return
        self.beats += 1

    async def leave(self) -> None:
        """A graceful stop: listed as gone ("stopped") at once. Best effort (the bound covers a miss)."""
        self._left = True
        if self.db is None:
            return
        try:
            async with self.db.connection() as c:
                await c.execute(
                    "UPDATE replicas SET stopped = TRUE, ready = FALSE, detail = 'stopped' WHERE replica_id = %s",
                    (self.replica_id,),
                )
        except Exception:  # noqa: BLE001 - shutting down; a missed update only waits for the bound
            return

    def local(self) -> ReplicaRow:
        """This replica from memory (the whole answer without a database)."""
        rep = self.report()
        now = time.time()
        return ReplicaRow(
            replica_id=self.replica_id,
            address=self.address,
            version=VERSION,
            started_at=self.started_at,
            heartbeat_at=now,
            heartbeat_age=0.0,
            gone_after=self.gone_after,
            ready=rep.ready,
            database_reachable=rep.database_reachable,
            lease_held=rep.lease_held,
            holdings=rep.holdings,
            detail=rep.detail,
        )

    async def list(self) -> list[ReplicaRow]:
        """Every replica heard from within RETAIN_SECONDS, live ones first, then by address."""
        if self.db is None:
            return [self.local()]
        async with self.db.connection() as c:
            cur = await c.execute(_LIST, (RETAIN_SECONDS,))
            rows = await cur.fetchall()
        return _sorted([_row(r) for r in rows])


def _row(r: tuple[Any, ...]) -> ReplicaRow:
    raw = r[10] if isinstance(r[10], list) else json.loads(str(r[10] or "[]"))
    holdings = tuple((str(h[0]), float(h[1])) for h in raw if isinstance(h, list) and len(h) == 2)
    return ReplicaRow(
        replica_id=str(r[0]),
        address=str(r[1]),
        version=str(r[2]),
        started_at=float(r[3]),
        heartbeat_at=float(r[4]),
        heartbeat_age=max(0.0, float(r[5])),
        gone_after=float(r[6]),
        ready=bool(r[7]),
        database_reachable=bool(r[8]),
        lease_held=bool(r[9]),
        holdings=holdings,
        detail=str(r[11]),
        stopped=bool(r[12]),
    )


#: The heartbeat hook the services' renewal loops accept.
Heartbeat = Callable[[Conn], Awaitable[None]]
