"""Storage backends side by side: the same loads on SQLite (default) and on PostgreSQL, in one run.

    .venv/bin/python -m bench.storage [--updates 30] [--puts 200] [--watchers 100]

For each backend, real service processes (python -m config_svc.main / nodes_svc.main):
- config commit -> ack: UpdateConfig returning, p50/p99 over `--updates` sequential changes;
- config commit -> applied by ALL `--watchers` real ConfigWatchers (bench/config_propagation's
  clients, one client process), p50/p99;
- canvas: `--puts` sequential 64 KiB PutArtifact calls, p50/p99, then sustained puts/s with 4 callers.
PostgreSQL is a throwaway server (initdb + pg_ctl in a temp dir, 127.0.0.1, fsync ON like a real
one). Run control's figures (submit -> ack, cancel -> ack) are measured by its own benchmarks
(bench/cancel_latency, bench/message_throughput) with `--database-url`. Figures are printed, never
asserted. Bounded: every call has a timeout; the run takes about two minutes.

Run control's figures (bench/storage_queue.py, the same loads as bench/message_throughput and
bench/cancel_latency): submit->ack p50/p99 unloaded and with 32 callers, sustained msg/s, and
cancel-to-ack p50/p99 through the gateway one at a time and 8 at once. `--no-queue` leaves them out;
`--only-cancel` prints only the cancel-to-ack rows (about a minute).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


async def config_figures(address: str, token: str, updates: int) -> tuple[float, float]:
    import grpc
    from flynn.v1 import config_pb2, config_pb2_grpc

    from tests.support.config import field_update

    md = (("authorization", f"Bearer {token}"),)
    lat: list[float] = []
    async with grpc.aio.insecure_channel(address) as ch:
        stub = config_pb2_grpc.ConfigServiceStub(ch)
        head = (await stub.GetConfig(config_pb2.GetConfigRequest(), metadata=md, timeout=10)).revision
        for i in range(updates):
            t0 = time.perf_counter()
            r = await stub.UpdateConfig(
                field_update("server.queue.cap", 100 + i, head=head, reason="bench"),
                metadata=md,
                timeout=10,
            )
            lat.append((time.perf_counter() - t0) * 1000)
            head = r.revision
    return pct(lat, 50), pct(lat, 99)


async def canvas_figures(address: str, token: str, puts: int) -> tuple[float, float, float]:
    import grpc
    from flynn.v1 import canvas_pb2, canvas_pb2_grpc

    md = (("authorization", f"Bearer {token}"),)
    lat: list[float] = []
    async with grpc.aio.insecure_channel(address) as ch:
        stub = canvas_pb2_grpc.CanvasStub(ch)

        async def put(name: str, i: int) -> float:
            body = hashlib.sha256(f"{name}/{i}".encode()).digest() * 2048  # 64 KiB
            t0 = time.perf_counter()
            await stub.PutArtifact(
                canvas_pb2.PutArtifactRequest(
                    name=name, content_type="application/octet-stream", content=body
                ),
                metadata=md,
                timeout=10,
            )
            return (time.perf_counter() - t0) * 1000

        for i in range(puts):
            lat.append(await put(f"bench/{i % 16}", i))
        t0 = time.perf_counter()

        async def caller(c: int) -> None:
            for i in range(puts // 4):
                await put(f"sustained/{c}/{i % 8}", i)

        await asyncio.gather(*(caller(c) for c in range(4)))
        rate = (puts // 4 * 4) / (time.perf_counter() - t0)
    return pct(lat, 50), pct(lat, 99), rate


def run_backend(label: str, base: Path, database_url: str, args: argparse.Namespace) -> dict[str, Any]:
    from bench.config_propagation import scenario
    from tests.support.mesh import ServiceProcess, make_tokens
    from tests.support.nodes import config_yaml, nodes_config

    base.mkdir(parents=True)
    tokens = make_tokens(base)
    db = ["--database-url", database_url] if database_url else []
    nodes_file = base / "nodes.yaml"
    nodes_file.write_text(config_yaml(nodes_config()))
    config = ServiceProcess(
        "config", "config_svc.main", base / "config", tokens, extra=[*db, "--log-level", "warning"]
    )
    nodes = ServiceProcess(
        "nodes", "nodes_svc.main", base / "nodes", tokens,
        extra=[*db, "--nodes-config", str(nodes_file), "--log-level", "warning"],
    )  # fmt: skip
    out: dict[str, Any] = {}
    try:
        config.start(timeout=60)
        nodes.start(timeout=60)
        out["commit"] = asyncio.run(config_figures(config.address, tokens.operator, args.updates))
        print(f"[{label}] {args.watchers} watchers, commit -> applied by all:")
        scenario(base, config, tokens.operator, args.watchers, 1, args.updates, 0.3, restart=False)
        out["canvas"] = asyncio.run(canvas_figures(nodes.address, tokens.operator, args.puts))
    finally:
        for p in (config, nodes):
            with contextlib.suppress(Exception):
                p.stop()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--updates", type=int, default=30)
    p.add_argument("--puts", type=int, default=200)
    p.add_argument("--watchers", type=int, default=100)
    p.add_argument("--no-queue", action="store_true", help="leave run control's figures out")
    p.add_argument("--messages", type=int, default=3000, help="run control: messages of the loaded phase")
    p.add_argument("--concurrency", type=int, default=32, help="run control: submitting callers")
    p.add_argument("--sessions", type=int, default=100, help="run control: streaming runs per cancel round")
    p.add_argument("--rounds", type=int, default=3, help="run control: cancel rounds per phase")
    p.add_argument("--only-cancel", action="store_true",
                   help="only run control's cancel-to-ack rows (skips config, canvas and message throughput)")  # fmt: skip
    args = p.parse_args()
    sys.path[:0] = [str(ROOT), str(ROOT / "gen")]
    from flynn_launcher.local_postgres import LocalPostgres

    tmp = Path(tempfile.mkdtemp(prefix="flynn-bench-storage-"))
    tmp.chmod(0o755)
    server = LocalPostgres(tmp / "postgres", fsync=True)
    try:
        server.init()
        server.start()
        url = server.create_database("bench")
        results: dict[str, dict[str, Any]] = {"SQLite": {}, "PostgreSQL": {}}
        if not args.only_cancel:
            results = {
                "SQLite": run_backend("SQLite", tmp / "sqlite", "", args),
                "PostgreSQL": run_backend("PostgreSQL", tmp / "pg", url, args),
            }
        if not args.no_queue or args.only_cancel:
            from bench import storage_queue

            for label, qurl in (("SQLite", ""), ("PostgreSQL", server.create_database("bench_queue"))):
                results[label].update(storage_queue.figures(tmp / f"queue-{label}", qurl, server, args))
    finally:
        with contextlib.suppress(Exception):
            server.stop("fast")
        shutil.rmtree(tmp, ignore_errors=True)
    print()
    print(f"{'figure':44} {'SQLite':>12} {'PostgreSQL':>12}")
    rows: list[tuple[str, str, int]] = [
        ("config UpdateConfig commit->ack p50 (ms)", "commit", 0),
        ("config UpdateConfig commit->ack p99 (ms)", "commit", 1),
        ("canvas 64 KiB put p50 (ms)", "canvas", 0),
        ("canvas 64 KiB put p99 (ms)", "canvas", 1),
        ("canvas 64 KiB puts/s, 4 callers", "canvas", 2),
    ]
    for name, key, i in rows if not args.only_cancel else []:
        print(f"{name:44} {results['SQLite'][key][i]:12.2f} {results['PostgreSQL'][key][i]:12.2f}")
    if not args.no_queue or args.only_cancel:
        from bench import storage_queue

        storage_queue.print_rows(results, args)
    if not args.only_cancel:
        print("(commit -> applied by all watchers: the two `propagation to ALL` lines above)")


if __name__ == "__main__":
    main()
