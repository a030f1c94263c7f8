"""Soak of the nodes process: 1,000 companion nodes, invokes, canvas puts, kill -9 and a reconnect storm.

    .venv/bin/python -m bench.nodes_soak [--nodes 1000] [--invokes 2000] [--puts 500]

1. starts nodes_svc as its own process (static config: nodes on, canvas on, heartbeat 5 s, lease 15 s: the shipped defaults),
2. issues one token per node and starts a fleet process running N CompanionNode instances in one
   asyncio loop (examples/companion_node.py), heartbeating,
3. with all N connected: InvokeNode round trips (device.info on random nodes) and 64 KiB canvas puts,
4. kill -9 of the nodes process, restart on the same port, and the reconnect storm: share of nodes
   re-registered over time and the time to 100% (from the kill and from the restarted process
   serving again),
5. prints the figures. Every phase is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from flynn.v1 import canvas_pb2, canvas_pb2_grpc, nodes_pb2, nodes_pb2_grpc


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def fmt_ms(values: list[float]) -> str:
    ms = [v * 1000 for v in values]
    return f"n={len(ms)} p50={pct(ms, 50):.2f} ms p95={pct(ms, 95):.2f} ms p99={pct(ms, 99):.2f} ms max={max(ms):.2f} ms"


# --- fleet process --------------------------------------------------------------------------


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def _stop_requested(status_file: Path) -> bool:
    return Path(str(status_file) + ".stop").exists()


async def run_fleet(addr: str, tokens_file: Path, status_file: Path, channels: int, duration: float) -> None:
    from examples.companion_node import CHANNEL_OPTIONS, CompanionNode

    creds: list[tuple[str, str]] = _read_json(tokens_file)
    pool = [grpc.aio.insecure_channel(addr, options=CHANNEL_OPTIONS) for _ in range(channels)]
    nodes = [
        CompanionNode(
            addr, nid, tok, "desktop", channel=pool[i % channels], backoff_initial=0.1, backoff_max=2.0
        )
        for i, (nid, tok) in enumerate(creds)
    ]
    tasks = []
    for i, n in enumerate(nodes):
        tasks.append(n.start())
        if i % 50 == 49:
            await asyncio.sleep(0.02)  # open streams in waves, like real devices
    end = time.monotonic() + duration
    while time.monotonic() < end and not _stop_requested(status_file):
        status = {
            "time": time.time(),
            "registered": sum(1 for n in nodes if n.registered.is_set()),
            "registrations": sum(n.stats.registrations for n in nodes),
            "heartbeats_received": sum(n.stats.heartbeats_received for n in nodes),
            "invokes": sum(n.stats.invokes for n in nodes),
            "stopped": sum(1 for n in nodes if n.stopped_reason),
            "max_epoch": max((n.epoch for n in nodes), default=0),
        }
        tmp = status_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(status))
        tmp.replace(status_file)
        await asyncio.sleep(0.05)
    for n in nodes:
        await n.stop()
    await asyncio.wait(tasks, timeout=10)
    for ch in pool:
        await ch.close(None)


# --- driver ---------------------------------------------------------------------------------


def _spawn_fleet(addr: str, tokens_json: Path, status: Path, channels: int) -> subprocess.Popen[bytes]:
    from tests.support.mesh import ROOT

    env = dict(os.environ, PYTHONPATH=f"{ROOT}:{ROOT / 'gen'}")
    args = [
        sys.executable,
        "-m",
        "bench.nodes_soak",
        "--fleet",
        "--addr",
        addr,
        "--tokens-json",
        str(tokens_json),
    ]
    args += ["--status-file", str(status), "--channels", str(channels), "--duration", "600"]
    return subprocess.Popen(args, cwd=ROOT, env=env)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def scrape(proc: Any) -> dict[str, float]:
    """The nodes process's /metrics as {"name{k=v,...}": value}."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    port = int((proc.data_dir / ".nodes.port").read_text().split()[1])
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for smp in fam.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(smp.labels.items()))
            out[f"{smp.name}{{{labels}}}"] = smp.value
    return out


def read_status(path: Path) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads(path.read_text())
        return data
    except (FileNotFoundError, ValueError):
        return {"registered": 0, "registrations": 0, "time": 0.0}


async def wait_status(path: Path, pred: Any, within: float) -> dict[str, Any]:
    end = time.monotonic() + within
    st = read_status(path)
    while time.monotonic() < end:
        st = read_status(path)
        if pred(st):
            return st
        await asyncio.sleep(0.02)
    return st


@dataclass
class _Soak:
    """What every phase of the soak reads: the options, the server, the nodes' credentials, the figures."""

    ns: argparse.Namespace
    proc: Any
    md: Any
    creds: list[tuple[str, str]]
    figures: dict[str, str]


async def _invokes_connected(soak: _Soak, nodes: Any) -> None:
    """Invoke round trips with everyone connected."""
    ns, proc, md, creds, figures = soak.ns, soak.proc, soak.md, soak.creds, soak.figures
    lat: list[float] = []
    failures: dict[str, int] = {}
    cpu0 = cpu_seconds(proc.proc.pid)
    for _ in range(ns.invokes):
        nid = creds[random.randrange(len(creds))][0]
        t = time.perf_counter()
        try:
            async for _m in nodes.InvokeNode(
                nodes_pb2.InvokeNodeRequest(node_id=nid, command="device.info", timeout_ms=5000),
                metadata=md,
                timeout=10,
            ):
                pass
            lat.append(time.perf_counter() - t)
        except grpc.aio.AioRpcError as e:
            failures[e.code().name] = failures.get(e.code().name, 0) + 1
    per_invoke = (cpu_seconds(proc.proc.pid) - cpu0) / max(ns.invokes, 1)
    figures["invoke round trip"] = fmt_ms(lat) + (f" failures={failures}" if failures else "")
    figures["server CPU per invoke"] = f"{per_invoke * 1e6:.0f} µs (heartbeats of {ns.nodes} nodes included)"
    print("invoke:", figures["invoke round trip"], flush=True)


async def _canvas_puts(
    ns: argparse.Namespace, ch: grpc.aio.Channel, md: Any, figures: dict[str, str]
) -> None:
    """Canvas puts of 64 KiB with everyone connected."""
    canvas = canvas_pb2_grpc.CanvasStub(ch)
    body = os.urandom(64 * 1024)
    put_lat: list[float] = []
    for i in range(ns.puts):
        t = time.perf_counter()
        await canvas.PutArtifact(
            canvas_pb2.PutArtifactRequest(
                name=f"soak/{i % 50}", content_type="application/octet-stream", content=body
            ),
            metadata=md,
            timeout=10,
        )
        put_lat.append(time.perf_counter() - t)
    figures["canvas put 64 KiB"] = fmt_ms(put_lat)
    print("canvas put:", figures["canvas put 64 KiB"], flush=True)
    await ch.close(None)


async def _reconnect_storm(ns: argparse.Namespace, proc: Any, status: Path, figures: dict[str, str]) -> None:
    """kill -9 and the reconnect storm."""
    before = read_status(status)
    t_kill = time.time()
    proc.kill9()
    down = await wait_status(status, lambda s: s["registered"] == 0, 30)
    figures["after kill"] = (
        f"{down['registered']} still registered {down['time'] - t_kill:.2f} s after the kill"
    )
    proc.start()
    t_serving = time.time()
    samples: list[tuple[float, int]] = []
    end = time.monotonic() + ns.storm_timeout
    st = read_status(status)
    while time.monotonic() < end:
        st = read_status(status)
        samples.append((float(st["time"]), int(st["registered"])))
        if st["registered"] >= ns.nodes and st["registrations"] >= before["registrations"] + ns.nodes:
            break
        await asyncio.sleep(0.02)
    done_t = st["time"] if st["registered"] >= ns.nodes else None

    def share_at(after_s: float) -> float:
        best = 0
        for t, n in samples:
            if t <= t_serving + after_s:
                best = max(best, n)
        return 100.0 * best / int(ns.nodes)

    marks = ", ".join(f"{share_at(s):.1f}% at +{s:g} s" for s in (1, 2, 5, 10))
    figures["reconnect storm share"] = f"{marks} (after the restarted process served)"
    if done_t is not None:
        figures["reconnect storm 100%"] = (
            f"{done_t - t_serving:.2f} s after serving again, {done_t - t_kill:.2f} s after the kill "
            f"(restart took {t_serving - t_kill:.2f} s)"
        )
    else:
        figures["reconnect storm 100%"] = (
            f"NOT reached in {ns.storm_timeout:.0f} s: {st['registered']}/{ns.nodes}"
        )
    print("storm:", figures["reconnect storm share"], "|", figures["reconnect storm 100%"], flush=True)


async def _after_storm(soak: _Soak, nodes: Any) -> None:
    """The registry and invokes once the fleet is back."""
    ns, proc, md, creds, figures = soak.ns, soak.proc, soak.md, soak.creds, soak.figures
    got = await nodes.ListNodes(nodes_pb2.ListNodesRequest(page_size=1000), metadata=md, timeout=10)
    more = got.next_page_token
    epochs = statistics.mean(n.epoch for n in got.nodes) if got.nodes else 0
    figures["registry after storm"] = (
        f"{len(got.nodes)} nodes listed (duplicates: {len(got.nodes) - len({n.node_id for n in got.nodes})}, "
        f"more pages: {bool(more)}), mean epoch {epochs:.2f}, "
        f"online {sum(1 for n in got.nodes if n.status == nodes_pb2.NODE_STATUS_ONLINE)}"
    )
    lat2: list[float] = []
    for _ in range(min(ns.invokes, 500)):
        nid = creds[random.randrange(len(creds))][0]
        t = time.perf_counter()
        async for _m in nodes.InvokeNode(
            nodes_pb2.InvokeNodeRequest(node_id=nid, command="device.info"), metadata=md, timeout=10
        ):
            pass
        lat2.append(time.perf_counter() - t)
    figures["invoke after storm"] = fmt_ms(lat2)
    m = await asyncio.to_thread(scrape, proc)
    ok = sum(v for k, v in m.items() if k.startswith("nodes_reconnects_total{") and "result=success" in k)
    bad = sum(v for k, v in m.items() if k.startswith("nodes_reconnects_total{") and "result=failure" in k)
    figures["reconnect success"] = (
        f"{ok:.0f} ok / {bad:.0f} refused = {100 * ok / max(ok + bad, 1):.2f}% (nodes_reconnects_total, restarted process)"
    )


async def _issue_tokens(ns: argparse.Namespace, nodes: Any, md: Any) -> list[tuple[str, str]]:
    t0 = time.perf_counter()
    creds = []
    for i in range(ns.nodes):
        r = await nodes.IssueNodeToken(
            nodes_pb2.IssueNodeTokenRequest(node_id=f"soak-{i:04d}", role="desktop"),
            metadata=md,
            timeout=10,
        )
        creds.append((r.node_id, r.token))
    print(f"issued {ns.nodes} tokens in {time.perf_counter() - t0:.2f} s", flush=True)
    return creds


async def drive(ns: argparse.Namespace) -> None:
    from tests.support.mesh import ServiceProcess, make_tokens
    from tests.support.nodes import config_yaml, nodes_config

    work = Path(tempfile.mkdtemp(prefix="nodes-soak-"))
    tokens = make_tokens(work)
    cfg_file = work / "nodes.yaml"
    cfg_file.write_text(config_yaml(nodes_config(heartbeat_s=ns.heartbeat, lease_s=ns.lease)))
    proc = ServiceProcess(
        "nodes",
        "nodes_svc.main",
        work / "data",
        tokens,
        extra=["--nodes-config", str(cfg_file), "--log-level", "warning"],
    )
    proc.start()
    md = tokens.md("operator")
    fleet: subprocess.Popen[bytes] | None = None
    figures: dict[str, str] = {}
    try:
        ch = grpc.aio.insecure_channel(proc.address)
        nodes = nodes_pb2_grpc.NodesStub(ch)
        creds = await _issue_tokens(ns, nodes, md)
        tokens_json = work / "node-tokens.json"
        tokens_json.write_text(json.dumps(creds))
        status = work / "fleet-status.json"
        assert proc.proc is not None
        rss_before = rss_kib(proc.proc.pid)
        fleet = _spawn_fleet(proc.address, tokens_json, status, ns.channels)
        t0 = time.monotonic()
        st = await wait_status(status, lambda s: s["registered"] >= ns.nodes, 120)
        connect_s = time.monotonic() - t0
        figures["initial connect"] = (
            f"{st['registered']}/{ns.nodes} registered in {connect_s:.2f} s (fleet start included)"
        )
        print(figures["initial connect"], flush=True)
        assert proc.proc is not None
        cpu0 = cpu_seconds(proc.proc.pid)
        await asyncio.sleep(ns.settle)
        idle_cpu = (cpu_seconds(proc.proc.pid) - cpu0) / ns.settle
        rss_after = rss_kib(proc.proc.pid)
        figures["server memory"] = (
            f"RSS {rss_before / 1024:.0f} MiB before the fleet, {rss_after / 1024:.0f} MiB with {ns.nodes} streams "
            f"({(rss_after - rss_before) / max(ns.nodes, 1):.1f} KiB per stream)"
        )
        figures["server idle CPU"] = f"{idle_cpu * 100:.1f}% of one core with {ns.nodes} nodes heartbeating"
        st = read_status(status)
        figures["heartbeats"] = (
            f"{st['heartbeats_received']} server heartbeats received by the fleet after {ns.settle:.0f} s settle"
        )
        online = await nodes.ListNodes(
            nodes_pb2.ListNodesRequest(status=nodes_pb2.NODE_STATUS_ONLINE, page_size=1000),
            metadata=md,
            timeout=10,
        )
        figures["online (server view)"] = f"{len(online.nodes)} (first page of up to 1000)"

        soak = _Soak(ns, proc, md, creds, figures)
        await _invokes_connected(soak, nodes)
        await _canvas_puts(ns, ch, md, figures)
        await ch.close(None)
        await _reconnect_storm(ns, proc, status, figures)
        ch = grpc.aio.insecure_channel(proc.address)
        await _after_storm(soak, nodes_pb2_grpc.NodesStub(ch))
        await ch.close(None)
    finally:
        if fleet is not None:
            (work / "fleet-status.json.stop").write_text("")
            try:
                fleet.wait(30)
            except Exception:  # noqa: BLE001
                fleet.kill()
        proc.stop()
    print("\n=== nodes soak ===")
    print(
        f"nodes={ns.nodes} channels={ns.channels} heartbeat={ns.heartbeat}s lease={ns.lease}s cpu={os.cpu_count()}"
    )
    for k, v in figures.items():
        print(f"{k:24s} {v}")


def main() -> None:
    p = argparse.ArgumentParser(prog="bench.nodes_soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, default=1000)
    p.add_argument("--channels", type=int, default=50, help="client connections the fleet shares")
    p.add_argument("--invokes", type=int, default=2000)
    p.add_argument("--puts", type=int, default=500)
    p.add_argument(
        "--heartbeat", type=float, default=5.0, help="server.nodes.heartbeat_interval (shipped default 5 s)"
    )
    p.add_argument("--lease", type=float, default=15.0, help="server.nodes.lease (shipped default 15 s)")
    p.add_argument("--settle", type=float, default=6.0)
    p.add_argument("--storm-timeout", type=float, default=60.0)
    p.add_argument("--fleet", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--addr", help=argparse.SUPPRESS)
    p.add_argument("--tokens-json", help=argparse.SUPPRESS)
    p.add_argument("--status-file", help=argparse.SUPPRESS)
    p.add_argument("--duration", type=float, default=600, help=argparse.SUPPRESS)
    ns = p.parse_args()
    if ns.fleet:
        asyncio.run(run_fleet(ns.addr, Path(ns.tokens_json), Path(ns.status_file), ns.channels, ns.duration))
    else:
        asyncio.run(drive(ns))


if __name__ == "__main__":
    main()
