"""A stateful service started against a database it cannot use exits non-zero with ONE line naming
the cause (no traceback): malformed URL, wrong password, refused connection, schema newer than the code.
Two processes starting at once against an empty database both start, and migrate it once."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
import pytest

from config_svc.revision_store_pg import MIGRATIONS as CONFIG_MIGRATIONS
from flynn_launcher.local_postgres import LocalPostgres, free_port
from reactions_svc.store_pg import MIGRATIONS as REACTIONS_MIGRATIONS
from tests.support.mesh import ServiceProcess, Tokens

ROOT = Path(__file__).resolve().parents[2]


def start(service: str, tmp_path: Path, tokens: Tokens, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLYNN_")}
    env["PYTHONPATH"] = f"{ROOT}:{ROOT / 'gen'}"
    cmd = [
        sys.executable, "-m", f"{service}_svc.main",
        "--listen", "127.0.0.1:0", "--data-dir", str(tmp_path / service), "--tokens-file", str(tokens.path),
        *args,
    ]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env, cwd=ROOT)


def one_line(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    # JSON log records (e.g. "metrics listening") may come first; the error is one plain line, the last.
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith("{")]
    assert len(lines) == 1 and proc.stderr.rstrip().endswith(lines[0]), proc.stderr
    return lines[0]


@pytest.mark.parametrize("service", ["config", "reactions", "nodes"])
def test_malformed_url(service: str, tmp_path: Path, tokens: Tokens) -> None:
    line = one_line(start(service, tmp_path, tokens, "--database-url", "mysql://flynn@db/flynn"))
    assert line == f"flynn-{service}: --database-url must start with postgresql:// (got scheme 'mysql')"


def test_wrong_password_refused_connection_and_missing_password_file(
    tmp_path: Path, tokens: Tokens, postgres: LocalPostgres, postgres_url: str
) -> None:
    bad = tmp_path / "bad.password"
    bad.write_text("not-the-password\n")
    url = postgres_url.replace(f":{postgres.password}@", "@")
    line = one_line(
        start("config", tmp_path, tokens, "--database-url", url, "--database-password-file", str(bad))
    )
    assert "wrong password for user 'flynn'" in line and postgres.password not in line

    refused = url.replace(f":{postgres.port}/", f":{free_port()}/")
    line = one_line(start("config", tmp_path, tokens, "--database-url", refused))
    assert "connection refused by 127.0.0.1:" in line

    line = one_line(
        start(
            "nodes",
            tmp_path,
            tokens,
            "--database-url",
            url,
            "--database-password-file",
            str(tmp_path / "nope"),
        )
    )
    assert "cannot read the database password file" in line


def test_schema_newer_than_the_code(tmp_path: Path, tokens: Tokens, postgres_url: str) -> None:
    with psycopg.connect(postgres_url, autocommit=True) as c:
        c.execute("CREATE SCHEMA flynn_reactions")
        c.execute(
            "CREATE TABLE flynn_reactions.schema_version (version INTEGER PRIMARY KEY, description TEXT NOT NULL,"
            " applied_at TIMESTAMPTZ NOT NULL DEFAULT now(), applied_by TEXT NOT NULL)"
        )
        c.execute("INSERT INTO flynn_reactions.schema_version VALUES (99, 'from the future', now(), 'test')")
    line = one_line(start("reactions", tmp_path, tokens, "--database-url", postgres_url, "--consume", ""))
    known = len(REACTIONS_MIGRATIONS)
    assert f"schema flynn_reactions is at version 99 but this Flynn knows versions up to {known}" in line


def test_two_config_processes_starting_at_once_on_an_empty_database(
    tmp_path: Path, tokens: Tokens, postgres_url: str
) -> None:
    """Both serve; the schema was migrated once and the history seeded once."""
    procs = [
        ServiceProcess(
            "config",
            "config_svc.main",
            tmp_path / f"config{i}",
            tokens,
            extra=["--database-url", postgres_url],
        )
        for i in range(2)
    ]
    try:
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda p: p.start(timeout=60), procs))
        with psycopg.connect(postgres_url) as c:
            # Each migration recorded once (not once per process).
            assert c.execute(
                "SELECT count(*), count(DISTINCT version) FROM flynn_config.schema_version"
            ).fetchone() == (len(CONFIG_MIGRATIONS), len(CONFIG_MIGRATIONS))
            assert c.execute("SELECT revision, kind FROM flynn_config.revisions").fetchall() == [(1, 1)]
    finally:
        for p in procs:
            p.stop()
