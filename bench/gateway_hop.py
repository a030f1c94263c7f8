"""What the gateway hop costs: one unary call direct to a backend vs through the gateway.

    .venv/bin/python -m bench.gateway_hop [--calls 2000] [--backend config|echo] [--modes plaintext,tls,mtls]

Starts real processes (the config service, or the test echo backend, and a gateway in front of
it), then measures p50/p95/p99 latency and throughput of ConfigService/GetConfig (echo:
Voice/Synthesize) at 1 and 16 concurrent callers, direct and through the gateway, with bounded
iterations. The client sends pre-serialised bytes and does not parse replies, so both paths pay
the same client cost and the difference is the hop. "bare" is the floor on the same machine at the
same moment: the gateway's forwarder alone in a plain grpc.aio server (no auth, metrics, errors).

Modes (each with fresh processes; certificates from flynn_launcher.certs, as `flynn-dev up --tls`):
plaintext; tls = the gateway serves TLS, the hop to the backend stays plaintext; mtls = TLS at the
gateway and mutual TLS on the hop (the backend requires the gateway's client certificate, and the
"direct" path presents one too). The closing table gives each mode's cost per call beside plaintext.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
from flynn.v1 import config_pb2, voice_pb2

from tests.support.mesh import ROOT, ServiceProcess, free_port, make_tokens

WARMUP = 200


def _pct(sorted_ms: list[float], p: float) -> float:
    return sorted_ms[min(len(sorted_ms) - 1, int(round(p / 100 * (len(sorted_ms) - 1))))]


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def measure(
    targets: dict[str, str],
    method: str,
    payload: bytes,
    token: str,
    callers: int,
    calls: int,
    rounds: int,
    credentials: dict[str, grpc.ChannelCredentials] | None = None,
) -> dict[str, dict[str, float]]:
    """Latency and rate per target; targets alternate in rounds so background load hits both alike."""
    md = (("authorization", f"Bearer {token}"),)
    latencies: dict[str, list[float]] = {name: [] for name in targets}
    wall: dict[str, float] = dict.fromkeys(targets, 0.0)
    creds = credentials or {}
    channels = {
        name: grpc.aio.secure_channel(addr, creds[name]) if name in creds else grpc.aio.insecure_channel(addr)
        for name, addr in targets.items()
    }
    try:
        calls_of = {name: ch.unary_unary(method, None, None) for name, ch in channels.items()}
        for call in calls_of.values():
            for _ in range(WARMUP):
                await call(payload, metadata=md, timeout=10)
        per_caller = max(calls // (callers * rounds), 1)
        for _ in range(rounds):
            for name, call in calls_of.items():
                out = latencies[name]

                async def caller(call: Any = call, out: list[float] = out) -> None:
                    for _ in range(per_caller):
                        t0 = time.perf_counter()
                        await call(payload, metadata=md, timeout=10)
                        out.append((time.perf_counter() - t0) * 1000)

                start = time.perf_counter()
                await asyncio.gather(*(caller() for _ in range(callers)))
                wall[name] += time.perf_counter() - start
    finally:
        for ch in channels.values():
            await ch.close(None)
    result: dict[str, dict[str, float]] = {}
    for name, lat in latencies.items():
        lat.sort()
        result[name] = {
            "calls": len(lat),
            "p50": statistics.median(lat),
            "p95": _pct(lat, 95),
            "p99": _pct(lat, 99),
            "rate": len(lat) / wall[name],
        }
    return result


async def serve_bare(port: int, route: str, backend_addr: str) -> None:
    """The floor: the same Forwarder in a bare grpc.aio server (no auth, metrics or error interceptor)."""
    from flynn_runtime import settings
    from gateway.backends import Backends
    from gateway.forwarder import Forwarder
    from gateway.routes import build_routes, external_methods

    s = settings.parse("gateway", [f"--{route}-addr", backend_addr])
    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        (Forwarder(Backends(s), build_routes(), external_methods(), asyncio.Event()),)
    )
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def _start_bare(route: str, backend_addr: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.gateway_hop", "--serve-bare", str(port), route, backend_addr],
        env=dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'gen'}"),
        cwd=ROOT,
    )
    addr = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return proc, addr
        time.sleep(0.05)
    proc.kill()
    raise TimeoutError("bare forwarder did not start")


Row = tuple[str, str, int, dict[str, float]]


def _tls_args(pki: Any, name: str) -> list[str]:
    return ["--tls-cert-file", str(pki.cert(name)), "--tls-key-file", str(pki.key(name))]


def _backend(
    kind: str, root: Path, tokens: Any, extra: list[str], creds: grpc.ChannelCredentials | None
) -> tuple[ServiceProcess, str, bytes, str]:
    """The backend behind the gateway: (process, method called, request, gateway route)."""
    if kind == "config":
        backend = ServiceProcess(
            "config", "config_svc.main", root / "config", tokens, extra=extra, credentials=creds
        )
        return (
            backend,
            "/flynn.v1.ConfigService/GetConfig",
            config_pb2.GetConfigRequest().SerializeToString(),
            "config",
        )
    backend = ServiceProcess(
        "voice", "tests.gateway.echo_backend", root / "echo", tokens, extra=extra, credentials=creds
    )
    payload = voice_pb2.SynthesizeRequest(text="x" * 100).SerializeToString()
    return backend, "/flynn.v1.Voice/Synthesize", payload, "voice"


def run_mode(mode: str, ns: argparse.Namespace, root: Path) -> tuple[list[Row], list[tuple[int, float]], str]:
    """Start a backend and a gateway for `mode`, measure, stop them; (rows, gateway CPU per call, method)."""
    from flynn_launcher import certs

    root.mkdir(parents=True, exist_ok=True)
    tokens = make_tokens(root)
    pki = certs.CertPaths(root / "tls")
    backend_extra: list[str] = []
    gateway_extra: list[str] = []
    credentials: dict[str, grpc.ChannelCredentials] = {}
    backend_creds: grpc.ChannelCredentials | None = None
    gateway_creds: grpc.ChannelCredentials | None = None
    if mode != "plaintext":
        for name in ("backend", "gateway", "client"):
            certs.issue(pki, name, ["localhost", "127.0.0.1"])
        ca = pki.ca_cert.read_bytes()
        gateway_extra = _tls_args(pki, "gateway")
        gateway_creds = credentials["gateway"] = grpc.ssl_channel_credentials(ca)
    if mode == "mtls":
        backend_extra = [*_tls_args(pki, "backend"), "--tls-ca-file", str(pki.ca_cert)]
        gateway_extra += ["--tls-ca-file", str(pki.ca_cert)]
        backend_creds = credentials["direct"] = grpc.ssl_channel_credentials(
            pki.ca_cert.read_bytes(), pki.key("client").read_bytes(), pki.cert("client").read_bytes()
        )
    backend, method, payload, route = _backend(ns.backend, root, tokens, backend_extra, backend_creds)
    backend.start()
    gateway = ServiceProcess(
        "gateway",
        "gateway.main",
        root / "gw",
        tokens,
        addresses={route: backend.address},
        extra=gateway_extra,
        credentials=gateway_creds,
    )
    bare: subprocess.Popen[bytes] | None = None
    rows: list[Row] = []
    cpu_rows: list[tuple[int, float]] = []
    try:
        gateway.start()
        targets = {"direct": backend.address, "gateway": gateway.address}
        if mode == "plaintext":
            bare, targets["bare"] = _start_bare(route, backend.address)
        assert gateway.proc is not None
        for callers in (1, 16):
            cpu0 = _cpu_seconds(gateway.proc.pid)
            res = asyncio.run(
                measure(targets, method, payload, tokens.operator, callers, ns.calls, ns.rounds, credentials)
            )
            gw_cpu_us = (_cpu_seconds(gateway.proc.pid) - cpu0) / (res["gateway"]["calls"] + WARMUP) * 1e6
            rows += [(mode, name, callers, r) for name, r in res.items()]
            cpu_rows.append((callers, gw_cpu_us))
    finally:
        if bare is not None:
            bare.kill()
            bare.wait(10)
        gateway.stop()
        backend.stop()
    return rows, cpu_rows, method


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve-bare", nargs=3, metavar=("PORT", "ROUTE", "BACKEND"), help=argparse.SUPPRESS)
    parser.add_argument("--calls", type=int, default=3000, help="measured calls per (path, callers) cell")
    parser.add_argument("--rounds", type=int, default=6, help="alternations between direct and gateway")
    default_backend = "config" if importlib.util.find_spec("config_svc.main") else "echo"
    parser.add_argument("--backend", choices=["config", "echo"], default=default_backend)
    parser.add_argument(
        "--modes", default="plaintext,tls,mtls", help="comma-separated: plaintext, tls, mtls (all three)"
    )
    ns = parser.parse_args()
    if ns.serve_bare:
        asyncio.run(serve_bare(int(ns.serve_bare[0]), ns.serve_bare[1], ns.serve_bare[2]))
        return
    modes = [m.strip() for m in ns.modes.split(",") if m.strip()]
    unknown = set(modes) - {"plaintext", "tls", "mtls"}
    if unknown:
        parser.error(f"unknown mode(s) {', '.join(sorted(unknown))}")

    rows: list[Row] = []
    cpu: dict[str, list[tuple[int, float]]] = {}
    method = ""
    with tempfile.TemporaryDirectory(prefix="flynn-bench-") as tmp:
        for mode in modes:
            mode_rows, cpu[mode], method = run_mode(mode, ns, Path(tmp) / mode)
            rows += mode_rows

    print(
        f"{method} ({ns.backend} backend), {ns.calls} calls per cell in {ns.rounds} alternating rounds, "
        f"after {WARMUP} warm-up calls"
    )
    print(
        f"{'mode':<9} {'path':<8} {'callers':>7} {'calls':>6} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'calls/s':>8}"
    )
    for mode, name, callers, r in rows:
        print(
            f"{mode:<9} {name:<8} {callers:>7} {int(r['calls']):>6} {r['p50']:>8.3f} {r['p95']:>8.3f} "
            f"{r['p99']:>8.3f} {r['rate']:>8.0f}"
        )
    for mode in modes:
        for callers in (1, 16):
            d = next(r for m, n, c, r in rows if m == mode and n == "direct" and c == callers)
            for hop in ("gateway", "bare"):
                g = next((r for m, n, c, r in rows if m == mode and n == hop and c == callers), None)
                if g is None:
                    continue
                print(
                    f"{mode}: {hop} hop adds at {callers:>2} caller(s): p50 {g['p50'] - d['p50']:+.3f} ms, "
                    f"p99 {g['p99'] - d['p99']:+.3f} ms, throughput {g['rate'] / d['rate']:.0%} of direct"
                )
        for callers, us in cpu[mode]:
            print(
                f"{mode}: gateway CPU per forwarded call at {callers:>2} caller(s): {us:.0f} us "
                "(server + client side of the hop)"
            )
    if "plaintext" in modes:
        for mode in (m for m in modes if m != "plaintext"):
            for callers in (1, 16):
                base = next(r for m, n, c, r in rows if m == "plaintext" and n == "gateway" and c == callers)
                g = next(r for m, n, c, r in rows if m == mode and n == "gateway" and c == callers)
                base_cpu = dict(cpu["plaintext"])[callers]
                print(
                    f"{mode} beside plaintext through the gateway at {callers:>2} caller(s): "
                    f"p50 {g['p50'] - base['p50']:+.3f} ms, p99 {g['p99'] - base['p99']:+.3f} ms, "
                    f"throughput {g['rate'] / base['rate']:.0%}, gateway CPU per call "
                    f"{dict(cpu[mode])[callers] - base_cpu:+.0f} us"
                )


if __name__ == "__main__":
    main()
