"""Runs the service processes: start in order and wait for health, restart crashes with backoff,
stop in reverse order (SIGTERM, grace, SIGKILL)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from flynn_launcher.plan import MeshPaths, ServicePlan

BACKOFF_START = 0.5
BACKOFF_MAX = 30.0
STABLE_AFTER = 30.0  # a child that ran this long before crashing restarts with the initial backoff


def say(message: str) -> None:
    print(f"[flynn-dev] {message}", file=sys.stderr, flush=True)


def _sync_channel(address: str, credentials: grpc.ChannelCredentials | None) -> grpc.Channel:
    if credentials is None:
        return grpc.insecure_channel(address)
    return grpc.secure_channel(address, credentials)


def check_health(
    address: str, timeout: float = 1.0, service: str = "", credentials: grpc.ChannelCredentials | None = None
) -> str:
    """SERVING / NOT_SERVING / … or UNREACHABLE (with the reason)."""
    with _sync_channel(address, credentials) as ch:
        try:
            resp = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError as err:
            return f"UNREACHABLE ({err.code().name})"
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status))


def check_http_health(address: str, timeout: float = 1.0, path: str = "/healthz") -> str:
    """SERVING when GET http://<address><path> answers 200, else UNREACHABLE / HTTP <code> (the reason)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via an http_proxy
    try:
        with opener.open(f"http://{address}{path}", timeout=timeout) as resp:
            return "SERVING" if resp.status == 200 else f"HTTP {resp.status}"
    except urllib.error.HTTPError as err:
        return f"HTTP {err.code}"
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        return f"UNREACHABLE ({reason})"


def check_ready(
    address: str, readiness: str, timeout: float = 1.0, credentials: grpc.ChannelCredentials | None = None
) -> str:
    """One readiness check of a process, by its kind: "grpc" (grpc.health.v1) or "http" (/healthz)."""
    if readiness == "http":
        return check_http_health(address, timeout=timeout)
    return check_health(address, timeout=timeout, credentials=credentials)


class StartupError(Exception):
    pass


@dataclass
class Child:
    plan: ServicePlan
    cmd: list[str]
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restarts: int = 0
    backoff: float = BACKOFF_START
    restart_at: float | None = None
    history: list[int] = field(default_factory=list)  # exit codes of crashes

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc is not None else 0

    def log_tail(self, n: int = 30) -> str:
        try:
            lines = self.plan.log_path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return ""
        return "\n".join(lines[-n:])


class Supervisor:
    def __init__(
        self,
        children: list[Child],
        paths: MeshPaths,
        env: dict[str, str],
        stop: threading.Event,
        grace: float,
        credentials: grpc.ChannelCredentials | None = None,
        tls_dir: Path | None = None,
    ) -> None:
        self.credentials = credentials
        self.tls_dir = tls_dir
        self.children = children
        self.paths = paths
        self.env = env
        self.stop = stop
        self.grace = grace

    def spawn(self, child: Child) -> None:
        child.plan.data_dir.mkdir(parents=True, exist_ok=True)
        child.plan.log_path.parent.mkdir(parents=True, exist_ok=True)
        with child.plan.log_path.open("ab") as log:
            # Own session: a terminal's Ctrl-C reaches only the launcher, which then stops children in order.
            child.proc = subprocess.Popen(
                child.cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
            )
        child.started_at = time.monotonic()
        child.restart_at = None

    def wait_healthy(self, child: Child, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        status = ""
        while time.monotonic() < deadline and not self.stop.is_set():
            assert child.proc is not None
            code = child.proc.poll()
            if code is not None:
                raise StartupError(
                    f"{child.plan.name} exited with code {code} while starting; "
                    f"last lines of {child.plan.log_path}:\n{child.log_tail()}"
                )
            status = check_ready(
                child.plan.address, child.plan.readiness, timeout=1.0, credentials=self.credentials
            )
            if status == "SERVING":
                return
            self.stop.wait(0.1)
        if self.stop.is_set():
            raise StartupError("interrupted while starting")
        raise StartupError(
            f"{child.plan.name} not SERVING after {timeout:.0f}s ({status}); "
            f"last lines of {child.plan.log_path}:\n{child.log_tail()}"
        )

    def start_all(self, health_timeout: float) -> None:
        for child in self.children:
            say(f"starting {child.plan.name} on {child.plan.address}")
            self.spawn(child)
            self.wait_healthy(child, health_timeout)
        self.write_state()

    def write_state(self) -> None:
        state = {
            "launcher_pid": os.getpid(),
            "tls_dir": str(self.tls_dir.resolve()) if self.tls_dir is not None else None,
            "services": [
                {
                    "name": c.plan.name,
                    "address": c.plan.address,
                    "metrics_port": c.plan.metrics_port,
                    "readiness": c.plan.readiness,
                    "pid": c.pid,
                    "restarts": c.restarts,
                }
                for c in self.children
            ],
        }
        tmp = self.paths.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        tmp.replace(self.paths.state_file)

    def supervise(self) -> None:
        """Until asked to stop: restart children that exit, with exponential backoff."""
        while not self.stop.is_set():
            now = time.monotonic()
            for child in self.children:
                if child.proc is None:
                    continue
                if child.restart_at is None:
                    code = child.proc.poll()
                    if code is None:
                        continue
                    uptime = now - child.started_at
                    if uptime >= STABLE_AFTER:
                        child.backoff = BACKOFF_START
                    child.history.append(code)
                    child.restart_at = now + child.backoff
                    say(
                        f"{child.plan.name} (pid {child.proc.pid}) exited with code {code} after {uptime:.1f}s; "
                        f"restarting in {child.backoff:.1f}s (see {child.plan.log_path})"
                    )
                    child.backoff = min(child.backoff * 2, BACKOFF_MAX)
                elif now >= child.restart_at:
                    child.restarts += 1
                    self.spawn(child)
                    say(f"{child.plan.name} restarted (pid {child.pid}, restart #{child.restarts})")
                    self.write_state()
            self.stop.wait(0.2)

    def stop_all(self) -> None:
        """SIGTERM children in reverse start order; each gets the grace period, then SIGKILL."""
        for child in reversed(self.children):
            proc = child.proc
            if proc is None or proc.poll() is not None:
                continue
            say(f"stopping {child.plan.name} (pid {proc.pid})")
            proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(timeout=self.grace + 2)
            except subprocess.TimeoutExpired:
                say(f"{child.plan.name} did not stop within {self.grace:.0f}s; killing it")
                proc.kill()
                code = proc.wait(timeout=10)
            say(f"{child.plan.name} stopped (exit code {code})")
        self.paths.state_file.unlink(missing_ok=True)


def child_env(root: Path) -> dict[str, str]:
    env = dict(os.environ)
    paths = [str(root), str(root / "gen")]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.pop("FLYNN_SERVICE_TOKEN", None)  # children read theirs from --service-token-file
    return env
