"""flynn-dev up/status as a real subprocess on a free port range: banner, working grpcurl line,
the operator console's URL and /healthz, status, crash restart, same operator token after a restart,
clean SIGTERM stop."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.mesh import ROOT, wait_serving

VENV_BIN = Path(sys.executable).parent


def free_base_port() -> int:
    """A base port whose service ports (base..base+5), console port (base+30) and metrics ports
    (base+100..) are all free."""
    for _ in range(100):
        base = random.randrange(20000, 40000, 10)
        try:
            for port in [*range(base, base + 6), base + 30, *range(base + 100, base + 106)]:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise RuntimeError("no free port range")


def flynn_dev() -> list[str]:
    script = VENV_BIN / "flynn-dev"
    return [str(script)] if script.exists() else [sys.executable, "-m", "flynn_launcher.main"]


def env() -> dict[str, str]:
    return dict(os.environ, PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")


@dataclass
class Launcher:
    data_dir: Path
    base_port: int
    args: list[str]
    proc: subprocess.Popen[str] | None = None
    lines: list[str] = field(default_factory=list)

    def start(self) -> Launcher:
        cmd = [
            *flynn_dev(), "up", "--data-dir", str(self.data_dir), "--base-port", str(self.base_port),
            "--grace-seconds", "5", *self.args,
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=env()
        )
        threading.Thread(target=self._read, daemon=True).start()
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, text: str, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(text in line for line in self.lines):
                return
            assert self.proc is not None
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"{text!r} not printed; output:\n" + "\n".join(self.lines))

    def state(self) -> dict[str, dict[str, object]]:
        data = json.loads((self.data_dir / "mesh.json").read_text())
        return {s["name"]: s for s in data["services"]}

    def stop(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=90)

    def kill_children(self) -> None:
        """SIGKILL every service the launcher's state file names: none is left behind, whatever happened."""
        for pid in _child_pids(self):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@contextlib.contextmanager
def launched(data_dir: Path, args: list[str]) -> Iterator[Launcher]:
    """`flynn-dev up` on a free base port, stopped with SIGTERM afterwards and no child left behind."""
    lch = Launcher(data_dir, free_base_port(), args).start()
    try:
        yield lch
    finally:
        if lch.proc is not None and lch.proc.poll() is None:
            lch.stop()
        lch.kill_children()


@pytest.fixture
def launcher(tmp_path: Path) -> Iterator[Launcher]:
    lch = Launcher(tmp_path / "data", free_base_port(), ["--skip-missing"]).start()
    try:
        yield lch
    finally:
        if lch.proc is not None and lch.proc.poll() is None:
            lch.proc.kill()
            lch.proc.wait(30)
        lch.kill_children()


def _child_pids(lch: Launcher) -> list[int]:
    try:
        return [int(str(s["pid"])) for s in lch.state().values()]
    except FileNotFoundError:
        return []


def http_get(url: str) -> tuple[int, str]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=10) as resp:
        return resp.status, resp.read().decode()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purposes.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_up_status_restart_and_stop(launcher: Launcher) -> None:
    launcher.wait_for("Stop: Ctrl-C")
    out = "\n".join(launcher.lines)
    state = launcher.state()
    assert {"config", "gateway", "console"} <= set(state), out
    gw = f"127.0.0.1:{launcher.base_port}"
    assert state["gateway"]["address"] == gw
    assert state["config"]["address"] == f"127.0.0.1:{launcher.base_port + 1}"
    for name, s in state.items():
        row = next(line for line in launcher.lines if line.strip().startswith(name + " "))
        assert str(s["address"]) in row and str(s["pid"]) in row, row
        assert (str(s["metrics_port"]) if name != "console" else " - ") in row, row
    # The console started after the gateway, and the banner prints its URL, whose /healthz answers.
    assert list(state)[-1] == "console" and list(state).index("gateway") < list(state).index("console")
    console_url = f"http://127.0.0.1:{launcher.base_port + 30}"
    assert state["console"]["address"] == f"127.0.0.1:{launcher.base_port + 30}"
    assert f"Console: {console_url} (sign in with the operator token)" in out
    assert http_get(f"{console_url}/healthz") == (200, "ok")
    # It serves its sign-in page, and reads the mesh through the gateway with the operator's token.
    assert http_get(f"{console_url}/signin")[0] == 200

    # The operator token is printed and kept (0600) for the next start.
    token_file = launcher.data_dir / "secrets" / "operator.token"
    token = token_file.read_text().strip()
    assert f"Operator token: {token}" in out
    assert token_file.stat().st_mode & 0o777 == 0o600
    assert token not in (launcher.data_dir / "secrets" / "tokens.yaml").read_text()  # hashes only

    # The printed grpcurl line works as printed, from a shell whose PATH lacks the virtualenv
    # (the launcher itself runs with it, as scripts/run-mesh does).
    idx = next(i for i, line in enumerate(launcher.lines) if line.startswith("First call"))
    bare_env = dict(os.environ, PATH="/usr/bin:/bin")
    call = subprocess.run(
        shlex.split(launcher.lines[idx + 1]),
        capture_output=True,
        text=True,
        timeout=60,
        env=bare_env,
        cwd="/",
    )
    assert call.returncode == 0, call.stderr
    services = {s["service"]: s for s in json.loads(call.stdout)["services"]}
    for name in set(state) - {"console"}:
        assert services[name]["health"] == "SERVICE_HEALTH_SERVING", services[name]

    # flynn-dev status shows each service's health and config revision.
    status_line = next(line for line in launcher.lines if line.startswith("Status: "))
    st = subprocess.run(
        shlex.split(status_line.removeprefix("Status: ")),
        capture_output=True, text=True, timeout=60, env=bare_env, cwd=ROOT,
    )  # fmt: skip
    assert st.returncode == 0, st.stdout + st.stderr
    assert "config rev" in st.stdout and "config head revision:" in st.stdout
    for name in state:
        assert any(line.startswith(name) and "SERVING" in line for line in st.stdout.splitlines()), st.stdout

    # A killed service is restarted.
    victim = "config"
    old_pid = int(str(state[victim]["pid"]))
    os.kill(old_pid, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        new_pid = int(str(launcher.state()[victim]["pid"]))
        if new_pid != old_pid:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("config was not restarted:\n" + "\n".join(launcher.lines))
    wait_serving(str(state[victim]["address"]), timeout=60)
    launcher.wait_for(f"{victim} restarted")

    # The console is supervised like the others: killed, it is restarted and answers /healthz again.
    old_console = int(str(state["console"]["pid"]))
    os.kill(old_console, signal.SIGKILL)
    launcher.wait_for("console restarted", timeout=60)
    deadline = time.monotonic() + 60
    while True:
        try:
            assert http_get(f"{console_url}/healthz") == (200, "ok")
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    assert int(str(launcher.state()["console"]["pid"])) != old_console
    # Its Audit view tails the services' audit logs: <mesh data>/<service>/audit, found next to its data dir.
    config_audit = str((launcher.data_dir / "config" / "audit").resolve())
    assert config_audit in (launcher.data_dir / "logs" / "console.log").read_text()

    # SIGTERM stops everything cleanly, exit 0.
    pids = _child_pids(launcher)
    assert launcher.stop() == 0, "\n".join(launcher.lines)
    assert not [p for p in pids if _alive(p)]
    assert "stopped" in launcher.lines[-1]
    # Ordered stop: the console (started last) first, and it exits cleanly on SIGTERM.
    stops = [line for line in launcher.lines if line.startswith("[flynn-dev] stopping ")]
    assert stops and "stopping console" in stops[0], stops
    assert "[flynn-dev] console stopped (exit code 0)" in launcher.lines, "\n".join(launcher.lines)
    assert "console stopping" in (launcher.data_dir / "logs" / "console.log").read_text()


def test_restart_prints_the_same_operator_token(tmp_path: Path) -> None:
    data = tmp_path / "data"
    tokens = []
    for _ in range(2):
        lch = Launcher(data, free_base_port(), ["--only", "config"]).start()
        try:
            lch.wait_for("Stop: Ctrl-C")
            tokens.append(next(line for line in lch.lines if line.startswith("Operator token: ")))
            # Without a gateway, status falls back to checking each service directly.
            st = subprocess.run(
                [*flynn_dev(), "status", "--data-dir", str(data)],
                capture_output=True, text=True, timeout=60, env=env(), cwd=ROOT,
            )  # fmt: skip
            assert st.returncode == 0, st.stdout + st.stderr
            assert any(line.startswith("config") and "SERVING" in line for line in st.stdout.splitlines())
            assert lch.stop() == 0
        finally:
            if lch.proc is not None and lch.proc.poll() is None:
                lch.proc.kill()
    assert tokens[0] == tokens[1]


def test_missing_service_fails_clearly(tmp_path: Path) -> None:
    # Every service may exist by now; a fake module name proves the message instead.
    out = subprocess.run(
        [*flynn_dev(), "up", "--data-dir", str(tmp_path), "--only", "nosuch"],
        capture_output=True, text=True, timeout=60, env=env(), cwd=ROOT,
    )  # fmt: skip
    assert out.returncode == 2
    assert "unknown service(s) nosuch" in out.stderr


def test_up_with_tls_prints_a_cacert_call_that_works_as_printed(tmp_path: Path) -> None:
    """`flynn-dev up --tls`: a local CA and certificates, the gateway over TLS, mutual TLS between the
    services, and a printed grpcurl line with -cacert that works exactly as printed."""
    lch = Launcher(tmp_path / "data", free_base_port(), ["--tls", "--only", "config,queue,gateway"]).start()
    try:
        lch.wait_for("Stop: Ctrl-C")
        tls_dir = lch.data_dir / "tls"
        assert (tls_dir / "ca.pem").exists() and (tls_dir / "gateway.pem").exists()
        i = next(n for n, line in enumerate(lch.lines) if line.startswith("First call"))
        call = shlex.split(lch.lines[i + 1])
        assert "-cacert" in call and "-plaintext" not in call, call
        out = subprocess.run(call, capture_output=True, text=True, timeout=60, env=env())
        assert out.returncode == 0, out.stderr
        assert "SERVICE_HEALTH_SERVING" in out.stdout  # the gateway reached config and queue over mTLS
        gw = f"127.0.0.1:{lch.base_port}"
        plain = subprocess.run(
            [str(VENV_BIN / "grpcurl"), "-plaintext", "-max-time", "10", gw, "grpc.health.v1.Health/Check"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert plain.returncode != 0
        # The operator CLI over TLS too (--cacert / FLYNN_CACERT).
        token = (lch.data_dir / "secrets" / "operator.token").read_text().strip()
        flynn = [str(VENV_BIN / "flynn"), "--addr", gw, "--token", token]
        cli = subprocess.run(
            [*flynn, "--cacert", str(tls_dir / "ca.pem"), "config", "get", "server.queue"],
            capture_output=True, text=True, timeout=60, env=env(), cwd=ROOT,
        )  # fmt: skip
        assert cli.returncode == 0, cli.stdout + cli.stderr
        no_ca = subprocess.run(
            [*flynn, "config", "get", "server.queue"],
            capture_output=True,
            text=True,
            timeout=60,
            env=env(),
            cwd=ROOT,
        )
        assert no_ca.returncode != 0
        status = subprocess.run(
            [*flynn_dev(), "status", "--data-dir", str(lch.data_dir), "--base-port", str(lch.base_port)],
            capture_output=True, text=True, timeout=60, env=env(), cwd=ROOT,
        )  # fmt: skip
        assert status.returncode == 0, status.stdout + status.stderr
        rows = {
            line.split()[0]: line.split()[3] for line in status.stdout.splitlines() if "127.0.0.1:" in line
        }
        assert {rows[n] for n in ("config", "queue", "gateway")} == {"SERVING"}, status.stdout
        assert lch.stop() == 0
    finally:
        if lch.proc is not None and lch.proc.poll() is None:
            lch.proc.kill()
            lch.proc.wait(30)
        lch.kill_children()
