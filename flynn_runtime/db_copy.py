"""Moving state between the embedded SQLite files and PostgreSQL (`flynn db import` / `flynn db export`).

Each store contributes one `StoreCopier` next to its PostgreSQL backend (the module-level name
`COPIER`), so the code that knows a layout is the code that copies it:

    COPIER = StoreCopier(
        service="config", schema="flynn_config", migrations=MIGRATIONS,
        sqlite_files=("config/config.db",),          # relative to the service's --data-dir
        import_sqlite=import_config,                   # async (src: SqliteSource, db: Database) -> counts
        export_sqlite=export_config,                   # async (db: Database, dest: Path) -> counts
    )

and is listed in `COPIER_MODULES` (run control's queue store adds "queue_svc.store_pg" there; a module
that does not exist yet is skipped). An import runs the store's migrations, refuses a schema that
already holds data, and copies everything in one transaction per store, keeping ids, sequence numbers
and revision numbers. The services must be stopped while their state moves.
"""

from __future__ import annotations

import importlib
import json
import sqlite3
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from flynn_runtime.database import Database
from flynn_runtime.pg_migrations import Migration

#: Modules whose COPIER takes part, in the order they are copied.
COPIER_MODULES = (
    "config_svc.revision_store_pg",
    "queue_svc.store_pg",
    "reactions_svc.store_pg",
    "nodes_svc.node_store_pg",
)


class CopyError(Exception):
    """The copy cannot proceed; the message says why (non-empty target, missing file…)."""


@dataclass(frozen=True)
class SqliteSource:
    """The data dir of one service: where its SQLite files (and canvas blobs) are."""

    root: Path

    def path(self, relative: str) -> Path:
        return self.root / relative

    @contextmanager
    def open(self, relative: str) -> Iterator[sqlite3.Connection]:
        """The SQLite file read-only (its WAL included)."""
        path = self.path(relative)
        if not path.exists():
            raise CopyError(f"{path} does not exist")
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            yield conn
        finally:
            conn.close()


Counts = dict[str, int]


@dataclass(frozen=True)
class StoreCopier:
    service: str
    schema: str
    migrations: Sequence[Migration]
    #: Files of the store, relative to the service's data dir; the first one must exist to import.
    sqlite_files: tuple[str, ...]
    import_sqlite: Callable[[SqliteSource, Database], Awaitable[Counts]]
    export_sqlite: Callable[[Database, Path], Awaitable[Counts]]
    #: A query answering one row with one count: > 0 means the schema already holds data.
    nonempty_query: str = ""


def copiers(only: Sequence[str] = ()) -> list[StoreCopier]:
    """Every store's copier (those whose module exists), optionally limited to some services."""
    found: list[StoreCopier] = []
    for name in COPIER_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name is not None and name.startswith(e.name):
                continue  # that store has no PostgreSQL backend in this build
            raise
        copier = getattr(module, "COPIER", None)
        if isinstance(copier, StoreCopier) and (not only or copier.service in only):
            found.append(copier)
    return found


def service_dir(data_dir: Path, service: str, copier: StoreCopier) -> Path:
    """A service's own data dir (Kubernetes: /data) or a flynn-dev mesh dir with one subdir per service."""
    if (data_dir / copier.sqlite_files[0]).exists():
        return data_dir
    return data_dir / service


async def ensure_empty(db: Database, copier: StoreCopier) -> None:
    if not copier.nonempty_query:
        return
    async with db.connection() as c:
        row = await (await c.execute(copier.nonempty_query.encode())).fetchone()
    if row and int(row[0]) > 0:
        raise CopyError(
            f"schema {copier.schema} on {db.settings.display()} already holds {copier.service} data; "
            "import into an empty database (or drop the schema first)"
        )


@dataclass(frozen=True)
class Table:
    """One table copied column for column; `json` columns are JSON text in SQLite and JSONB in
    PostgreSQL, `flags` are 0/1 in SQLite and BOOLEAN in PostgreSQL, `serial` names the column whose
    PostgreSQL sequence must continue after the copied values."""

    name: str
    columns: tuple[str, ...]
    json: tuple[str, ...] = ()
    flags: tuple[str, ...] = ()
    serial: str = ""
    #: The SQLite expression of a column when it differs from its name (e.g. rowid).
    sqlite_exprs: tuple[tuple[str, str], ...] = ()
    #: JSON columns the SQLite store writes compactly (no spaces, UTF-8 kept), so an export is byte-equal.
    compact_json: tuple[str, ...] = ()
    #: The PostgreSQL table when its name differs from the SQLite one.
    pg_name: str = ""

    @property
    def target(self) -> str:
        """The table's name in PostgreSQL."""
        return self.pg_name or self.name


def _quoted(columns: Sequence[str]) -> str:
    return ", ".join(f'"{c}"' for c in columns)


async def import_tables(lite: sqlite3.Connection, db: Database, tables: Sequence[Table]) -> Counts:
    """Copy `tables` from SQLite into the (empty) schema of `db` in one transaction."""
    async with db.transaction() as c, c.cursor() as cur:
        return await copy_tables(lite, cur, db.schema, tables)


async def copy_tables(
    lite: sqlite3.Connection, cur: psycopg.AsyncCursor[Any], schema: str, tables: Sequence[Table]
) -> Counts:
    """Copy `tables` from SQLite through `cur`, inside the caller's transaction (a store that copies
    more than plain tables keeps everything in its one transaction)."""
    from psycopg import sql

    counts: Counts = {}
    for t in tables:
        exprs = dict(t.sqlite_exprs)
        select = "SELECT " + ", ".join(exprs.get(col, f'"{col}"') for col in t.columns) + f' FROM "{t.name}"'
        rows = lite.execute(select).fetchall()
        out = []
        for row in rows:
            values: list[object] = []
            for col, v in zip(t.columns, row, strict=True):
                # JSON columns go over as their SQLite text (an untyped literal PostgreSQL casts to
                # json or jsonb), so a json column keeps the exact text.
                if col in t.flags:
                    v = bool(v)
                values.append(v)
            out.append(tuple(values))
        insert = sql.SQL("INSERT INTO {} ({}) VALUES ({})").format(
            sql.Identifier(t.target),
            sql.SQL(", ").join(sql.Identifier(col) for col in t.columns),
            sql.SQL(", ").join(sql.Placeholder() for _ in t.columns),
        )
        if out:
            await cur.executemany(insert, out)
        if t.serial:
            await cur.execute(
                sql.SQL(
                    "SELECT setval(pg_get_serial_sequence(%s, %s), COALESCE((SELECT MAX({}) FROM {}), 0) + 1, false)"
                ).format(sql.Identifier(t.serial), sql.Identifier(t.target)),
                (f"{schema}.{t.target}", t.serial),
            )
        counts[t.name] = len(out)
    return counts


async def export_tables(db: Database, lite: sqlite3.Connection, tables: Sequence[Table]) -> Counts:
    """Copy `tables` from PostgreSQL into a SQLite file that has the store's schema (one transaction)."""
    from psycopg import sql

    counts: Counts = {}
    fetched: dict[str, list[tuple[object, ...]]] = {}
    async with db.connection() as c:
        for t in tables:
            query = sql.SQL("SELECT {} FROM {}").format(
                sql.SQL(", ").join(sql.Identifier(col) for col in t.columns), sql.Identifier(t.target)
            )
            fetched[t.name] = list(await (await c.execute(query)).fetchall())
    lite.execute("BEGIN IMMEDIATE")
    try:
        for t in tables:
            exprs = dict(t.sqlite_exprs)
            cols = [exprs.get(col, col) for col in t.columns]
            rows = []
            for row in fetched[t.name]:
                values: list[object] = []
                for col, v in zip(t.columns, row, strict=True):
                    if col in t.compact_json:
                        v = json.dumps(v, ensure_ascii=False, separators=(",", ":"))
                    elif col in t.json:
                        v = json.dumps(v)
                    elif col in t.flags:
                        v = int(bool(v))
                    values.append(v)
                rows.append(tuple(values))
            insert = f'INSERT INTO "{t.name}" ({_quoted(cols)}) VALUES ({", ".join("?" for _ in cols)})'
            lite.executemany(insert, rows)
            counts[t.name] = len(rows)
        lite.execute("COMMIT")
    except BaseException:
        lite.execute("ROLLBACK")
        raise
    return counts
