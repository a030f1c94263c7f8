"""Config propagation: UpdateConfig returning -> the change applied in EVERY watcher; and a restart storm.

    .venv/bin/python -m bench.config_propagation [--updates 30] [--big 1000] [--procs 4]
    .venv/bin/python -m bench.config_propagation --replicas 1,2 --updates 50 --spacing 0.5   # PostgreSQL

With --replicas, the config service runs as N processes on one throwaway PostgreSQL (initdb + pg_ctl
in a temp dir), client process i watches replica i % N, every update goes through the first replica
(so half the watchers learn of it over NOTIFY + a read of the revision table), and the server CPU
per change is the CPU time of all replicas over the update loop divided by the number of updates.
Also printed: the server's and the client processes' CPU within 200 ms of each commit (the commit
and the fan-out, before the ConfigWatchers' ACKs, which come 0.25-1 s after applying), so what the
server spends can be told apart from what the clients measuring it spend on the same cores.

What is measured (real processes, real ConfigWatcher instances, not bare streams):
- the config service runs as its own process (python -m config_svc.main);
- watchers are real flynn_runtime.config_watcher.ConfigWatcher objects (apply, persist to disk, ACK
  via ReportStatus), spread over `--procs` client processes, each process sharing one Runtime and a
  few gRPC connections (100 watchers per connection);
- for each update: latency = (latest apply time over all watchers) - (time UpdateConfig returned),
  on CLOCK_MONOTONIC, which all processes on this machine share; p50/p99 over the updates;
- restart: the config service is SIGKILLed and restarted on the same port; as soon as it serves, one
  update is committed; we poll ListWatchers until every watcher is connected and has ACKed it.
Bounded: every wait has a timeout; the whole run takes about a minute.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# The part of "server CPU per change" spent right after the commit: the commit and the fan-out. A
# ConfigWatcher ACKs 0.25-1 s after it applied a revision, so those ACKs fall outside this window.
FANOUT_WINDOW = 0.2


# --- client process -------------------------------------------------------------------------------


async def client_main(args: argparse.Namespace) -> None:
    from flynn.v1 import config_pb2

    from flynn_runtime import settings as settings_mod
    from flynn_runtime.channels import client_channel
    from flynn_runtime.config_watcher import ConfigWatcher
    from flynn_runtime.server import Runtime

    if args.raw:
        await raw_client(args)
        return
    data = Path(args.data_dir)
    settings = settings_mod.parse(
        "bench",
        [
            "--data-dir",
            str(data),
            "--config-addr",
            args.addr,
            "--metrics-listen",
            "",
            "--listen",
            "127.0.0.1:0",
        ],
    )
    runtime = Runtime(settings)
    channels = [
        client_channel(args.addr, args.token, extra_options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(max(1, (args.count + 99) // 100))
    ]
    applied: dict[int, list[float]] = {}
    watchers = []
    for i in range(args.count):
        ident = config_pb2.WatcherIdentity(service="bench", instance_id=f"{args.name}-{i}", version="bench")

        def record(old: Any, new: Any, rev: int) -> None:
            applied.setdefault(rev, []).append(time.monotonic())

        w = ConfigWatcher(
            runtime,
            cache_path=data / "cache" / f"{i}.bin",
            channel=channels[i % len(channels)],
            identity=ident,
        )
        w.subscribe(record)
        watchers.append(w)
    for w in watchers:
        await w.start()
    # Ready once every watcher holds a revision.
    deadline = time.monotonic() + 60
    for w in watchers:
        await w.wait_for_revision(1, max(deadline - time.monotonic(), 0.01))
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await asyncio.wait_for(stop.wait(), args.max_seconds)
    summary = {str(rev): {"max": max(ts), "min": min(ts), "count": len(ts)} for rev, ts in applied.items()}
    result = json.dumps({"applied": summary, "reconnects": sum(w.reconnects for w in watchers)})
    await asyncio.to_thread(Path(args.out).write_text, result)
    for w in watchers:
        await w.stop()
    for ch in channels:
        await ch.close(None)
    await runtime.close()


async def raw_client(args: argparse.Namespace) -> None:
    """Bare WatchConfig streams (no ConfigWatcher): the floor the watcher adds to."""
    from flynn.v1 import config_pb2, config_pb2_grpc

    from flynn_runtime.channels import client_channel

    channels = [
        client_channel(args.addr, args.token, extra_options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(max(1, (args.count + 99) // 100))
    ]
    applied: dict[int, list[float]] = {}
    ready = 0

    async def follow(i: int) -> None:
        nonlocal ready
        stub = config_pb2_grpc.ConfigServiceStub(channels[i % len(channels)])
        ident = config_pb2.WatcherIdentity(service="bench", instance_id=f"{args.name}-{i}")
        first = True
        async for resp in stub.WatchConfig(config_pb2.WatchConfigRequest(identity=ident)):
            if first:
                ready += 1
                first = False
            elif resp.kind == config_pb2.WATCH_EVENT_KIND_CHANGE:
                applied.setdefault(resp.revision, []).append(time.monotonic())

    tasks = [asyncio.create_task(follow(i)) for i in range(args.count)]
    deadline = time.monotonic() + 60
    while ready < args.count and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    print("ready", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await asyncio.wait_for(stop.wait(), args.max_seconds)
    summary = {str(rev): {"max": max(ts), "min": min(ts), "count": len(ts)} for rev, ts in applied.items()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240
    await asyncio.to_thread(Path(args.out).write_text, json.dumps({"applied": summary, "reconnects": 0}))
    for t in tasks:
        t.cancel()
    for ch in channels:
        await ch.close(None)


# --- driver -------------------------------------------------------------------------------------


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))
    return s[k]


class Clients:
    def __init__(
        self, base: Path, addr: str | list[str], token: str, total: int, procs: int, raw: bool = False
    ) -> None:
        addrs = [addr] if isinstance(addr, str) else addr  # client process i watches replica i % len
        self.procs: list[tuple[subprocess.Popen[str], Path]] = []
        per = [total // procs + (1 if i < total % procs else 0) for i in range(procs)]
        env = dict(os.environ, PYTHONPATH=f"{ROOT}:{ROOT / 'gen'}", FLYNN_LOG_LEVEL="warning")
        for i, count in enumerate(per):
            if count == 0:
                continue
            out = base / f"client{i}.json"
            d = base / f"client{i}"
            p = subprocess.Popen(
                [sys.executable, "-m", "bench.config_propagation", "--client", "--addr", addrs[i % len(addrs)], "--token", token,
                 "--count", str(count), "--name", f"p{i}", "--data-dir", str(d), "--out", str(out),
                 *(["--raw"] if raw else [])],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, cwd=ROOT,
            )  # fmt: skip
            self.procs.append((p, out))

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        for p, _ in self.procs:
            assert p.stdout is not None
            while time.monotonic() < deadline:
                line = p.stdout.readline()
                if line.strip() == "ready":
                    break
                if not line and p.poll() is not None:
                    raise RuntimeError("a client process died before it was ready")
            else:
                raise TimeoutError("clients not ready")

    def finish(self) -> tuple[dict[int, dict[str, float]], int]:
        merged: dict[int, dict[str, float]] = {}
        reconnects = 0
        for p, _ in self.procs:
            p.send_signal(signal.SIGTERM)
        for p, out in self.procs:
            p.wait(60)
            data = json.loads(out.read_text())
            reconnects += int(data["reconnects"])
            for rev, v in data["applied"].items():
                m = merged.setdefault(int(rev), {"max": 0.0, "min": float("inf"), "count": 0})
                m["max"] = max(m["max"], v["max"])
                m["min"] = min(m["min"], v["min"])
                m["count"] += v["count"]
        return merged, reconnects

    def kill(self) -> None:
        for p, _ in self.procs:
            if p.poll() is None:
                p.kill()


def _update(stub: Any, cap: int) -> tuple[int, float]:
    from flynn.v1 import config_pb2

    from tests.support.config import field_update

    head = stub.GetConfig(config_pb2.GetConfigRequest(), timeout=10, wait_for_ready=True).revision
    resp = stub.UpdateConfig(field_update("server.queue.cap", cap, head=head, reason="bench"), timeout=10)
    return int(resp.revision), time.monotonic()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (/proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def scenario(base: Path, proc: Any, token: str, watchers: int, procs: int, updates: int, spacing: float,
             restart: bool, raw: bool = False, others: list[Any] | None = None) -> None:  # fmt: skip
    import grpc
    from flynn.v1 import config_pb2_grpc

    md = (("authorization", f"Bearer {token}"),)
    channel = grpc.insecure_channel(proc.address, options=[("grpc.use_local_subchannel_pool", 1)])
    stub = config_pb2_grpc.ConfigServiceStub(channel)

    class _Stub:
        def __getattr__(self, name: str) -> Any:
            fn = getattr(stub, name)
            return lambda req, **kw: fn(req, metadata=md, **kw)

    s = _Stub()
    servers = [proc, *(others or [])]
    addrs = [p.address for p in servers]
    clients = Clients(
        base / f"w{watchers}{'raw' if raw else ''}{len(servers)}", addrs, token, watchers, procs, raw
    )
    try:
        t = time.monotonic()
        clients.wait_ready()
        print(
            f"  {watchers} watchers ready in {time.monotonic() - t:.2f} s ({procs} client processes"
            f" over {len(servers)} config replica(s); updates go through the first)"
        )
        returned: dict[int, float] = {}
        pids = [p.proc.pid for p in servers]
        client_pids = [p.pid for p, _ in clients.procs]
        cpu0 = sum(cpu_seconds(pid) for pid in pids)
        window = min(FANOUT_WINDOW, spacing)
        fanout_cpu = client_cpu = 0.0  # server / client CPU from just before each commit to `window` after it
        for i in range(updates):
            c0 = sum(cpu_seconds(pid) for pid in pids)
            k0 = sum(cpu_seconds(pid) for pid in client_pids)
            rev, t_ret = _update(s, 1000 + i)
            returned[rev] = t_ret
            time.sleep(window)
            fanout_cpu += sum(cpu_seconds(pid) for pid in pids) - c0
            client_cpu += sum(cpu_seconds(pid) for pid in client_pids) - k0
            time.sleep(spacing - window)
        cpu = sum(cpu_seconds(pid) for pid in pids) - cpu0
        restart_figures = None
        if restart:
            restart_figures = _restart(proc, s, watchers)
        time.sleep(0.5)
        applied, reconnects = clients.finish()
    finally:
        clients.kill()
        channel.close()
    _report(
        returned, applied, reconnects, restart_figures, watchers=watchers, procs=procs, servers=len(servers),
        updates=updates, spacing=spacing, cpu=cpu, fanout_cpu=fanout_cpu, client_cpu=client_cpu,
    )  # fmt: skip


def _report(
    returned: dict[int, float],
    applied: dict[int, Any],
    reconnects: int,
    restart_figures: tuple[float, float, int, int] | None,
    *,
    watchers: int,
    procs: int,
    servers: int,
    updates: int,
    spacing: float,
    cpu: float,
    fanout_cpu: float,
    client_cpu: float,
) -> None:
    """Print one scenario's figures: propagation to every watcher, CPU per change, the restart."""
    lat, first = [], []
    incomplete = 0
    for rev, t_ret in returned.items():
        a = applied.get(rev)
        if a is None or a["count"] < watchers:
            incomplete += 1
            continue
        lat.append(max(0.0, a["max"] - t_ret) * 1000)
        first.append(max(0.0, a["min"] - t_ret) * 1000)
    print(
        f"  propagation to ALL {watchers} watchers over {len(lat)} updates: "
        f"p50 {pct(lat, 50):.1f} ms  p99 {pct(lat, 99):.1f} ms  max {max(lat) if lat else float('nan'):.1f} ms"
        + (f"  ({incomplete} updates not seen by every watcher)" if incomplete else "")
    )
    print(f"  (first watcher to apply: p50 {pct(first, 50):.1f} ms  p99 {pct(first, 99):.1f} ms)")
    print(
        f"  server CPU per change (all {servers} replica(s), idle time between changes included):"
        f" {cpu / max(1, updates) * 1000:.1f} ms, of which {fanout_cpu / max(1, updates) * 1000:.1f} ms"
        f" within {min(FANOUT_WINDOW, spacing) * 1000:.0f} ms of the commit (commit + fan-out; ConfigWatchers"
        " ACK 250-1000 ms after applying)"
    )
    print(
        f"  client CPU within {min(FANOUT_WINDOW, spacing) * 1000:.0f} ms of each commit (all {procs} client"
        f" processes, receiving and applying): {client_cpu / max(1, updates) * 1000:.1f} ms"
    )
    if restart_figures is not None:
        t_back, t_current, total, lost = restart_figures
        print(
            f"  restart (SIGKILL + start): all {total} watchers reconnected {t_back:.2f} s and current (ACKed the "
            f"first post-restart revision) {t_current:.2f} s after the new process served; lost watchers: {lost}; "
            f"client reconnect attempts: {reconnects}"
        )


def _restart(proc: Any, s: Any, watchers: int) -> tuple[float, float, int, int]:
    from flynn.v1 import config_pb2

    proc.kill9()
    proc.start(timeout=60)
    t0 = time.monotonic()
    rev, _ = _update(s, 99_999)
    back = current = None
    deadline = t0 + 60
    n_connected = n_current = 0
    while time.monotonic() < deadline:
        token, rows = "", []
        for _ in range(20):
            resp = s.ListWatchers(
                config_pb2.ListWatchersRequest(page_size=1000, page_token=token), timeout=10
            )
            rows.extend(resp.watchers)
            token = resp.next_page_token
            if not token:
                break
        n_connected = sum(1 for w in rows if w.connected and w.identity.service == "bench")
        n_current = sum(
            1 for w in rows if w.connected and w.applied_revision >= rev and w.identity.service == "bench"
        )
        now = time.monotonic()
        if back is None and n_connected >= watchers:
            back = now - t0
        if n_current >= watchers:
            current = now - t0
            break
        time.sleep(0.05)
    lost = watchers - n_current
    return (
        (back if back is not None else float("nan")),
        (current if current is not None else float("nan")),
        watchers,
        lost,
    )


def replicas_driver(args: argparse.Namespace) -> None:
    """--replicas 1,2: config on a throwaway PostgreSQL, watchers spread over N replicas."""
    from bench.config_replicas import ConfigSetups, replica_count

    with ConfigSetups("flynn-bench-config-") as setups:
        base, tokens = setups.base, setups.tokens
        for spec in args.replicas.split(","):
            n = replica_count(spec)
            label = "SQLite, 1 config replica" if spec == "sqlite" else f"PostgreSQL, {n} config replica(s)"
            with setups.started(spec, ["--bookmark-seconds", "15", "--log-level", "warning"]) as procs:
                if args.raw:
                    print(f"[{label}, {args.big} BARE WatchConfig streams, {args.updates} updates]")
                    scenario(base, procs[0], tokens.operator, args.big, args.procs, args.updates,
                             args.spacing, restart=False, raw=True, others=procs[1:])  # fmt: skip
                print(f"[{label}, {args.big} ConfigWatchers, {args.updates} updates]")
                scenario(base, procs[0], tokens.operator, args.big, args.procs, args.updates,
                         args.spacing, restart=False, others=procs[1:])  # fmt: skip


def driver(args: argparse.Namespace) -> None:
    sys.path[:0] = [str(ROOT), str(ROOT / "gen")]
    from tests.support.mesh import ServiceProcess, make_tokens

    with tempfile.TemporaryDirectory(prefix="flynn-bench-config-") as tmp:
        base = Path(tmp)
        tokens = make_tokens(base)
        proc = ServiceProcess(
            "config", "config_svc.main", base / "config-svc", tokens,
            extra=["--bookmark-seconds", "15", "--log-level", "warning"],
        )  # fmt: skip
        proc.start(timeout=60)
        try:
            print(
                f"config propagation bench (config service pid {proc.proc.pid if proc.proc else '?'}, 2-core box)"
            )
            print(f"[10 watchers, 1 client process, {args.updates} updates]")
            scenario(base, proc, tokens.operator, 10, 1, args.updates, 0.1, restart=False)
            if args.raw:
                print(
                    f"[{args.big} BARE WatchConfig streams (no ConfigWatcher), {args.procs} client processes]"
                )
                scenario(
                    base,
                    proc,
                    tokens.operator,
                    args.big,
                    args.procs,
                    args.updates,
                    args.spacing,
                    False,
                    True,
                )
            print(f"[{args.big} watchers, {args.procs} client processes, {args.updates} updates]")
            scenario(
                base, proc, tokens.operator, args.big, args.procs, args.updates, args.spacing, restart=True
            )
        finally:
            with contextlib.suppress(Exception):
                proc.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--addr", default="")
    p.add_argument("--token", default="")
    p.add_argument("--count", type=int, default=0)
    p.add_argument("--name", default="c")
    p.add_argument("--data-dir", default="")
    p.add_argument("--out", default="")
    p.add_argument("--max-seconds", type=float, default=600)
    p.add_argument("--raw", action="store_true", help="also measure bare WatchConfig streams for comparison")
    p.add_argument("--updates", type=int, default=30, help="updates per scenario (default 30)")
    p.add_argument("--big", type=int, default=1000, help="watchers of the large scenario (default 1000)")
    p.add_argument("--procs", type=int, default=4, help="client processes of the large scenario (default 4)")
    p.add_argument("--spacing", type=float, default=1.5, help="seconds between updates, large scenario")
    p.add_argument(
        "--replicas",
        default="",
        help="e.g. 1,2: run the large scenario on a throwaway PostgreSQL with that many config replicas"
        " (watchers spread over them, updates through the first) instead of the SQLite scenarios",
    )
    args = p.parse_args()
    if args.client:
        asyncio.run(client_main(args))
    elif args.replicas:
        sys.path[:0] = [str(ROOT), str(ROOT / "gen")]
        replicas_driver(args)
    else:
        driver(args)


if __name__ == "__main__":
    main()
