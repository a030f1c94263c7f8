"""A throwaway PostgreSQL server in a directory: initdb + pg_ctl, 127.0.0.1 on a free port.

Used by `flynn-dev up --postgres` and by the test fixtures (tests/support/postgres.py). No system
service is involved: the cluster, its socket and its log all live in `directory`. initdb refuses to
run as root, so under root every PostgreSQL command runs as the `postgres` user (`runuser -u postgres
--`) and the directory is handed to that user. The superuser is `flynn` with a generated password
(scram-sha-256 on TCP), so the URL carries a real password like a production one.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg
from psycopg import sql

SUPERUSER = "flynn"


def find_bin_dir() -> Path:
    """/usr/lib/postgresql/<newest>/bin (Debian's postgresql package), or pg_ctl's dir on PATH."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name))
    if found:
        return found[-1].parent
    pg_ctl = shutil.which("pg_ctl")
    if pg_ctl:
        return Path(pg_ctl).parent
    raise FileNotFoundError(
        "PostgreSQL server binaries not found: run scripts/bootstrap.sh (installs postgresql)"
    )


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def usable_directory(wanted: Path) -> Path:
    """`wanted`, or a directory under /tmp named after it when the server could not use `wanted`: under
    root the server runs as `postgres`, which must be able to reach it (a 0700 home is not), and its
    socket path must stay short."""
    wanted = wanted.resolve()
    ok = len(str(wanted)) <= 80
    if ok and os.geteuid() == 0:
        probe = wanted
        while not probe.exists():
            probe = probe.parent
        r = subprocess.run(["runuser", "-u", "postgres", "--", "test", "-x", str(probe)], capture_output=True)
        ok = r.returncode == 0
    if ok:
        return wanted
    digest = hashlib.sha256(str(wanted).encode()).hexdigest()[:12]
    fallback = Path(tempfile.gettempdir()) / f"flynn-postgres-{digest}"
    fallback.mkdir(mode=0o755, exist_ok=True)
    return fallback


class LocalPostgres:
    def __init__(
        self, directory: Path, *, port: int = 0, fsync: bool = True, host: str = "127.0.0.1"
    ) -> None:
        self.directory = directory
        self.data = directory / "pgdata"
        self.log_file = directory / "postgres.log"
        self.host = host
        self.port = port or free_port(host)
        self.fsync = fsync
        self.bin = find_bin_dir()
        self._as_postgres = os.geteuid() == 0
        pw = directory / "superuser.password"
        self.password = pw.read_text().strip() if pw.exists() else secrets.token_hex(16)

    # commands ---------------------------------------------------------------------------------

    def _cmd(self, *args: str) -> list[str]:
        prefix = ["runuser", "-u", "postgres", "--"] if self._as_postgres else []
        return [*prefix, *args]

    def _run(self, *args: str, timeout: float = 60.0) -> None:
        r = subprocess.run(self._cmd(*args), capture_output=True, text=True, timeout=timeout)
        if r.returncode != 0:
            raise RuntimeError(
                f"{' '.join(args[:2])} failed ({r.returncode}): {r.stderr.strip() or r.stdout.strip()}"
            )

    def initialized(self) -> bool:
        return (self.data / "PG_VERSION").exists()

    def init(self) -> None:
        """initdb once (idempotent); the directory belongs to the server's user."""
        self.directory.mkdir(parents=True, exist_ok=True)
        if self.initialized():
            return
        pwfile = self.directory / "superuser.password"
        pwfile.write_text(self.password + "\n")
        pwfile.chmod(0o600)
        if self._as_postgres:
            shutil.chown(self.directory, "postgres", "postgres")
            shutil.chown(pwfile, "postgres", "postgres")
        self._run(
            str(self.bin / "initdb"),
            "-D",
            str(self.data),
            "-U",
            SUPERUSER,
            "--auth-host=scram-sha-256",
            "--auth-local=trust",
            f"--pwfile={pwfile}",
            "-E",
            "UTF8",
            "--no-instructions",
            timeout=180,
        )

    def start(self, timeout: float = 60.0) -> None:
        options = (
            f"-p {self.port} -h {self.host} -k {self.directory} -c max_connections=200"
            f" -c fsync={'on' if self.fsync else 'off'} -c shared_buffers=32MB"
        )
        self._run(
            str(self.bin / "pg_ctl"),
            "start",
            "-w",
            "-t",
            str(int(timeout)),
            "-D",
            str(self.data),
            "-l",
            str(self.log_file),
            "-o",
            options,
            timeout=timeout + 10,
        )

    def stop(self, mode: str = "fast") -> None:
        """pg_ctl stop -m fast|immediate (immediate = a crash: no checkpoint, recovery on start)."""
        if not self.running():
            return
        self._run(str(self.bin / "pg_ctl"), "stop", "-w", "-D", str(self.data), "-m", mode)

    def kill(self) -> None:
        self.stop("immediate")

    def restart(self) -> None:
        self.stop("fast")
        self.start()

    def running(self) -> bool:
        if not self.initialized():
            return False
        r = subprocess.run(
            self._cmd(str(self.bin / "pg_ctl"), "status", "-D", str(self.data)),
            capture_output=True,
            text=True,
        )
        return r.returncode == 0

    def wait_accepting(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with self.connect("postgres"):
                    return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    # databases --------------------------------------------------------------------------------

    def url(self, dbname: str, *, with_password: bool = True) -> str:
        auth = f"{SUPERUSER}:{self.password}" if with_password else SUPERUSER
        return f"postgresql://{auth}@{self.host}:{self.port}/{dbname}"

    def connect(self, dbname: str) -> psycopg.Connection[tuple[object, ...]]:
        return psycopg.connect(
            host=self.host,
            port=self.port,
            user=SUPERUSER,
            password=self.password,
            dbname=dbname,
            autocommit=True,
            connect_timeout=5,
        )

    def create_database(self, dbname: str) -> str:
        """CREATE DATABASE `dbname` (dropping an old one of that name); returns its URL."""
        with self.connect("postgres") as c:
            c.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(dbname)))
            c.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
        return self.url(dbname)

    def ensure_database(self, dbname: str) -> str:
        with self.connect("postgres") as c:
            row = c.execute("SELECT 1 FROM pg_database WHERE datname = %s", (dbname,)).fetchone()
            if row is None:
                c.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
        return self.url(dbname)

    def drop_database(self, dbname: str) -> None:
        with contextlib.suppress(psycopg.Error), self.connect("postgres") as c:
            c.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(dbname)))
