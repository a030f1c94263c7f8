"""bench/state_growth at a tiny scale, so that it cannot rot: both backends, every figure printed.

The figures themselves are not asserted (tests never assert on speed); what is checked is that the
bench runs end to end on SQLite and on a real PostgreSQL (its own throwaway server), that the
services read the fill (the bench asserts the config head and a filled artifact itself), and that
every row of the table is printed for both backends.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from bench.state_growth import rows

ROOT = Path(__file__).resolve().parents[2]


def test_state_growth_smoke_run_prints_every_figure_for_both_backends() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bench.state_growth", "--scale", "0.0002", "--acks", "5", "--puts", "3",
         "--samples", "2"],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-5000:] + out.stderr[-5000:]
    summary = out.stdout.split("state growth, every backend")[1]
    assert "SQLite: full = 20 sessions, 200 run events, 2 config revisions, 2 artifacts" in summary
    assert "PostgreSQL: full = 20 sessions, 200 run events, 2 config revisions, 2 artifacts" in summary
    for label, *_ in rows():
        assert summary.count(label) == 2, label
