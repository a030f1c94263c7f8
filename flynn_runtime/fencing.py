"""Ending the database sessions of a replica whose liveness lease expired (a dead or frozen one).

Fencing epochs refuse a stale owner's *next* write, but a replica frozen in the middle of a
transaction (SIGSTOP, a VM pause, a stalled pipeline) keeps that transaction's row locks for as long
as it is frozen, and the replica taking over would wait on them: an uncommitted insert of the same
key, a row locked FOR UPDATE. So before taking over, a survivor ends the frozen replica's sessions:
every connection is named `flynn-<service>/<replica id>` (Database.open(replica_id=…)), and
`pg_terminate_backend` may be used on sessions of the same database role. The frozen replica's open
transactions roll back; if it ever resumes, its connections are gone, it reconnects, finds its lease
lost and steps down. Each (replica, lease epoch) is terminated once.
"""

from __future__ import annotations

import logging
from typing import Any

import psycopg

log = logging.getLogger(__name__)

Conn = psycopg.AsyncConnection[tuple[Any, ...]]

_EXPIRED = "SELECT name, epoch FROM leases WHERE scope = %s AND holder <> '' AND holder <> %s AND expires_at <= now()"
_TERMINATE = (
    "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity"
    " WHERE application_name = %s AND pid <> pg_backend_pid()"
)


class Fencer:
    def __init__(self, service: str, replica_id: str, scope: str = "replica") -> None:
        self.service = service
        self.replica_id = replica_id
        self.scope = scope
        self._done: set[tuple[str, int]] = set()
        self.terminated = 0

    async def end_dead_sessions(self, conn: Conn) -> list[str]:
        """Terminate the sessions of every replica of this service whose liveness lease expired
        (once per lease epoch); returns their replica ids."""
        cur = await conn.execute(_EXPIRED, (self.scope, self.replica_id))
        dead = [(str(r[0]), int(r[1])) for r in await cur.fetchall()]
        ended = []
        for name, epoch in dead:
            if (name, epoch) in self._done:
                continue
            self._done.add((name, epoch))
            app = f"flynn-{self.service}/{name}"[:63]
            row = await (await conn.execute(_TERMINATE, (app,))).fetchone()
            n = int(row[0]) if row else 0
            self.terminated += n
            ended.append(name)
            if n:
                log.warning(
                    "ended the database sessions of a replica whose lease expired",
                    extra={"replica": name, "sessions": n},
                )
        return ended
