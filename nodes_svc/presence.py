"""Node presence across nodes replicas on one PostgreSQL database (not used with SQLite).

A node's Connect stream lives on exactly one replica. The `nodes` row says which: `owner` (the
replica id, new per process) and `owner_address` (where other replicas forward InvokeNode), next to
the node's `epoch`, which every registration bumps in the database (a compare-and-set on the epoch
the registering replica read, so two replicas never hand out the same epoch).

- **Replica liveness** is a lease (flynn_runtime/leases.py, scope "replica", name = replica id)
  renewed every `ttl / 3`. Nodes owned by a replica whose lease expired (SIGKILL, partition) are
  marked offline by any survivor (`sweep_dead_owners`), with reason "replica_lost".
- **Fencing a replaced stream.** When a node reconnects to replica B, B's registration bumps the
  epoch; a trigger NOTIFYs `flynn_nodes_presence`; every replica re-reads the epochs of the nodes
  it holds streams for (`stale_sessions`) and closes each stream whose epoch is older ("replaced").
  The notification is only a wake-up: the table is the truth, and a periodic poll catches a lost one.
- **Routing an invoke.** `owner_of` answers where a node's stream is, if it is online on a live
  replica other than this one; the servicer forwards InvokeNode there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from flynn_runtime import leases
from flynn_runtime.database import Database
from flynn_runtime.errors import FlynnError
from flynn_runtime.replica_registry import Heartbeat
from flynn_runtime.tasks import cancel_and_wait

log = logging.getLogger(__name__)

SCOPE = "replica"
NOTIFY_CHANNEL = "flynn_nodes_presence"
DEFAULT_TTL = 5.0


@dataclass(frozen=True)
class Owner:
    replica: str
    address: str
    epoch: int


class Presence:
    def __init__(self, db: Database, replica_id: str, address: str, ttl: float = DEFAULT_TTL) -> None:
        self.db = db
        self.replica_id = replica_id
        self.address = address
        self.ttl = ttl
        self.lease_ok = False  # readiness: this replica's liveness lease is held
        self._task: asyncio.Task[None] | None = None
        #: Called with the connection after each renewal (the replica's heartbeat row).
        self.heartbeat: Heartbeat | None = None

    # liveness -----------------------------------------------------------------------------------

    async def join(self) -> None:
        """Take this replica's liveness lease (before serving)."""
        async with self.db.connection() as c:
            lease = await leases.acquire(c, SCOPE, self.replica_id, self.replica_id, self.address, self.ttl)
        self.lease_ok = lease.held_by(self.replica_id)

    async def renew(self) -> bool:
        """Renew the liveness lease; True when it had been lost and was taken again (rejoined)."""
        async with self.db.connection() as c:
            held = await leases.renew(c, SCOPE, self.replica_id, self.ttl)
            self.lease_ok = self.replica_id in held
            if self.heartbeat is not None:
                await self.heartbeat(c)
        if self.lease_ok:
            return False
        # Lost (we were paused or partitioned past the lease): take it again. A survivor may have
        # marked our nodes offline meanwhile; the caller re-asserts the streams still open here.
        await self.join()
        return True

    async def reassert(self, held: dict[str, int]) -> int:
        """Mark online again, owned here, the nodes whose streams are open here at the epoch the
        database still has (none registered elsewhere since); returns how many."""
        if not held:
            return 0
        ids = sorted(held)
        async with self.db.connection() as c:
            cur = await c.execute(
                "UPDATE nodes n SET online = TRUE, offline_reason = '', owner = %s, owner_address = %s"
                " FROM unnest(%s::text[], %s::bigint[]) AS h(node_id, epoch)"
                " WHERE n.node_id = h.node_id AND n.epoch = h.epoch AND NOT n.online",
                (self.replica_id, self.address, ids, [held[i] for i in ids]),
            )
            return cur.rowcount

    async def leave(self) -> None:
        with contextlib.suppress(FlynnError):
            async with self.db.connection() as c:
                lease = await leases.read(c, SCOPE, self.replica_id)
                if lease is not None and lease.held_by(self.replica_id):
                    await leases.release(c, SCOPE, self.replica_id, {self.replica_id: lease.epoch})
        self.lease_ok = False

    def start(self, sweep: Callable[[bool], Awaitable[None]]) -> None:
        """Renew the lease every ttl/3 and call `sweep(rejoined)` after each renewal."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(sweep), name="nodes-presence")

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)

    async def _run(self, sweep: Callable[[bool], Awaitable[None]]) -> None:
        while True:
            await asyncio.sleep(self.ttl / 3)
            try:
                rejoined = await self.renew()
                await sweep(rejoined)
            except FlynnError as e:
                self.lease_ok = False
                log.warning("presence lease not renewed", extra={"error": e.message[:200]})

    # ownership ----------------------------------------------------------------------------------

    async def owner_of(self, node_id: str) -> Owner | None:
        """The live replica (not this one) holding `node_id`'s stream, or None."""
        async with self.db.connection() as c:
            cur = await c.execute(
                "SELECT n.owner, n.owner_address, n.epoch FROM nodes n JOIN leases l"
                " ON l.scope = %s AND l.name = n.owner AND l.holder = n.owner AND l.expires_at > now()"
                " WHERE n.node_id = %s AND n.online AND n.owner <> %s",
                (SCOPE, node_id, self.replica_id),
            )
            row = await cur.fetchone()
        if row is None or not row[1]:
            return None
        return Owner(str(row[0]), str(row[1]), int(row[2]))

    async def stale_sessions(self, held: dict[str, int]) -> list[str]:
        """Of the nodes this replica holds streams for ({node_id: epoch}), those the database gives
        a newer epoch or another owner: their streams were replaced elsewhere."""
        if not held:
            return []
        ids = sorted(held)
        async with self.db.connection() as c:
            cur = await c.execute(
                "SELECT node_id, epoch, owner FROM nodes WHERE node_id = ANY(%s::text[])", (ids,)
            )
            rows = await cur.fetchall()
        return [
            str(r[0])
            for r in rows
            if int(r[1]) > held.get(str(r[0]), 0) or (str(r[2]) and str(r[2]) != self.replica_id)
        ]

    async def dead_owners(self) -> list[str]:
        """Replica ids that own online nodes but whose liveness lease expired or was released."""
        async with self.db.connection() as c:
            cur = await c.execute(
                "SELECT DISTINCT n.owner FROM nodes n WHERE n.online AND n.owner <> '' AND NOT EXISTS ("
                " SELECT 1 FROM leases l WHERE l.scope = %s AND l.name = n.owner AND l.holder = n.owner"
                " AND l.expires_at > now())",
                (SCOPE,),
            )
            return [str(r[0]) for r in await cur.fetchall()]

    async def live_replicas(self) -> dict[str, str]:
        """replica id → address of every replica whose lease is live (for status pages)."""
        async with self.db.connection() as c:
            cur = await c.execute(
                "SELECT name, address FROM leases WHERE scope = %s AND holder <> '' AND expires_at > now()"
                " ORDER BY name",
                (SCOPE,),
            )
            return {str(r[0]): str(r[1]) for r in await cur.fetchall()}
