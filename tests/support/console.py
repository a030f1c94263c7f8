"""Test support for the operator console: a whole real mesh (every service + gateway as processes) and
the console process in front of it, plus a headless Chromium driven by Playwright."""

from __future__ import annotations

import http.client
import json
import os
import re
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flynn_runtime import topology
from tests.support.mesh import ROOT, ServiceProcess, Tokens, free_port

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@dataclass
class ConsoleProcess:
    data_dir: Path
    gateway_addr: str
    audit_dirs: list[Path] = field(default_factory=list)
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    def start(self, timeout: float = 30.0) -> ConsoleProcess:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        port_file = self.data_dir / ".console.port"
        port_file.unlink(missing_ok=True)
        args = [
            sys.executable, "-m", "console.main",
            "--http-listen", f"127.0.0.1:{self.port}",
            "--gateway-addr", self.gateway_addr,
            "--data-dir", str(self.data_dir),
            "--port-file", str(port_file),
            "--grace-seconds", "3",
        ]  # fmt: skip
        for d in self.audit_dirs:
            args += ["--audit-dir", str(d)]
        env = dict(os.environ, PYTHONPATH=f"{ROOT}:{ROOT / 'gen'}")
        env.pop("FLYNN_SERVICE_TOKEN", None)  # the console has no token of its own
        self.log_path = self.data_dir / "console.log"
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"console exited with {self.proc.returncode}:\n{self.log_tail()}")
            if port_file.exists() and port_file.read_text().strip():
                self.port = int(port_file.read_text().split()[0])
                with urllib.request.urlopen(f"{self.url}/healthz", timeout=5) as r:
                    assert r.status == 200
                return self
            time.sleep(0.05)
        raise TimeoutError(f"console did not start:\n{self.log_tail()}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, n: int = 40) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def _request(self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
                 ) -> tuple[int, http.client.HTTPMessage, bytes]:  # fmt: skip
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, resp.headers, resp.read()
        finally:
            conn.close()

    def sign_in(self, token: str) -> str:
        """Sign in through the form (its CSRF field must match the cookie it came with); returns the
        session cookie ("name=value") for the API calls."""
        _, headers, page = self._request("GET", "/signin")
        csrf = re.search(r'name="csrf" value="([^"]+)"', page.decode())
        assert csrf is not None, page[:500]
        form = urllib.parse.urlencode({"csrf": csrf.group(1), "token": token}).encode()
        status, headers, body = self._request(
            "POST", "/signin", form,
            {"Cookie": str(headers["Set-Cookie"]).split(";")[0], "Content-Type": "application/x-www-form-urlencoded"},
        )  # fmt: skip
        assert status == 303, (status, body[:500])
        from console.sign_in import COOKIE

        cookies = [c.split(";")[0] for c in headers.get_all("Set-Cookie") or []]
        return next(c for c in cookies if c.startswith(f"{COOKIE}="))

    def get_json(self, path: str, cookie: str) -> Any:
        status, _, body = self._request("GET", path, headers={"Cookie": cookie})
        assert status == 200, (status, body[:500])
        return json.loads(body)

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.terminate()
        try:
            return self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(5)


@dataclass
class ConsoleMesh:
    """config (seeded), queue, nodes, voice, reactions and the gateway as real processes on ports
    chosen up front, then the console in front of the gateway. Data dirs follow flynn-dev's layout
    (<root>/mesh/<service>), so the console finds every audit log by default."""

    root: Path
    tokens: Tokens
    seed: str
    voice_flags: list[str] = field(default_factory=list)
    procs: dict[str, ServiceProcess] = field(default_factory=dict)
    console: ConsoleProcess | None = None
    addresses: dict[str, str] = field(default_factory=dict)

    @property
    def mesh_dir(self) -> Path:
        return self.root / "mesh"

    @property
    def console_url(self) -> str:
        """The started console's base URL."""
        assert self.console is not None, "the mesh is not started"
        return self.console.url

    def start(self) -> ConsoleMesh:
        ports = {name: free_port() for name in topology.START_ORDER}
        self.addresses = {n: f"127.0.0.1:{p}" for n, p in ports.items() if n != "gateway"}
        seed_file = self.root / "seed.yaml"
        seed_file.write_text(self.seed)
        for name in topology.START_ORDER:
            extra: list[str] = []
            if name == "config":
                extra = ["--seed-file", str(seed_file)]
            if name == "voice":
                extra = list(self.voice_flags)
            if name == "gateway":
                extra = ["--metrics-addrs", self.metrics_addrs()]
            self.procs[name] = ServiceProcess(
                name,
                topology.SERVICES[name].module,
                self.mesh_dir / name,
                self.tokens,
                addresses=self.addresses,
                port=ports[name],
                extra=extra,
                grace=3.0,
            ).start(timeout=90)
        self.console = ConsoleProcess(self.mesh_dir / "console", self.gateway_addr).start()
        return self

    def metrics_addrs(self) -> str:
        """config=h:p,queue=h:p,… from each started service's port file ('<grpc> <metrics>')."""
        out = []
        for name, proc in self.procs.items():
            parts = (proc.data_dir / f".{name}.port").read_text().split()
            if len(parts) > 1 and parts[1] != "0":
                out.append(f"{name}=127.0.0.1:{parts[1]}")
        return ",".join(out)

    @property
    def gateway_addr(self) -> str:
        return self.procs["gateway"].address

    def restart_voice(self, *flags: str) -> None:
        """Restart voice on the same gRPC and metrics ports (so the gateway's GetMetrics still finds it)."""
        old = self.procs["voice"]
        metrics_port = (old.data_dir / ".voice.port").read_text().split()[1]
        old.stop()
        self.procs["voice"] = ServiceProcess(
            "voice",
            topology.SERVICES["voice"].module,
            old.data_dir,
            self.tokens,
            addresses=self.addresses,
            port=old.port,
            extra=["--metrics-listen", f"127.0.0.1:{metrics_port}", *flags],
            grace=3.0,
        ).start(timeout=90)

    def stop(self) -> None:
        if self.console is not None:
            self.console.stop()
        for name in reversed(list(self.procs)):
            self.procs[name].stop()
