"""`flynn db import` / `flynn db export`: move a mesh's state between SQLite files and PostgreSQL.

    flynn db import --data-dir ./.flynn-data --database-url postgresql://flynn@db:5432/flynn
    flynn db export --database-url postgresql://flynn@db:5432/flynn --data-dir ./restored

`--data-dir` is a flynn-dev data dir (one subdirectory per service) or one service's own data dir
(a pod's /data). Stop the services first. Each store copies itself (flynn_runtime/db_copy.py); an
import refuses a schema that already holds data, an export refuses to overwrite existing files.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path
from typing import Any

from flynn_runtime.database import Database, Timeouts
from flynn_runtime.database_url import DatabaseSettingError, parse_database_url
from flynn_runtime.db_copy import CopyError, SqliteSource, copiers, ensure_empty, service_dir

#: A copy reads SQLite inside its PostgreSQL transaction (a large table takes a while) and may run
#: long statements: neither is a paused replica, so no idle-in-transaction or statement limit.
COPY_TIMEOUTS = Timeouts(statement_ms=0, idle_in_transaction_ms=0)


def register(sub: Any) -> None:
    p = sub.add_parser("db", help="move state between the embedded SQLite files and PostgreSQL")
    cmds = p.add_subparsers(dest="db_command", metavar="<command>")
    cmds.required = True
    for name, func, text in (
        ("import", cmd_import, "copy a SQLite data dir into an empty PostgreSQL database"),
        ("export", cmd_export, "copy a PostgreSQL database into a new SQLite data dir"),
    ):
        c = cmds.add_parser(name, help=text)
        c.add_argument(
            "--data-dir", type=Path, required=True, help="flynn-dev data dir or one service's /data"
        )
        c.add_argument(
            "--database-url",
            default=os.environ.get("FLYNN_DATABASE_URL", ""),
            help="postgresql://user@host:port/dbname (FLYNN_DATABASE_URL)",
        )
        c.add_argument(
            "--database-password-file",
            type=Path,
            default=Path(pw) if (pw := os.environ.get("FLYNN_DATABASE_PASSWORD_FILE")) else None,
            help="file holding the password (FLYNN_DATABASE_PASSWORD_FILE)",
        )
        c.add_argument(
            "--only", default="", help="comma-separated services (config, queue, reactions, nodes)"
        )
        c.set_defaults(func=func)


def _only(args: argparse.Namespace) -> list[str]:
    return [s.strip() for s in args.only.split(",") if s.strip()]


def cmd_import(args: argparse.Namespace) -> int:
    return _run(_import(args))


def cmd_export(args: argparse.Namespace) -> int:
    return _run(_export(args))


def _run(coro: Any) -> int:
    try:
        return int(asyncio.run(coro))
    except (DatabaseSettingError, CopyError) as e:
        print(f"flynn db: {e}", file=sys.stderr)
        return 2


async def _import(args: argparse.Namespace) -> int:
    settings = parse_database_url(args.database_url, args.database_password_file)
    todo = []
    for copier in copiers(_only(args)):
        root = service_dir(args.data_dir, copier.service, copier)
        if not (root / copier.sqlite_files[0]).exists():
            print(f"{copier.service}: no {copier.sqlite_files[0]} under {args.data_dir}; skipped")
            continue
        todo.append((copier, root))
    if not todo:
        raise CopyError(f"no store files found under {args.data_dir}")
    for copier, root in todo:
        db = await Database.open(
            settings,
            service="cli",
            schema=copier.schema,
            migrations=copier.migrations,
            timeouts=COPY_TIMEOUTS,
        )
        try:
            await ensure_empty(db, copier)
            counts = await copier.import_sqlite(SqliteSource(root), db)
        finally:
            await db.close()
        print(f"{copier.service}: imported " + ", ".join(f"{n} {k}" for k, n in counts.items()))
    return 0


async def _export(args: argparse.Namespace) -> int:
    settings = parse_database_url(args.database_url, args.database_password_file)
    for copier in copiers(_only(args)):
        dest = args.data_dir / copier.service
        existing = [dest / f for f in copier.sqlite_files if (dest / f).exists()]
        if existing:
            raise CopyError(f"{existing[0]} already exists; export into a new data dir")
        db = await Database.open(
            settings,
            service="cli",
            schema=copier.schema,
            migrations=copier.migrations,
            timeouts=COPY_TIMEOUTS,
        )
        try:
            counts = await copier.export_sqlite(db, dest)
        finally:
            await db.close()
        print(f"{copier.service}: exported " + ", ".join(f"{n} {k}" for k, n in counts.items()))
    return 0
