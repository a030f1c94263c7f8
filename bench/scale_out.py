"""Run control scaled out: 1, 2, 3 replica processes on one PostgreSQL 15, behind the gateway.

    .venv/bin/python -m bench.scale_out [--replicas 1,2,3] [--messages 2000] [--concurrency 32]
        [--sessions 100] [--cancel-sessions 50] [--cancel-rounds 2] [--kills 20] [--lease 5]

(`--messages 0 --kills 0`: only the cancel rows.)

Starts a throwaway PostgreSQL (initdb + pg_ctl, fsync on), then for each replica count a fresh
database, N run-control processes (`--database-url`, default lease unless --lease) and a gateway whose
queue address is the list of replicas (calls balanced round-robin; a call reaching a replica that does
not own its session is forwarded to the owner). Prints per replica count:

- sustained msg/s and submit->final p50/p99: `--concurrency` callers submit `--messages` messages over
  `--sessions` sessions (followup mode, built-in agent at zero think time) through the gateway; the
  final is seen on a StreamReplies stream through the gateway;
- cancel-to-ack p50/p99 through the gateway, cancels one at a time, with `--cancel-sessions` runs
  streaming (bench/cancel_latency's load), the share of cancels a replica forwarded to the session's
  owner and the mean forwarding hop (flynn_queue_forward_seconds);
- where a cancel's time goes, per stage (means over the cancel phase, from the replicas' /metrics):
  the server's handler->ack (flynn_cancel_to_ack_seconds) split into the wait for the batch in flight
  (flynn_queue_batch_wait_seconds) and the commit (flynn_queue_commit_seconds), and what is left outside
  the handler (gateway, transport, client);
- CPU per process (each replica, the gateway, PostgreSQL with all its backends): per second while idle
  (the mesh started, no call for `--idle-seconds`) and per cancel (the whole cancel phase: 50 runs
  streaming included, divided by the cancels);
- failover pause (N >= 2): SIGKILL the replica owning the most sessions, then call SubmitMessage on a
  session it owned until one succeeds: kill -> first successful call, p50/max over `--kills` kills (the
  killed replica is restarted, with the same id, between kills).

On 2 cores shared by the replicas, the gateway, PostgreSQL and the load generator, throughput does not
grow with replicas: every process competes for the same CPU, and 2/3 of the calls pay a forwarding hop.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path

import grpc
from flynn.v1 import run_control_pb2 as pb
from flynn.v1 import run_control_pb2_grpc as pb_grpc

from bench import cancel_latency
from flynn_launcher.local_postgres import LocalPostgres
from tests.support.mesh import make_tokens
from tests.support.replicas import QueueReplicas

pct = cancel_latency.pct
#: The forwarding hop of CancelRun (queue_svc/forwarding.py), from the replicas' /metrics.
FORWARD_CANCEL = "flynn_queue_forward_seconds"

THROUGHPUT_CONFIG = """
server:
  queue: {mode: followup, cap: 1000}
  agent: {think_time: 0s}
"""


async def throughput(
    address: str, token: str, messages: int, concurrency: int, sessions: int
) -> dict[str, float]:
    md = (("authorization", f"Bearer {token}"),)
    async with grpc.aio.insecure_channel(address) as ch:
        stub = pb_grpc.RunControlStub(ch)
        submitted: dict[str, float] = {}
        finals: dict[str, float] = {}
        done = asyncio.Event()

        async def follow() -> None:
            async for resp in stub.StreamReplies(pb.StreamRepliesRequest(), metadata=md):
                r = resp.reply
                if r.kind == pb.REPLY_KIND_FINAL:
                    finals[r.run_id] = time.perf_counter()
                    if len(finals) >= messages:
                        done.set()

        follower = asyncio.ensure_future(follow())
        await asyncio.sleep(0.3)
        counter = iter(range(messages))

        async def caller(c: int) -> None:
            for i in counter:
                t0 = time.perf_counter()
                resp = await stub.SubmitMessage(
                    pb.SubmitMessageRequest(session_key=f"tp{i % sessions}", channel="bench", text=f"m{i}",
                                            idempotency_key=f"tp-{i}"),
                    metadata=md, timeout=30,
                )  # fmt: skip
                submitted[resp.run_id] = t0

        t0 = time.perf_counter()
        await asyncio.gather(*(caller(c) for c in range(concurrency)))
        acked = time.perf_counter() - t0
        await asyncio.wait_for(done.wait(), 120)
        follower.cancel()
        lat = [(finals[r] - t) * 1000 for r, t in submitted.items() if r in finals]
        return {"rate": messages / acked, "final_p50": pct(lat, 50), "final_p99": pct(lat, 99)}


async def failover(mesh: QueueReplicas, token: str, kills: int) -> list[float]:
    """Seconds from SIGKILL of the busiest replica to the first successful call on a session it owned."""
    assert mesh.gateway is not None
    md = (("authorization", f"Bearer {token}"),)
    pauses: list[float] = []
    async with grpc.aio.insecure_channel(mesh.gateway.address) as ch:
        stub = pb_grpc.RunControlStub(ch)
        for i in range(20):  # sessions spread over the replicas
            await stub.SubmitMessage(
                pb.SubmitMessageRequest(session_key=f"fo{i}", channel="bench", text="hi", idempotency_key=f"fo{i}-0"),
                metadata=md, timeout=30,
            )  # fmt: skip
        for k in range(kills):
            victim = mesh.busiest()
            moved = sorted(s for s, (h, _) in mesh.leases().items() if h == mesh.holder(victim))
            session = moved[0]
            mesh.queue[victim].kill9()
            t0 = time.perf_counter()
            n = 0
            while True:
                n += 1
                try:
                    await stub.SubmitMessage(
                        pb.SubmitMessageRequest(session_key=session, channel="bench", text="after",
                                                idempotency_key=f"{session}-k{k}"),
                        metadata=md, timeout=30,
                    )  # fmt: skip
                    break
                except grpc.aio.AioRpcError as e:
                    if e.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                        raise
                    await asyncio.sleep(0.02)
            pauses.append(time.perf_counter() - t0)
            print(f"  kill {k + 1}/{kills}: replica {victim} ({len(moved)} sessions) -> "
                  f"{pauses[-1]:.2f} s, {n} attempts", flush=True)  # fmt: skip
            mesh.queue[victim].start(timeout=60)  # back with the same id and port
    return pauses


def _ticks(pid: int, children: bool = False) -> float:
    """CPU seconds of a process (user + system; with `children`, also its exited, waited-for children)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    ticks = int(fields[11]) + int(fields[12]) + (int(fields[13]) + int(fields[14]) if children else 0)
    return ticks / os.sysconf("SC_CLK_TCK")


def postgres_cpu(server: LocalPostgres) -> float:
    """CPU seconds of the PostgreSQL server so far: the postmaster, its live backends and workers, and
    the ones that exited."""
    postmaster = int((server.data / "postmaster.pid").read_text().split()[0])
    total = _ticks(postmaster, children=True)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == postmaster:
            total += _ticks(int(stat.parent.name))
    return total


def cpu_now(mesh: QueueReplicas, server: LocalPostgres) -> dict[str, float]:
    """CPU seconds so far of every process of the mesh: `queue<i>`, `gateway`, `postgres`."""
    out = {f"queue{i}": cancel_latency.cpu_seconds(q) for i, q in enumerate(mesh.queue)}
    assert mesh.gateway is not None
    out["gateway"] = cancel_latency.cpu_seconds(mesh.gateway)
    out["postgres"] = postgres_cpu(server)
    return out


def _cpu_line(before: dict[str, float], after: dict[str, float], per: float, unit: str) -> str:
    return ", ".join(f"{k} {(after[k] - before[k]) / per * 1000:.1f}" for k in after) + f" (ms {unit})"


#: The replicas' histograms that split a cancel's time (summed over the replicas, over the cancel phase).
STAGES = (
    "flynn_cancel_to_ack_seconds",
    "flynn_queue_batch_wait_seconds",
    "flynn_queue_commit_seconds",
)


def stages(mesh: QueueReplicas) -> dict[str, tuple[dict[float, float], float, float]]:
    """{histogram: (buckets, sum, count)} summed over the replicas (forwarding hops of CancelRun too)."""
    out: dict[str, tuple[dict[float, float], float, float]] = {}
    for q in mesh.queue:
        text = cancel_latency.scrape(q)
        for name in STAGES:
            b, total, n = cancel_latency.histogram(text, name)
            ob, ototal, on = out.get(name, ({}, 0.0, 0.0))
            out[name] = ({le: ob.get(le, 0.0) + c for le, c in b.items()}, ototal + total, on + n)
        hops = [line for line in text.splitlines() if 'method="CancelRun"' in line and FORWARD_CANCEL in line]
        ob, ototal, on = out.get(FORWARD_CANCEL, ({}, 0.0, 0.0))
        for line in hops:
            value = float(line.rsplit(" ", 1)[1])
            if line.startswith(f"{FORWARD_CANCEL}_sum"):
                ototal += value
            elif line.startswith(f"{FORWARD_CANCEL}_count"):
                on += value
        out[FORWARD_CANCEL] = (ob, ototal, on)
    return out


def measure(root: Path, server: LocalPostgres, n: int, args: argparse.Namespace) -> dict[str, object]:
    tokens = make_tokens(root)
    out: dict[str, object] = {}
    if args.messages > 0:
        url = server.create_database(f"scale_tp_{n}")
        mesh = QueueReplicas(
            root / "tp", tokens, url, replicas=n, config_yaml=THROUGHPUT_CONFIG, lease_seconds=args.lease
        )
        mesh.start()
        try:
            assert mesh.gateway is not None
            out.update(
                asyncio.run(
                    throughput(
                        mesh.gateway.address, tokens.operator, args.messages, args.concurrency, args.sessions
                    )
                )
            )
        finally:
            mesh.stop()
    url = server.create_database(f"scale_cx_{n}")
    mesh = QueueReplicas(
        root / "cx", tokens, url, replicas=n, config_yaml=cancel_latency.CONFIG, lease_seconds=args.lease
    )
    mesh.start()
    try:
        assert mesh.gateway is not None
        time.sleep(1.0)  # start-up work settles
        idle0 = cpu_now(mesh, server)
        time.sleep(args.idle_seconds)
        idle1 = cpu_now(mesh, server)
        print(f"   idle CPU: {_cpu_line(idle0, idle1, args.idle_seconds, 'per second')}", flush=True)
        before, cpu0 = stages(mesh), cpu_now(mesh, server)
        acks, _ = asyncio.run(
            cancel_latency.run(mesh.gateway.address, tokens.operator, True, args.cancel_sessions,
                               args.cancel_rounds, 1, f"n{n}")
        )  # fmt: skip
        after, cpu1 = stages(mesh), cpu_now(mesh, server)
        load = os.getloadavg()[0]
        print(f"   CPU per cancel (cancel phase, runs streaming): {_cpu_line(cpu0, cpu1, len(acks), 'per cancel')}"
              f"; load average {load:.1f}", flush=True)  # fmt: skip
        out["cancel_p50"], out["cancel_p99"] = pct(acks, 50), pct(acks, 99)
        means: dict[str, float] = {}
        for name in (*STAGES, FORWARD_CANCEL):
            b, total, count = cancel_latency.delta(before[name], after[name])
            means[name] = total / count * 1000 if count else 0.0
            if name == "flynn_cancel_to_ack_seconds":
                out["server_p99"] = cancel_latency.bucket_quantile(b, count, 0.99)
        hops = cancel_latency.delta(before[FORWARD_CANCEL], after[FORWARD_CANCEL])[2]
        out["forwarded"] = hops / len(acks) * 100 if acks else 0.0
        if hops:
            out["forward_mean"] = means[FORWARD_CANCEL]
        out["server_mean"] = means["flynn_cancel_to_ack_seconds"]
        out["batch_wait_mean"] = means["flynn_queue_batch_wait_seconds"]
        out["commit_mean"] = means["flynn_queue_commit_seconds"]
        commits = cancel_latency.delta(
            before["flynn_queue_commit_seconds"], after["flynn_queue_commit_seconds"]
        )[2]
        out["commits_per_cancel"] = commits / len(acks) if acks else 0.0
        out["outside_mean"] = sum(acks) / len(acks) - means["flynn_cancel_to_ack_seconds"] if acks else 0.0
        out["idle_cpu_ms_s"] = sum(idle1[k] - idle0[k] for k in idle1) / args.idle_seconds * 1000
        out["cancel_cpu_ms"] = sum(cpu1[k] - cpu0[k] for k in cpu1) / len(acks) * 1000 if acks else 0.0
        out["load"] = load
        if n >= 2 and args.kills > 0:
            pauses = asyncio.run(failover(mesh, tokens.operator, args.kills))
            out["pause_p50"], out["pause_max"], out["kills"] = pct(pauses, 50), max(pauses), len(pauses)
    finally:
        mesh.stop()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--replicas", default="1,2,3")
    ap.add_argument("--messages", type=int, default=2000, help="0: leave the throughput phase out")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--sessions", type=int, default=100)
    ap.add_argument("--cancel-sessions", type=int, default=50)
    ap.add_argument("--cancel-rounds", type=int, default=2)
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--idle-seconds", type=float, default=5.0, help="idle CPU measured over this long")
    ap.add_argument("--lease", type=float, default=5.0, help="session lease seconds (the default is 5)")
    args = ap.parse_args()
    results: dict[int, dict[str, object]] = {}
    with tempfile.TemporaryDirectory(prefix="flynn-bench-scale-") as d:
        root = Path(d)
        root.chmod(0o755)
        pg_dir = root / "pg"
        pg_dir.mkdir()
        pg_dir.chmod(0o755)
        server = LocalPostgres(pg_dir, fsync=True)
        server.init()
        server.start()
        try:
            for n in (int(x) for x in args.replicas.split(",")):
                print(f"-- {n} replica(s)", flush=True)
                results[n] = measure(root / f"r{n}", server, n, args)
                print(f"   {results[n]}", flush=True)
        finally:
            server.stop("fast")
    cols = list(results)
    print(f"\nrun control on PostgreSQL, lease {args.lease:g} s; columns: replicas")
    print(f"{'':44}" + "".join(f"{n:>12}" for n in cols))

    def row(label: str, key: str, fmt: str = "{:.2f}") -> None:
        cells = [fmt.format(results[n][key]) if key in results[n] else "-" for n in cols]
        print(f"{label:44}" + "".join(f"{c:>12}" for c in cells))

    row(f"sustained msg/s ({args.concurrency} callers)", "rate", "{:.0f}")
    row("submit->final p50 (ms)", "final_p50")
    row("submit->final p99 (ms)", "final_p99")
    row("cancel-to-ack via gateway p50 (ms)", "cancel_p50")
    row("cancel-to-ack via gateway p99 (ms)", "cancel_p99")
    row("  server handler->ack mean (ms)", "server_mean")
    row("  server handler->ack p99 (bucket bound)", "server_p99", "{}")
    row("  batch wait for the one in flight mean (ms)", "batch_wait_mean")
    row("  commit mean (ms)", "commit_mean")
    row("  outside the handler mean (gateway...) (ms)", "outside_mean")
    row("commits (all replicas) per cancel, runs streaming", "commits_per_cancel", "{:.1f}")
    row("cancels forwarded to the owner (%)", "forwarded", "{:.0f}")
    row("forwarding hop mean (ms)", "forward_mean")
    row("CPU idle, all processes (ms per s)", "idle_cpu_ms_s", "{:.1f}")
    row("CPU per cancel, all processes (ms)", "cancel_cpu_ms", "{:.1f}")
    row("load average after the cancels", "load", "{:.1f}")
    row("failover pause p50 (s)", "pause_p50")
    row("failover pause max (s)", "pause_max")
    row("kills", "kills", "{}")


if __name__ == "__main__":
    main()
