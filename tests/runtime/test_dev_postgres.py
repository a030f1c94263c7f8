"""`flynn-dev up --postgres`: a throwaway PostgreSQL in the data dir on a free port, every stateful
service pointed at it (one schema each), `flynn-dev status` SERVING, the server stopped on exit."""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from flynn_launcher.local_postgres import LocalPostgres
from tests.gateway.test_launcher import ROOT, Launcher, env, flynn_dev, free_base_port


@pytest.fixture
def data_dir() -> Iterator[Path]:
    # Not pytest's tmp_path (private to root): under root the server runs as `postgres`, which must reach it.
    d = Path(tempfile.mkdtemp(prefix="flynn-dev-pg-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_up_postgres(data_dir: Path) -> None:
    lch = Launcher(
        data_dir / "data", free_base_port(), ["--postgres", "--only", "config,reactions,nodes"]
    ).start()
    try:
        lch.wait_for("Flynn mesh is up", timeout=180)
        pg_line = next(line for line in lch.lines if line.startswith("[flynn-dev] PostgreSQL postgresql://"))
        url = pg_line.split()[2]
        assert (data_dir / "data" / "postgres" / "pgdata" / "PG_VERSION").exists()
        password = (data_dir / "data" / "secrets" / "database.password").read_text().strip()
        assert oct((data_dir / "data" / "secrets" / "database.password").stat().st_mode & 0o777) == "0o600"
        with psycopg.connect(url, password=password) as c:
            schemas = {
                r[0]
                for r in c.execute(
                    "SELECT schema_name FROM information_schema.schemata WHERE schema_name LIKE 'flynn_%'"
                )
            }
            assert schemas == {"flynn_config", "flynn_reactions", "flynn_nodes"}
            assert c.execute("SELECT count(*) FROM flynn_config.revisions").fetchone() == (1,)
        status = _status(lch)
        for svc in ("config", "reactions", "nodes"):
            assert any(
                line.split()[:1] == [svc] and "SERVING" in line for line in status.stdout.splitlines()
            ), status.stdout
        assert lch.stop() == 0
        assert "[flynn-dev] PostgreSQL stopped" in lch.lines
        assert not LocalPostgres(data_dir / "data" / "postgres").running()
    finally:
        _leave_nothing_running(lch, data_dir)


def test_up_postgres_with_two_replicas_of_each_stateful_service(data_dir: Path) -> None:
    lch = Launcher(
        data_dir / "data",
        free_base_port(),
        ["--postgres", "--replicas", "2", "--only", "config,queue,reactions,nodes,gateway"],
    ).start()
    try:
        lch.wait_for("Flynn mesh is up", timeout=240)
        state = lch.state()
        stateful = ("config", "queue", "reactions", "nodes")
        assert set(state) == {*stateful, *(f"{s}-2" for s in stateful), "gateway"}
        status = _status(lch)
        rows = {
            line.split()[0]: line
            for line in status.stdout.splitlines()[1:]
            if line.split() and not line.startswith("config head revision")
        }
        for name in (*stateful, *(f"{s}-2" for s in stateful), "gateway"):
            assert name in rows and "SERVING" in rows[name], status.stdout
        # The gateway reports each service once, its address the list of replicas it spreads calls over.
        assert rows["config"].split()[1] == f"{state['config']['address']},{state['config-2']['address']}"
        # And every replica as it recorded itself in the database: two ready ones per service, each
        # matched to its process by the address it advertises.
        deadline = time.monotonic() + 30
        while True:
            listed = [line.split() for line in status.stdout.splitlines() if line.startswith("replica ")]
            ready = {s: sorted(r[2] for r in listed if r[1] == s and r[5] == "READY") for s in stateful}
            if all(ready[s] == [s, f"{s}-2"] for s in stateful) or time.monotonic() > deadline:
                break
            time.sleep(1)
            status = subprocess.run(
                [*flynn_dev(), "status", "--data-dir", str(lch.data_dir), "--base-port", str(lch.base_port)],
                capture_output=True, text=True, timeout=60, cwd=ROOT, env=env(),
            )  # fmt: skip
        assert all(ready[s] == [s, f"{s}-2"] for s in stateful), status.stdout
        assert lch.stop() == 0
    finally:
        _leave_nothing_running(lch, data_dir)


def _status(lch: Launcher) -> subprocess.CompletedProcess[str]:
    """`flynn-dev status` of the launcher's mesh."""
    return subprocess.run(
        [*flynn_dev(), "status", "--data-dir", str(lch.data_dir), "--base-port", str(lch.base_port)],
        capture_output=True, text=True, timeout=60, cwd=ROOT, env=env(),
    )  # fmt: skip


def _leave_nothing_running(lch: Launcher, data_dir: Path) -> None:
    """After a test, pass or fail: the launcher stopped, its PostgreSQL stopped, no child left."""
    if lch.proc is not None and lch.proc.poll() is None:
        lch.proc.send_signal(signal.SIGTERM)
        try:
            lch.proc.wait(60)
        except subprocess.TimeoutExpired:
            lch.proc.kill()
    server = LocalPostgres(data_dir / "data" / "postgres")
    if server.running():
        server.stop("immediate")
    lch.kill_children()
