"""The watchers of every config replica in one PostgreSQL table, so ListWatchers through any replica
lists them all (not used with SQLite: one replica, its memory is the whole truth).

Each replica writes the entries of its registry that changed (`WatcherRegistry.dirty`) every second,
and before answering ListWatchers. A replica holds a liveness lease (scope "replica"); a watcher row is
"connected" when its stream count is positive on a replica whose lease is live, so the watchers of a
replica that died show as disconnected until they reconnect elsewhere. Rows merge rather than
overwrite: applied and NACKed revisions only grow, and the stream fields (count, peer, replica) are
taken by the replica that has a stream open, or cleared only by the replica that had it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from config_svc.watcher_registry import WatcherEntry, WatcherRegistry
from flynn_runtime import leases
from flynn_runtime.database import Database
from flynn_runtime.errors import FlynnError
from flynn_runtime.fencing import Fencer
from flynn_runtime.replica_registry import Heartbeat
from flynn_runtime.tasks import cancel_and_wait

log = logging.getLogger(__name__)

SCOPE = "replica"
TTL = 5.0
SYNC_SECONDS = 1.0

MIGRATION_SQL = (
    """
CREATE TABLE watchers (
    service            TEXT NOT NULL,
    instance_id        TEXT NOT NULL,
    version            TEXT NOT NULL DEFAULT '',
    streams            INTEGER NOT NULL DEFAULT 0,
    applied_revision   BIGINT NOT NULL DEFAULT 0,
    last_nack_revision BIGINT NOT NULL DEFAULT 0,
    last_nack_reason   TEXT NOT NULL DEFAULT '',
    last_seen          DOUBLE PRECISION NOT NULL DEFAULT 0,
    peer               TEXT NOT NULL DEFAULT '',
    replica            TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (service, instance_id)
);
"""
    + leases.MIGRATION_SQL
)

# One statement for every changed entry (arrays, unnested): a thousand ACKs cost one round trip and one
# plan, not a thousand statements. Rows are sorted by key by the caller: one lock order for every replica.
_UPSERT = """
INSERT INTO watchers AS w (service, instance_id, version, streams, applied_revision, last_nack_revision,
                           last_nack_reason, last_seen, peer, replica)
SELECT * FROM unnest(%s::text[], %s::text[], %s::text[], %s::int[], %s::bigint[], %s::bigint[], %s::text[],
                     %s::float8[], %s::text[], %s::text[])
ON CONFLICT (service, instance_id) DO UPDATE SET
  version = CASE WHEN EXCLUDED.version <> '' THEN EXCLUDED.version ELSE w.version END,
  applied_revision = GREATEST(w.applied_revision, EXCLUDED.applied_revision),
  last_nack_reason = CASE WHEN EXCLUDED.last_nack_revision > w.last_nack_revision
                          THEN EXCLUDED.last_nack_reason ELSE w.last_nack_reason END,
  last_nack_revision = GREATEST(w.last_nack_revision, EXCLUDED.last_nack_revision),
  last_seen = GREATEST(w.last_seen, EXCLUDED.last_seen),
  streams = CASE WHEN EXCLUDED.streams > 0 OR w.replica = EXCLUDED.replica OR w.replica = ''
                 THEN EXCLUDED.streams ELSE w.streams END,
  peer = CASE WHEN EXCLUDED.streams > 0 THEN EXCLUDED.peer ELSE w.peer END,
  replica = CASE WHEN EXCLUDED.streams > 0 THEN EXCLUDED.replica ELSE w.replica END
"""

_SELECT = """
SELECT w.service, w.instance_id, w.version,
       CASE WHEN w.streams > 0 AND EXISTS (SELECT 1 FROM leases l WHERE l.scope = %s AND l.name = w.replica
                                           AND l.holder = w.replica AND l.expires_at > now())
            THEN w.streams ELSE 0 END,
       w.applied_revision, w.last_nack_revision, w.last_nack_reason, w.last_seen, w.peer
FROM watchers w ORDER BY w.service, w.instance_id OFFSET %s LIMIT %s
"""


class WatcherTable:
    def __init__(self, db: Database, registry: WatcherRegistry, replica_id: str, address: str) -> None:
        self.db = db
        self.registry = registry
        self.replica_id = replica_id
        self.address = address
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self.fencer = Fencer("config", replica_id)
        #: Whether this replica's liveness lease was held at the last renewal.
        self.lease_ok = False
        #: Called with the connection after each renewal (the replica's heartbeat row).
        self.heartbeat: Heartbeat | None = None

    async def join(self) -> None:
        async with self.db.connection() as c:
            lease = await leases.acquire(c, SCOPE, self.replica_id, self.replica_id, self.address, TTL)
        self.lease_ok = lease.held_by(self.replica_id)

    async def flush(self) -> None:
        """Write the entries changed since the last flush."""
        async with self._lock:
            entries = self.registry.take_dirty()
            if not entries:
                return
            rows = [
                (e.service, e.instance_id, e.version, e.streams, e.applied_revision, e.last_nack_revision,
                 e.last_nack_reason, e.last_seen, e.peer, self.replica_id)
                for e in sorted(entries, key=lambda e: (e.service, e.instance_id))  # one lock order
            ]  # fmt: skip
            columns = [list(col) for col in zip(*rows, strict=True)]
            try:
                async with self.db.transaction() as c:
                    await c.execute(_UPSERT, columns)
            except FlynnError:
                self.registry.dirty.update((e.service, e.instance_id) for e in entries)  # next time
                raise

    async def page(self, offset: int, limit: int) -> tuple[list[WatcherEntry], bool]:
        """A page of every replica's watchers (and whether more follow)."""
        with contextlib.suppress(FlynnError):
            await self.flush()  # this replica's latest reports are part of the answer
        async with self.db.connection() as c:
            cur = await c.execute(_SELECT, (SCOPE, offset, limit + 1))
            rows = await cur.fetchall()
        entries = [
            WatcherEntry(
                service=str(r[0]),
                instance_id=str(r[1]),
                version=str(r[2]),
                streams=int(r[3]),
                applied_revision=int(r[4]),
                last_nack_revision=int(r[5]),
                last_nack_reason=str(r[6]),
                last_seen=float(r[7]),
                peer=str(r[8]),
            )  # fmt: skip
            for r in rows[:limit]
        ]
        return entries, len(rows) > limit

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="config-watcher-table")

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)
        with contextlib.suppress(FlynnError):
            await self.flush()

    async def _run(self) -> None:
        renew_due = 0.0
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(SYNC_SECONDS)
            try:
                if loop.time() >= renew_due:
                    async with self.db.connection() as c:
                        held = await leases.renew(c, SCOPE, self.replica_id, TTL)
                        # A config replica frozen inside a write holds the head row's lock and would
                        # stop every write: end the sessions of replicas whose lease expired.
                        await self.fencer.end_dead_sessions(c)
                        self.lease_ok = self.replica_id in held
                        if self.heartbeat is not None:
                            await self.heartbeat(c)
                    if not self.lease_ok:
                        await self.join()
                    renew_due = loop.time() + TTL / 3
                await self.flush()
            except FlynnError as e:
                self.lease_ok = False
                log.warning("watcher table not written", extra={"error": e.message[:200]})
