"""Health of a service that keeps its state in PostgreSQL: NOT_SERVING while the database is gone.

A probe with its own connection (not one of the pool's, so a busy pool never looks like an outage)
runs `SELECT 1` every `interval` seconds with a short timeout. After a failed probe the service's
gRPC health goes NOT_SERVING (so the gateway, Kubernetes readiness and `flynn-dev status` see it
within a few seconds) and calls fail with UNAVAILABLE / DATABASE_UNAVAILABLE from the stores; after a
successful probe it goes back to SERVING by itself. `flynn_database_up{service}` mirrors the state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg
from prometheus_client import Gauge

from flynn_runtime.database import Database, describe_connect_error
from flynn_runtime.tasks import cancel_and_wait

log = logging.getLogger(__name__)

DATABASE_UP = Gauge("flynn_database_up", "1 while the service's PostgreSQL database answers", ["service"])


class DatabaseHealth:
    def __init__(
        self,
        db: Database,
        service: str,
        on_change: Callable[[bool], Awaitable[None]],
        *,
        interval: float = 1.0,
        timeout: float = 2.0,
        ready: Callable[[], bool] | None = None,
    ) -> None:
        self.db = db
        self.service = service
        self.interval = interval
        self.timeout = timeout
        self.up = True
        #: What health says: the database answers AND the service's own `ready()` (for a replica:
        #: its liveness lease is held), so readiness reflects lease and database state.
        self.serving = True
        self._ready = ready
        self.last_error = ""
        self._on_change = on_change
        self._conn: psycopg.AsyncConnection[tuple[Any, ...]] | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        DATABASE_UP.labels(self.service).set(1)
        self._task = asyncio.create_task(self._run(), name=f"database-health-{self.service}")

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)
        await self._drop()

    async def probe(self) -> bool:
        try:
            async with asyncio.timeout(self.timeout):
                if self._conn is None or self._conn.closed:
                    conninfo = Database.conninfo(
                        self.db.settings,
                        self.db.schema,
                        self.db.timeouts,
                        f"flynn-{self.service}-health",
                        connect_timeout=str(max(1, int(self.timeout))),
                    )
                    self._conn = await psycopg.AsyncConnection.connect(conninfo, autocommit=True)
                await self._conn.execute("SELECT 1")
            return True
        except (TimeoutError, psycopg.Error, OSError) as e:
            self.last_error = (
                "probe timed out"
                if isinstance(e, TimeoutError)
                else describe_connect_error(self.db.settings, e)
            )
            await self._drop()
            return False

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close()

    async def _run(self) -> None:
        while True:
            ok = await self.probe()
            if ok and not self.up:
                # Back: replace the pool's broken connections now (its own reconnects back off), so
                # the first calls after SERVING find working connections.
                try:
                    async with asyncio.timeout(self.timeout * 2):
                        await self.db.pool.check()
                except (TimeoutError, psycopg.Error) as e:
                    log.warning("pool check after the database came back failed", extra={"error": str(e)})
                    ok = False
            if ok != self.up:
                self.up = ok
                self.db.reachable = ok
                DATABASE_UP.labels(self.service).set(1 if ok else 0)
                if ok:
                    log.warning("database is back; serving", extra={"database": self.db.settings.display()})
                else:
                    log.error(
                        "database unreachable; not serving",
                        extra={"database": self.db.settings.display(), "error": self.last_error},
                    )
            serving = ok and (self._ready is None or self._ready())
            if serving != self.serving:
                self.serving = serving
                if ok and not serving:
                    log.warning("not ready (the service's lease is not held); not serving")
                try:
                    await self._on_change(serving)
                except Exception:
                    log.exception("database health hook failed")
            await asyncio.sleep(self.interval)
