"""A real PostgreSQL 15 for tests: one server per test session, a fresh database per test.

    def test_x(postgres_url: str) -> None: …          # postgresql://flynn:…@127.0.0.1:<port>/t_<n>
    def test_y(postgres: PostgresFixture) -> None:   # the server itself: .kill(), .start(), .url(db)
    def test_z(database_url: str) -> None:           # once with "" (SQLite), once with PostgreSQL
    async def test_w(databases: Databases) -> None:  # await databases.open(url, service=…, schema=…, …)

The server is started by the fixtures (initdb + pg_ctl in a temp dir owned by the `postgres` user
when the tests run as root, 127.0.0.1 on a free port, fsync off: tests crash processes, not the
machine) and stopped at the end of the session. A test may crash it with `postgres.kill()`
(`pg_ctl stop -m immediate`) and bring it back with `postgres.start()`; the next test's fixture
restarts it if a test left it down. Skipped (not failed) only when the PostgreSQL binaries are absent,
which scripts/bootstrap.sh prevents.
"""

from __future__ import annotations

import itertools
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

import pytest

from flynn_launcher.local_postgres import LocalPostgres, find_bin_dir
from flynn_runtime.database import Database
from flynn_runtime.database_url import parse_database_url
from flynn_runtime.pg_migrations import Migration

PostgresFixture = LocalPostgres

_counter = itertools.count(1)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[LocalPostgres]:
    try:
        find_bin_dir()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    # Not under pytest's tmp_path: that is private to root, and the server runs as `postgres`.
    directory = Path(tempfile.mkdtemp(prefix="flynn-pg-"))
    directory.chmod(0o755)
    server = LocalPostgres(directory, fsync=False)
    server.init()
    server.start()
    try:
        yield server
    finally:
        try:
            server.stop("immediate")
        finally:
            shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def postgres(postgres_server: LocalPostgres) -> LocalPostgres:
    """The session's server, running (restarted if an earlier test left it stopped)."""
    if not postgres_server.running():
        postgres_server.start()
    postgres_server.wait_accepting()
    return postgres_server


@pytest.fixture
def postgres_url(postgres: LocalPostgres) -> Iterator[str]:
    """URL of a fresh, empty database on the session's server (dropped after the test)."""
    name = f"t_{next(_counter)}"
    url = postgres.create_database(name)
    yield url
    if postgres.running():
        postgres.drop_database(name)


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest) -> str:
    """Runs a test once per backend: "" (embedded SQLite) and then a fresh PostgreSQL database URL."""
    if request.param == "sqlite":
        return ""
    return str(request.getfixturevalue("postgres_url"))


class Databases:
    """The `Database` pools a test opens (one per store, as each replica or restart has its own),
    all closed when the test ends."""

    def __init__(self) -> None:
        self.opened: list[Database] = []

    async def open(self, url: str, *, service: str, schema: str, migrations: Sequence[Migration]) -> Database:
        db = await Database.open(
            parse_database_url(url), service=service, schema=schema, migrations=migrations
        )
        self.opened.append(db)
        return db


@pytest.fixture
async def databases() -> AsyncIterator[Databases]:
    opened = Databases()
    yield opened
    for db in opened.opened:
        await db.close()
