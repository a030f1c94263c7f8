"""flynn-dev as an operator meets it on a non-default data dir and port range: every command the
banner prints works as printed (from any directory, with a bare PATH), `flynn-dev status` shows pids
and reports services left out with --only as not deployed, and the README's quick tour runs from
the two variables it sets once."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.gateway.test_launcher import flynn_dev, free_base_port
from tests.support.mesh import ROOT

STARTED = ("config", "queue", "nodes", "gateway")
LEFT_OUT = ("reactions", "voice")
BARE = dict(os.environ, PATH="/usr/bin:/bin")


class Up:
    def __init__(self, cwd: Path, data_dir: str, base_port: int) -> None:
        self.cwd, self.base_port = cwd, base_port
        self.data_dir = (cwd / data_dir).resolve()
        self.lines: list[str] = []
        cmd = [
            *flynn_dev(), "up", "--data-dir", data_dir, "--base-port", str(base_port),
            "--grace-seconds", "5", "--only", ",".join(STARTED),
        ]  # fmt: skip
        env = dict(os.environ, PATH=f"{Path(flynn_dev()[0]).parent}{os.pathsep}{os.environ['PATH']}")
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd, env=env
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_up(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            if any(line.startswith("Stop: Ctrl-C") for line in self.lines):
                return
            time.sleep(0.05)
        raise AssertionError("mesh did not come up:\n" + "\n".join(self.lines))

    def after(self, prefix: str) -> str:
        i = next(i for i, line in enumerate(self.lines) if line.startswith(prefix))
        return self.lines[i + 1].strip()

    def pids(self) -> dict[str, int]:
        state = json.loads((self.data_dir / "mesh.json").read_text())
        return {s["name"]: int(s["pid"]) for s in state["services"]}

    def stop(self) -> None:
        pids = []
        try:
            pids = list(self.pids().values())
        except (FileNotFoundError, ValueError):
            pass
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(90)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture
def up(tmp_path: Path) -> Iterator[Up]:
    work = tmp_path / "work"
    work.mkdir()
    # A relative data dir with a space in it, on a port range that is not the default.
    u = Up(work, "my mesh", free_base_port())
    try:
        u.wait_up()
        yield u
    finally:
        u.stop()


def _sh(line: str, cwd: str = "/") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-c", line], capture_output=True, text=True, timeout=120, env=BARE, cwd=cwd
    )


def test_every_printed_command_works_as_printed(up: Up) -> None:
    first = subprocess.run(
        shlex.split(up.after("First call")), capture_output=True, text=True, timeout=60, env=BARE, cwd="/"
    )
    assert first.returncode == 0, first.stderr
    status = {s["service"]: s["health"] for s in json.loads(first.stdout)["services"]}
    assert all(status[n] == "SERVICE_HEALTH_SERVING" for n in STARTED), status
    assert all(status[n] == "SERVICE_HEALTH_NOT_DEPLOYED" for n in LEFT_OUT), status

    # The operator CLI lines: the export, then a flynn command, in a fresh shell elsewhere.
    i = next(i for i, line in enumerate(up.lines) if line.startswith("Operator CLI"))
    export, cli = up.lines[i + 1].strip(), up.lines[i + 2].strip()
    assert f"FLYNN_ADDR=127.0.0.1:{up.base_port}" in export
    out = _sh(f"{export}; {cli}")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "mode" in out.stdout

    # Status, as printed: pids, and the services left out reported as not deployed (exit 0).
    status_line = next(line for line in up.lines if line.startswith("Status: ")).removeprefix("Status: ")
    assert f"--base-port {up.base_port}" in status_line and str(up.data_dir) in shlex.split(status_line)
    st = subprocess.run(
        shlex.split(status_line), capture_output=True, text=True, timeout=60, env=BARE, cwd="/"
    )
    assert st.returncode == 0, st.stdout + st.stderr
    rows = {
        line.split()[0]: line.split()
        for line in st.stdout.splitlines()[1:]
        if line and not line.startswith("config head")
    }
    assert st.stdout.splitlines()[0].split()[:4] == ["service", "address", "pid", "health"], st.stdout
    for name, pid in up.pids().items():
        assert rows[name][2] == str(pid) and rows[name][3] == "SERVING", (name, rows[name])
    for name in LEFT_OUT:
        assert rows[name][3] == "NOT_DEPLOYED", rows[name]

    # The same status command still finds the mesh without its mesh.json (from --base-port alone).
    state = up.data_dir / "mesh.json"
    saved = state.read_text()
    state.unlink()
    try:
        again = subprocess.run(
            shlex.split(status_line), capture_output=True, text=True, timeout=60, env=BARE, cwd="/"
        )
    finally:
        state.write_text(saved)
    # (Without mesh.json it cannot know the console was left out: only the gRPC rows are asserted.)
    assert re.search(rf"^gateway\s+127\.0\.0\.1:{up.base_port}\s+-\s+SERVING", again.stdout, re.M), (
        again.stdout
    )


def test_readme_quick_tour_runs_from_its_two_variables(up: Up) -> None:
    readme = (ROOT / "README.md").read_text()
    tour = readme[readme.index("## Quick tour") :]
    block = tour[tour.index("```sh") + 5 : tour.index("```", tour.index("```sh") + 5)]
    lines = [
        line for line in block.replace("\\\n", " ").splitlines() if line.strip() and not line.startswith("#")
    ]
    exports = [line for line in lines if line.startswith("export ")]
    assert exports[0].startswith("export FLYNN_DATA=") and "FLYNN_ADDR=" in exports[0]
    # Set once: only the first line names the mesh, so only it changes for another one.
    assert all("50050" not in line and ".flynn-data" not in line for line in lines if line != exports[0])
    exports[0] = f"export FLYNN_DATA={shlex.quote(str(up.data_dir))} FLYNN_ADDR=127.0.0.1:{up.base_port}"
    wanted = [
        next(line for line in lines if line.startswith("TOK=")),
        'test -n "$TOK"',
        next(line for line in lines if line.startswith("flynn config get")),
        next(line for line in lines if line.startswith("flynn config explain")),
    ]
    script = "set -e\n" + "\n".join(exports + wanted)
    out = subprocess.run(
        ["bash", "-c", script], capture_output=True, text=True, timeout=180, env=BARE, cwd=ROOT
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "server.queue.mode = " in out.stdout, out.stdout
