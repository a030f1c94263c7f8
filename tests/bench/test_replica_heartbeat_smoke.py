"""bench/replica_heartbeat at a tiny scale, so that it cannot rot: it runs on its own throwaway
PostgreSQL and prints every row (the figures themselves are not asserted: tests never assert on speed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_replica_heartbeat_smoke_run_prints_every_row() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bench.replica_heartbeat", "--beats", "5", "--replicas", "3"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-5000:] + out.stderr[-5000:]
    for label in ("renewal alone (before)", "renewal + heartbeat (now)", "ListReplicas read"):
        assert label in out.stdout, out.stdout
    assert "3 rows" in out.stdout
