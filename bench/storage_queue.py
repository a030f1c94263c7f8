"""Run control on each storage backend: SQLite (embedded default) and PostgreSQL 15, in one run.

    .venv/bin/python -m bench.storage_queue [--messages 3000] [--concurrency 32] [--sessions 100] [--rounds 3]
        [--backends sqlite,postgresql] [--only-cancel]

(bench/storage runs this too, beside the config and canvas figures.)

For each backend it starts real processes (a throwaway PostgreSQL via initdb + pg_ctl on a free port,
fsync on, for the PostgreSQL column) and prints:

- run control: unloaded submit->ack (one caller), loaded submit->ack p50/p99 and sustained msg/s
  (`--concurrency` callers over 200 sessions, followup mode, the built-in agent at zero think time),
  the same load as bench/message_throughput;
- cancel-to-ack p50/p99 through the gateway, cancels one at a time and 8 at once, with `--sessions`
  runs streaming (the same load as bench/cancel_latency);
- the group-commit duration (flynn_queue_commit_seconds) seen by the server over the cancel phases.

Config commit->applied at 100 watchers and 64 KiB canvas puts are bench/storage's.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
from flynn.v1 import run_control_pb2 as pb
from flynn.v1 import run_control_pb2_grpc as pb_grpc

from bench import cancel_latency, message_throughput
from flynn_launcher.local_postgres import LocalPostgres
from tests.support.mesh import ServiceProcess, free_port, make_tokens

pct = message_throughput.pct


@contextmanager
def database_env(url: str) -> Iterator[None]:
    """Service processes started inside take FLYNN_DATABASE_URL (empty: SQLite)."""
    old = os.environ.pop("FLYNN_DATABASE_URL", None)
    if url:
        os.environ["FLYNN_DATABASE_URL"] = url
    try:
        yield
    finally:
        os.environ.pop("FLYNN_DATABASE_URL", None)
        if old is not None:
            os.environ["FLYNN_DATABASE_URL"] = old


async def unloaded_acks(address: str, token: str, n: int) -> list[float]:
    md = (("authorization", f"Bearer {token}"),)
    out: list[float] = []
    async with grpc.aio.insecure_channel(address) as ch:
        stub = pb_grpc.RunControlStub(ch)
        for i in range(n):
            t0 = time.perf_counter()
            await stub.SubmitMessage(
                pb.SubmitMessageRequest(session_key=f"u{i % 20}", channel="bench-u", text=f"u{i}", idempotency_key=f"u{i}"),
                metadata=md, timeout=10,
            )  # fmt: skip
            out.append((time.perf_counter() - t0) * 1000)
    return out


def throughput(root: Path, url: str, args: argparse.Namespace) -> dict[str, float]:
    tokens = make_tokens(root)
    cfg = root / "queue.yaml"
    cfg.write_text(message_throughput.CONFIG)
    with database_env(url):
        proc = ServiceProcess("queue", "queue_svc.main", root / "queue", tokens,
                              extra=["--queue-config-file", str(cfg), "--log-level", "warning"])  # fmt: skip
        proc.start()
    try:
        solo = asyncio.run(unloaded_acks(proc.address, tokens.operator, 300))
        r = asyncio.run(
            message_throughput.run(proc.address, tokens.operator, args.messages, args.concurrency, 200)
        )
    finally:
        proc.stop()
    return {"solo_p50": pct(solo, 50), "solo_p99": pct(solo, 99), **r}


def cancels(root: Path, url: str, args: argparse.Namespace) -> dict[str, object]:
    tokens = make_tokens(root)
    cfg = root / "queue.yaml"
    cfg.write_text(cancel_latency.CONFIG)
    out: dict[str, object] = {}
    with database_env(url):
        queue = ServiceProcess("queue", "queue_svc.main", root / "queue", tokens,
                               extra=["--queue-config-file", str(cfg), "--log-level", "warning"])  # fmt: skip
        queue.start()
    dead = {b: f"127.0.0.1:{free_port()}" for b in ("config", "reactions", "nodes", "voice")}
    gw = ServiceProcess("gateway", "gateway.main", root / "gateway", tokens,
                        addresses={"queue": queue.address, **dead}, extra=["--log-level", "warning"])  # fmt: skip
    gw.start()
    try:
        before = cancel_latency.scrape(queue)
        for callers in (1, 8):
            acks, _ = asyncio.run(
                cancel_latency.run(
                    gw.address, tokens.operator, True, args.sessions, args.rounds, callers, f"c{callers}"
                )
            )
            out[f"cancel{callers}"] = acks
        after = cancel_latency.scrape(queue)
        out["queue_commit"] = cancel_latency.delta(
            cancel_latency.histogram(before, "flynn_queue_commit_seconds"),
            cancel_latency.histogram(after, "flynn_queue_commit_seconds"),
        )
    finally:
        gw.stop()
        queue.stop()
    return out


def figures(base: Path, url: str, server: LocalPostgres, args: argparse.Namespace) -> dict[str, object]:
    """Run control's figures on one backend ("" = SQLite); each phase gets a fresh database."""
    base.mkdir(parents=True)
    t = {} if getattr(args, "only_cancel", False) else throughput(base / "tp", url, args)
    url2 = server.create_database(f"{url.rsplit('/', 1)[1]}_cancel") if url else ""
    return {**t, **cancels(base / "cx", url2, args)}


def _number(value: object) -> float:
    """A figure of the results (an int or a float)."""
    assert isinstance(value, int | float), repr(value)
    return float(value)


def print_rows(results: dict[str, dict[str, object]], args: argparse.Namespace) -> None:
    """Rows for bench/storage's table (columns SQLite, PostgreSQL)."""
    names = list(results)

    def cell(n: str, key: str, i: int | None = None) -> str:
        v = results[n][key]
        if isinstance(v, list):
            return f"{pct(v, 50 if i == 0 else 99):.2f}"
        return f"{_number(v):.2f}"

    rows = [
        ("run control submit->ack unloaded p50 (ms)", "solo_p50", None),
        ("run control submit->ack unloaded p99 (ms)", "solo_p99", None),
        (f"run control submit->ack {args.concurrency} callers p50 (ms)", "ack_p50", None),
        (f"run control submit->ack {args.concurrency} callers p99 (ms)", "ack_p99", None),
        ("run control sustained msg/s", "rate", None),
        ("cancel-to-ack via gateway, 1 at a time p50", "cancel1", 0),
        ("cancel-to-ack via gateway, 1 at a time p99", "cancel1", 1),
        ("cancel-to-ack via gateway, 8 at once p50", "cancel8", 0),
        ("cancel-to-ack via gateway, 8 at once p99", "cancel8", 1),
    ]
    if getattr(args, "only_cancel", False):
        rows = [r for r in rows if r[1].startswith("cancel")]
    for name, key, i in rows:
        print(f"{name:44} " + " ".join(f"{cell(n, key, i):>12}" for n in names))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=3000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--sessions", type=int, default=100, help="streaming runs per cancel round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--backends", default="sqlite,postgresql", help="which columns to measure")
    ap.add_argument(
        "--only-cancel", action="store_true", help="only the cancel-to-ack phases (no throughput)"
    )
    args = ap.parse_args()
    results: dict[str, dict[str, object]] = {}
    with tempfile.TemporaryDirectory(prefix="flynn-bench-storage-") as d:
        root = Path(d)
        pg_dir = root / "pg"
        pg_dir.mkdir()
        pg_dir.chmod(0o755)
        root.chmod(0o755)
        server = LocalPostgres(pg_dir, fsync=True)
        server.init()
        server.start()
        try:
            for name in args.backends.split(","):
                url = server.create_database(f"bench_{name}") if name == "postgresql" else ""
                results[name] = figures(root / name, url, server, args)
        finally:
            server.stop("fast")
    report(results, args)


def _row(label: str, values: list[str]) -> str:
    return f"  {label:<44}" + "".join(f"{v:>20}" for v in values)


def report(results: dict[str, dict[str, object]], args: argparse.Namespace) -> None:
    names = list(results)
    print("storage backends side by side (queue_svc real process; PostgreSQL 15 local, fsync on)")
    print(_row("", names))

    def f(key: str) -> list[str]:
        return [f"{_number(results[n][key]):.2f}" for n in names]

    if not args.only_cancel:
        print_throughput(names, results, args, f)
    for callers in (1, 8):
        vals = []
        for n in names:
            acks = results[n][f"cancel{callers}"]
            assert isinstance(acks, list)
            vals.append(f"{pct(acks, 50):.2f} / {pct(acks, 99):.2f}")
        print(_row(f"cancel-to-ack via gateway, {callers} at a time p50/p99", vals))
    vals = []
    for n in names:
        commit = results[n]["queue_commit"]
        assert isinstance(commit, tuple)
        total, count = float(commit[1]), float(commit[2])
        vals.append(f"{total / count * 1000:.2f}" if count else "n/a")
    print(_row("group commit mean during cancels (ms)", vals))


def print_throughput(
    names: list[str],
    results: dict[str, dict[str, object]],
    args: argparse.Namespace,
    f: Callable[[str], list[str]],
) -> None:
    print(
        _row(
            "submit->ack unloaded p50 / p99 (ms)",
            [f"{a} / {b}" for a, b in zip(f("solo_p50"), f("solo_p99"), strict=True)],
        )
    )
    print(
        _row(
            f"submit->ack {args.concurrency} callers p50 / p99 (ms)",
            [f"{a} / {b}" for a, b in zip(f("ack_p50"), f("ack_p99"), strict=True)],
        )
    )
    rates = [f"{_number(results[n]['rate']):.0f}" for n in names]
    print(_row("sustained msg/s (submit->final, followup)", rates))


if __name__ == "__main__":
    main()
