"""The console process: `python -m console.main` (flynn-console).

Serves the operator web console over HTTP on --http-listen (FLYNN_HTTP_LISTEN, default
127.0.0.1:50080) and reads everything through the gateway at --gateway-addr (FLYNN_GATEWAY_ADDR) with
the signed-in operator's token. With --database-url (FLYNN_DATABASE_URL) the sign-in sessions live in
PostgreSQL (console/session_store_pg.py), so a restart or a second replica signs nobody out. --audit-dir (repeatable, FLYNN_AUDIT_DIRS colon-separated) names the
audit directories the Audit view tails; by default the <service>/audit siblings of --data-dir, which
is where flynn-dev puts every service's audit log.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

import grpc
from aiohttp import web

from console import audit_tail
from console.mesh_client import MeshClient
from console.session_store_pg import MIGRATIONS, SCHEMA, PgSessions
from console.web import ConsoleState, build_app
from flynn_runtime import logs, settings, tls
from flynn_runtime.audit import AuditLog
from flynn_runtime.auth import parse_networks
from flynn_runtime.database import Database
from flynn_runtime.database_url import DatabaseSettingError, database_from_settings
from flynn_runtime.settings import DEFAULT_PORTS, Settings

log = logging.getLogger("console")

DEFAULT_HTTP_PORT = 50080


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--http-listen",
        default=os.environ.get("FLYNN_HTTP_LISTEN", f"127.0.0.1:{DEFAULT_HTTP_PORT}"),
        help="HTTP host:port of the console (FLYNN_HTTP_LISTEN)",
    )
    p.add_argument(
        "--gateway-addr",
        default=os.environ.get("FLYNN_GATEWAY_ADDR", f"127.0.0.1:{DEFAULT_PORTS['gateway']}"),
        help="gRPC address of the gateway the console reads through (FLYNN_GATEWAY_ADDR)",
    )
    p.add_argument(
        "--audit-dir",
        action="append",
        default=None,
        help="audit directory to tail (repeatable; FLYNN_AUDIT_DIRS, colon-separated; default: the "
        "<service>/audit siblings of --data-dir)",
    )
    p.add_argument(
        "--secure-cookie",
        action="store_true",
        default=os.environ.get("FLYNN_SECURE_COOKIE", "") == "1",
        help="mark the session cookie Secure (set when the console is served behind HTTPS; FLYNN_SECURE_COOKIE=1)",
    )


def audit_dirs(s: Settings) -> list[Path]:
    flags = s.extra.get("audit_dir")
    given = [str(d) for d in flags] if isinstance(flags, list) else []
    given = given or [d for d in os.environ.get("FLYNN_AUDIT_DIRS", "").split(":") if d]
    if given:
        return [Path(d) for d in given]
    return audit_tail.default_audit_dirs(s.data_dir)


def split_hostport(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


async def serve(s: Settings) -> None:
    s.data_dir.mkdir(parents=True, exist_ok=True)
    dirs = audit_dirs(s)
    own = s.data_dir / "audit"
    if own.resolve() not in [d.resolve() for d in dirs]:
        dirs.append(own)
    state = ConsoleState(
        mesh=MeshClient(str(s.extra["gateway_addr"]), s.max_message_bytes, gateway_credentials(s)),
        audit=AuditLog(s.data_dir, "console"),
        audit_dirs=dirs,
        secure_cookie=bool(s.extra.get("secure_cookie")),
        trusted_proxies=parse_networks(s.trusted_proxies),
    )
    db: Database | None = None
    database = database_from_settings(s)
    if database is not None:
        # Sign-in sessions in the database: a restart or another console replica signs nobody out.
        db = await Database.open(
            database, service="console", schema=SCHEMA, migrations=MIGRATIONS, max_size=4
        )
        state.sessions = PgSessions(db)
    app = build_app(state)
    runner = web.AppRunner(app, shutdown_timeout=s.grace_seconds, handle_signals=False)
    await runner.setup()
    host, port = split_hostport(str(s.extra["http_listen"]))
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = port
    server: Any = site._server  # aiohttp exposes the bound port (for port 0) only here
    if server is not None and getattr(server, "sockets", None):
        bound = int(server.sockets[0].getsockname()[1])
    if s.port_file is not None:
        s.port_file.write_text(f"{bound} 0\n")
    log.info(
        "console serving",
        extra={
            "http": f"{host}:{bound}",
            "gateway": s.extra["gateway_addr"],
            "audit_dirs": [str(d) for d in dirs],
        },
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("console stopping")
    state.stopping.set()
    await runner.cleanup()
    if db is not None:
        await db.close()


def gateway_credentials(s: Settings) -> grpc.ChannelCredentials | None:
    """TLS to the gateway when --tls-ca-file is set: verified with that CA, or with the system's roots
    when the file is absent (a public certificate whose Secret carries no ca.crt)."""
    if s.tls.ca_file is None:
        return None
    if not s.tls.ca_file.exists():
        return grpc.ssl_channel_credentials()
    return tls.caller_credentials(str(s.tls.ca_file))


def main() -> None:
    s = settings.parse("console", add_args=add_args)
    logs.configure("console", s.log_level)
    try:
        asyncio.run(serve(s))
    except DatabaseSettingError as e:
        print(f"flynn-console: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
