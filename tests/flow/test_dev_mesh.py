"""`flynn-dev up` starts a mesh whose gateway reads every service's figures (it passes
--metrics-addrs), and the operator commands work against it with the printed token."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.gateway.test_launcher import Launcher, launched
from tests.support.flow import NO_GATE_FAILED
from tests.support.mesh import ROOT


@pytest.fixture
def dev_mesh(tmp_path: Path) -> Iterator[Launcher]:
    with launched(tmp_path / "data", []) as lch:
        yield lch


def flynn(lch: Launcher, *args: str) -> subprocess.CompletedProcess[str]:
    token = (lch.data_dir / "secrets" / "operator.token").read_text().strip()
    env = dict(
        os.environ,
        FLYNN_ADDR=f"127.0.0.1:{lch.base_port}",
        FLYNN_TOKEN=token,
        PYTHONPATH=f"{ROOT}:{ROOT / 'gen'}",
    )
    return subprocess.run(
        [sys.executable, "-m", "flynn_cli.main", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=ROOT,
    )


def test_flynn_dev_mesh_serves_system_metrics_and_the_gates(dev_mesh: Launcher) -> None:
    dev_mesh.wait_for("Stop: Ctrl-C")
    out = flynn(dev_mesh, "gates", "check", "--window", "0", "--json")
    assert out.returncode in NO_GATE_FAILED, out.stdout + out.stderr
    assert '"metrics_available"' in out.stdout and "unreachable" not in out.stdout
    dry = flynn(dev_mesh, "rollback", "voice", "--dry-run")
    assert dry.returncode == 0 and "dry run" in dry.stdout and "tts.enabled" in dry.stdout, (
        dry.stdout + dry.stderr
    )
    assert dev_mesh.stop() == 0
