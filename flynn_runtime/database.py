"""A service's PostgreSQL database: a psycopg 3 async pool scoped to the service's own schema.

    db = await Database.open(settings, service="config", schema="flynn_config", migrations=MIGRATIONS)
    async with db.transaction() as conn:          # BEGIN … COMMIT (ROLLBACK on error)
        await conn.execute("INSERT …", (a, b))    # always parameters, never string formatting
    async with db.connection() as conn:           # autocommit reads
        rows = await (await conn.execute("SELECT …", (x,))).fetchall()

Every connection has `search_path` set to the service's schema, a connect timeout and a statement
timeout. A failure to reach the database while serving becomes `FlynnError(UNAVAILABLE,
reason=DATABASE_UNAVAILABLE)` (the interceptor turns it into a rich status naming the database);
the pool replaces broken connections by itself, so the service recovers when the database does.
At start-up the same failures are `DatabaseStartupError` with a one-line message naming the cause
(malformed URL, wrong password, unknown database, refused connection, schema newer than the code).
Nothing here blocks the event loop: every round trip is awaited.
"""

from __future__ import annotations

import logging
import select
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import psycopg
import psycopg_pool
from psycopg.conninfo import make_conninfo

from flynn_runtime.database_url import DatabaseSettingError, DatabaseSettings
from flynn_runtime.errors import FlynnError, unavailable
from flynn_runtime.pg_migrations import Migration, SchemaTooNew, migrate

log = logging.getLogger(__name__)

DATABASE_UNAVAILABLE = "DATABASE_UNAVAILABLE"


class DatabaseStartupError(DatabaseSettingError):
    """The database cannot be used at start-up; the message names the cause in one line."""


@dataclass(frozen=True)
class Timeouts:
    connect_seconds: int = 5
    statement_ms: int = 15_000
    #: How long a call waits for a pooled connection before answering UNAVAILABLE.
    acquire_seconds: float = 3.0
    #: The same wait while the health probe finds the database unreachable: calls fail fast with
    #: UNAVAILABLE instead of queueing behind each other for `acquire_seconds` each.
    acquire_when_down_seconds: float = 0.2
    #: When positive, PostgreSQL ends a session left idle inside a transaction this long (0: never,
    #: the default). A replica frozen mid-transaction is ended by the replica taking over instead
    #: (flynn_runtime/fencing.py), which also covers a transaction frozen mid-pipeline.
    idle_in_transaction_ms: int = 0


def database_unavailable(db: DatabaseSettings, detail: str) -> FlynnError:
    return unavailable(
        f"the database {db.display()} is unavailable: {detail}",
        reason=DATABASE_UNAVAILABLE,
        retry_after=1.0,
        database=db.display(),
    )


def describe_connect_error(db: DatabaseSettings, e: BaseException) -> str:
    """One line saying why connecting to `db` failed (wrong password, refused, unknown database…)."""
    text = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
    low = str(e).lower()
    where = db.display()
    if "password authentication failed" in low or "no password supplied" in low:
        return f"wrong password for user {db.user!r} on {where} (--database-password-file / FLYNN_DATABASE_PASSWORD_FILE)"
    if "does not exist" in low and "database" in low:
        return f"the database {db.dbname!r} does not exist on {db.host}:{db.port} (create it, or fix --database-url)"
    if "role" in low and "does not exist" in low:
        return f"the user {db.user!r} does not exist on {db.host}:{db.port}"
    if "connection refused" in low:
        return f"connection refused by {db.host}:{db.port}: is PostgreSQL running there? ({where})"
    if "timeout" in low or "timed out" in low:
        return f"no answer from {db.host}:{db.port} within the connect timeout ({where})"
    if "could not translate host name" in low or "name or service not known" in low:
        return f"unknown host {db.host!r} in --database-url"
    return f"cannot connect to {where}: {text}"


async def check_quiet_connection(conn: psycopg.AsyncConnection[Any]) -> None:
    """The pool's check of a connection it hands out, without a round trip while the connection is quiet.

    A pooled connection sits idle with nothing to read. When the server ends it (a restart, a crash, a
    fencing `pg_terminate_backend`) it sends an error and closes the socket, which makes the socket
    readable: only then is the full check (an empty query) run, so that the pool replaces a dead
    connection instead of handing it out. Checking every checkout with a query would cost every
    pooled call one more round trip to the server."""
    if conn.closed or conn.broken:
        raise psycopg.OperationalError("the connection is closed")
    poller = select.poll()  # poll, not select: a busy process may hold descriptors above FD_SETSIZE
    poller.register(conn.pgconn.socket, select.POLLIN)
    if poller.poll(0):
        await psycopg_pool.AsyncConnectionPool.check_connection(conn)


class Database:
    """The pool of one service plus the error translation its stores share."""

    def __init__(
        self,
        settings: DatabaseSettings,
        schema: str,
        pool: psycopg_pool.AsyncConnectionPool,
        timeouts: Timeouts,
    ) -> None:
        self.settings = settings
        self.schema = schema
        self.pool = pool
        self.timeouts = timeouts
        self.schema_version = 0
        #: False while flynn_runtime/database_health.py's probe finds the database unreachable.
        self.reachable = True

    @staticmethod
    def conninfo(
        settings: DatabaseSettings, schema: str, timeouts: Timeouts, application_name: str, **overrides: str
    ) -> str:
        """The connection string of a connection to the service's schema (psycopg.connect, the pool)."""
        kw: dict[str, str] = dict(settings.conninfo_kwargs())
        options = str(kw.pop("options", ""))
        kw["options"] = (
            f"{options} -c search_path={schema} -c statement_timeout={int(timeouts.statement_ms)}"
        ).strip()
        if timeouts.idle_in_transaction_ms > 0:
            kw["options"] = (
                f"{kw['options']} -c idle_in_transaction_session_timeout={int(timeouts.idle_in_transaction_ms)}"
            )
        kw.setdefault("connect_timeout", str(int(timeouts.connect_seconds)))
        kw.setdefault("application_name", application_name)
        return make_conninfo("", **{**kw, **overrides})

    @classmethod
    async def open(
        cls,
        settings: DatabaseSettings,
        *,
        service: str,
        schema: str,
        migrations: Sequence[Migration],
        min_size: int = 1,
        max_size: int = 8,
        timeouts: Timeouts | None = None,
        replica_id: str = "",
    ) -> Database:
        """Connect (checking the cause of any failure), migrate `schema`, open the pool. With
        `replica_id` the connections are named `flynn-<service>/<replica id>` (application_name), so
        a replica taking over from a dead or frozen one can end that one's database sessions
        (flynn_runtime/fencing.py)."""
        if not schema.isidentifier() or not schema.islower():
            raise ValueError(f"schema name {schema!r} must be a lower-case identifier")
        t = timeouts or Timeouts()
        name = f"flynn-{service}/{replica_id}" if replica_id else f"flynn-{service}"
        conninfo = cls.conninfo(settings, schema, t, name[:63])
        try:
            conn = await psycopg.AsyncConnection.connect(conninfo)
        except psycopg.Error as e:
            raise DatabaseStartupError(describe_connect_error(settings, e)) from None
        try:
            version = await migrate(conn, schema, migrations)
        except SchemaTooNew as e:
            raise DatabaseStartupError(str(e)) from None
        except psycopg.OperationalError as e:
            raise DatabaseStartupError(describe_connect_error(settings, e)) from None
        except psycopg.Error as e:
            raise DatabaseStartupError(
                f"migrating schema {schema} on {settings.display()} failed: {e}"
            ) from None
        finally:
            await conn.close()
        pool = psycopg_pool.AsyncConnectionPool(
            conninfo=conninfo,
            min_size=min_size,
            max_size=max_size,
            open=False,
            timeout=t.acquire_seconds,
            reconnect_timeout=24 * 3600.0,
            check=check_quiet_connection,
            name=f"flynn-{service}",
        )
        try:
            await pool.open(wait=True, timeout=float(t.connect_seconds) + 1.0)
        except psycopg_pool.PoolTimeout:
            await pool.close()
            raise DatabaseStartupError(
                f"cannot open {min_size} connection(s) to {settings.display()} within {t.connect_seconds} s"
            ) from None
        db = cls(settings, schema, pool, t)
        db.schema_version = version
        log.info(
            "database ready",
            extra={"database": settings.display(), "schema": schema, "schema_version": version},
        )
        return db

    async def close(self) -> None:
        await self.pool.close()

    def _acquire_timeout(self) -> float:
        t = self.timeouts
        return t.acquire_seconds if self.reachable else min(t.acquire_seconds, t.acquire_when_down_seconds)

    def unavailable(self, e: BaseException) -> FlynnError:
        if isinstance(e, psycopg_pool.PoolTimeout):
            return database_unavailable(self.settings, "no connection within the acquire timeout")
        return database_unavailable(self.settings, describe_connect_error(self.settings, e))

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[psycopg.AsyncConnection[tuple[Any, ...]]]:
        """A pooled autocommit connection for reads; database failures become DATABASE_UNAVAILABLE."""
        try:
            async with self.pool.connection(timeout=self._acquire_timeout()) as conn:
                await conn.set_autocommit(True)
                yield conn
        except (psycopg.OperationalError, psycopg.InterfaceError, psycopg_pool.PoolTimeout) as e:
            raise self.unavailable(e) from e

    @asynccontextmanager
    async def transaction(
        self, *, pipeline: bool = False
    ) -> AsyncIterator[psycopg.AsyncConnection[tuple[Any, ...]]]:
        """BEGIN … COMMIT on a pooled connection; returns only after COMMIT succeeded (an ack means
        committed). Any exception rolls back; database failures become DATABASE_UNAVAILABLE.

        pipeline=True runs the transaction in libpq pipeline mode: statements whose results are not
        read are sent together (with BEGIN and COMMIT) instead of one round trip each."""
        try:
            async with self.pool.connection(timeout=self._acquire_timeout()) as conn:
                await conn.set_autocommit(False)
                if pipeline:
                    async with conn.pipeline(), conn.transaction():
                        yield conn
                else:
                    async with conn.transaction():
                        yield conn
        except (psycopg.OperationalError, psycopg.InterfaceError, psycopg_pool.PoolTimeout) as e:
            raise self.unavailable(e) from e

    async def read_int(self, sql: str, params: Sequence[object] = ()) -> int:
        """The first column of the first row of a read, as an int; 0 when there is no row."""
        async with self.connection() as c:
            row = await (await c.execute(sql, params)).fetchone()
        return int(row[0]) if row else 0


class PooledStore:
    """The base of a store over a service's `Database`: the runtime opens and closes the pool."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def close(self) -> None:
        """The pool belongs to the runtime, which closes it."""
