"""The idle cost of the replica view: one heartbeat (flynn_runtime/replica_registry.py) beside the lease
renewal it rides on, and the listing that ListReplicas answers.

    .venv/bin/python -m bench.replica_heartbeat [--beats 500] [--replicas 8]

On a throwaway PostgreSQL (initdb + pg_ctl in a temp dir), with `--replicas` rows in the table and a
lease per replica, it alternates, on one pooled connection, a lease renewal alone (what every
replica did before) and a renewal followed by the heartbeat (what it does now), `--beats` times
each, and prints per round: wall time p50/p99, this process's CPU, and the PostgreSQL backend's CPU
(from /proc, the server side of the same connection). Then the listing (`registry.list()`). A
replica runs one round every lease/3 (1.7 s with the default 5 s lease), so the idle cost per replica
is the "heartbeat alone" difference times 0.6 per second. The machine's load average is printed with
the figures; on a shared machine they are pessimistic.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TICK = os.sysconf("SC_CLK_TCK")


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))] * 1000 if s else 0.0


def backend_cpu(pid: int) -> float:
    """CPU seconds (user + system) of a PostgreSQL backend process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


async def measure(args: argparse.Namespace, url: str) -> None:
    from flynn_runtime import leases, replica_registry
    from flynn_runtime.database import Database
    from flynn_runtime.database_url import parse_database_url
    from flynn_runtime.pg_migrations import Migration
    from flynn_runtime.replica_registry import ReplicaRegistry, Report

    migrations = [
        Migration(1, "leases", leases.MIGRATION_SQL),
        Migration(2, "replicas", replica_registry.MIGRATION_SQL),
    ]
    db = await Database.open(
        parse_database_url(url), service="bench", schema="flynn_bench", migrations=migrations
    )
    report = Report(ready=True, lease_held=True, holdings=(("sessions_owned", 42.0), ("runs_active", 3.0)))
    regs = [
        ReplicaRegistry(db, f"bench-r{i}", f"10.0.0.{i}:50052", lambda: report) for i in range(args.replicas)
    ]
    me = regs[0].replica_id
    try:
        async with db.connection() as c:
            pid = int((await (await c.execute("SELECT pg_backend_pid()")).fetchone() or [0])[0])
            for r in regs:
                await leases.acquire(c, "replica", r.replica_id, r.replica_id, r.address, 5.0)
                await r.join()

            async def renew() -> None:
                await leases.renew(c, "replica", me, 5.0)

            async def renew_and_beat() -> None:
                await leases.renew(c, "replica", me, 5.0)
                await regs[0].beat(c)

            rounds: dict[str, Callable[[], Awaitable[None]]] = {
                "renewal alone (before)": renew,
                "renewal + heartbeat (now)": renew_and_beat,
            }
            walls: dict[str, list[float]] = {k: [] for k in rounds}
            cpu = {k: 0.0 for k in rounds}
            server = {k: 0.0 for k in rounds}
            for _ in range(args.beats):
                for name, fn in rounds.items():  # alternated: the same load for both
                    s0, c0, w0 = backend_cpu(pid), time.process_time(), time.perf_counter()
                    await fn()
                    walls[name].append(time.perf_counter() - w0)
                    cpu[name] += time.process_time() - c0
                    server[name] += backend_cpu(pid) - s0
        lists: list[float] = []
        for _ in range(min(args.beats, 200)):
            w0 = time.perf_counter()
            rows = await regs[1].list()
            lists.append(time.perf_counter() - w0)
        assert len(rows) == args.replicas
    finally:
        await db.close()
    load = os.getloadavg()
    print(
        f"[replica heartbeat; {args.beats} rounds each, alternated; {args.replicas} rows; load {load[0]:.2f}]"
    )
    for name in rounds:
        n = len(walls[name])
        print(
            f"  {name:<27} p50 {pct(walls[name], 0.5):6.2f} ms   p99 {pct(walls[name], 0.99):6.2f} ms   "
            f"client CPU {cpu[name] / n * 1e6:6.0f} µs   PostgreSQL CPU {server[name] / n * 1e6:6.0f} µs"
        )
    print(f"  {'ListReplicas read':<27} p50 {pct(lists, 0.5):6.2f} ms   p99 {pct(lists, 0.99):6.2f} ms")


def run(args: argparse.Namespace) -> None:
    sys.path[:0] = [str(ROOT), str(ROOT / "gen")]
    from flynn_launcher.local_postgres import LocalPostgres

    with tempfile.TemporaryDirectory(prefix="flynn-bench-heartbeat-") as tmp:
        base = Path(tmp)
        base.chmod(0o755)
        pg = LocalPostgres(base / "pg")
        pg.init()
        pg.start()
        try:
            asyncio.run(measure(args, pg.create_database("bench_heartbeat")))
        finally:
            pg.stop("immediate")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--beats", type=int, default=500, help="rounds of each kind (default 500)")
    p.add_argument("--replicas", type=int, default=8, help="rows in the replicas table (default 8)")
    args = p.parse_args()
    if not 1 <= args.beats <= 100_000 or not 2 <= args.replicas <= 100:
        p.error("--beats 1..100000, --replicas 2..100")
    run(args)


if __name__ == "__main__":
    main()
