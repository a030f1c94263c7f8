"""Cancel latency: cancel-to-ack and cancel-to-cancelled p50/p95/p99 with 100 sessions streaming.

    .venv/bin/python -m bench.cancel_latency [--sessions 100] [--rounds 5] [--callers 1,8] [--direct]

Starts real processes: queue_svc (built-in agent streaming a chunk every 50 ms for 20 s) and, unless
--direct or gateway/main.py is missing, a gateway in front of it. Each round starts one streamed run
in each of `sessions` sessions (Gateway/SendMessage), waits until every run is streaming, then
cancels them all (Gateway/CancelRun) while the others keep streaming, with `--callers` cancelling at
a time: 1 (users pressing stop one after another) and 8 (a burst of concurrent cancels), each reported.

- cancel-to-ack: the CancelRun call as the client sees it (through the gateway when used); the server
  answers once cancel_requested is durable.
- cancel-to-cancelled: from sending CancelRun to the RUN_CANCELLED event arriving on a
  RunControl/WatchRunEvents stream (read through the gateway's pass-through when used).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc
from flynn.v1 import gateway_pb2, gateway_pb2_grpc
from flynn.v1 import run_control_pb2 as pb
from flynn.v1 import run_control_pb2_grpc as pb_grpc

from tests.support.mesh import ServiceProcess, free_port, make_tokens

CONFIG = """
server:
  queue: {mode: followup, cancel_deadline: 2s}
  agent: {think_time: 0s, chunks: 400, chunk_interval: 50ms}
"""


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


class Bench:
    def __init__(self, address: str, token: str, via_gateway: bool) -> None:
        self.md = (("authorization", f"Bearer {token}"),)
        self.ch = grpc.aio.insecure_channel(address)
        self.via_gateway = via_gateway
        self.gw = gateway_pb2_grpc.GatewayStub(self.ch)
        self.rc = pb_grpc.RunControlStub(self.ch)
        self.streaming: set[str] = set()
        self.cancelled_at: dict[str, float] = {}
        self.waiters: dict[str, asyncio.Event] = {}

    async def watch(self) -> None:
        # Like a real consumer (the reactions service), it leaves the output chunks out.
        req = pb.WatchRunEventsRequest(after_seq=0, exclude_output=True)
        async for resp in self.rc.WatchRunEvents(req, metadata=self.md):
            e = resp.event
            if e.type == pb.RUN_EVENT_TYPE_RUN_CANCELLED:
                self.cancelled_at[e.run_id] = time.perf_counter()
                ev = self.waiters.get(e.run_id)
                if ev is not None:
                    ev.set()

    async def submit(self, session: str, key: str) -> str:
        if self.via_gateway:
            r: Any = await self.gw.SendMessage(
                gateway_pb2.SendMessageRequest(channel="bench", session_key=session, text="stream please", idempotency_key=key),
                metadata=self.md, timeout=10,
            )  # fmt: skip
        else:
            r = await self.rc.SubmitMessage(
                pb.SubmitMessageRequest(channel="bench", session_key=session, text="stream please", idempotency_key=key),
                metadata=self.md, timeout=10,
            )  # fmt: skip
        return str(r.run_id)

    async def cancel(self, run_id: str) -> None:
        if self.via_gateway:
            await self.gw.CancelRun(
                gateway_pb2.GatewayCancelRunRequest(run_id=run_id, reason="bench"),
                metadata=self.md,
                timeout=10,
            )
        else:
            await self.rc.CancelRun(
                pb.CancelRunRequest(run_id=run_id, reason="bench"), metadata=self.md, timeout=10
            )


async def run(
    address: str, token: str, via_gateway: bool, sessions: int, rounds: int, callers: int, tag: str
) -> tuple[list[float], list[float]]:
    b = Bench(address, token, via_gateway)
    watcher = asyncio.ensure_future(b.watch())
    acks: list[float] = []
    settles: list[float] = []
    try:
        for rnd in range(rounds):
            runs = await asyncio.gather(*(b.submit(f"s{i}", f"{tag}-r{rnd}-s{i}") for i in range(sessions)))
            await asyncio.sleep(0.3)
            for r in runs:  # every run is streaming before the cancels start
                got = await b.rc.GetRun(pb.GetRunRequest(run_id=r), metadata=b.md, timeout=10)
                if got.run.state != pb.RUN_STATE_STARTED or not got.run.output:
                    raise RuntimeError(f"run {r} is not streaming: {got.run.state}")
            queue = list(runs)

            async def canceller(queue: list[str] = queue) -> None:
                while queue:
                    run_id = queue.pop()
                    b.waiters[run_id] = asyncio.Event()
                    t0 = time.perf_counter()
                    await b.cancel(run_id)
                    acks.append((time.perf_counter() - t0) * 1000)
                    await asyncio.wait_for(b.waiters[run_id].wait(), 10)
                    settles.append((b.cancelled_at[run_id] - t0) * 1000)

            await asyncio.gather(*(canceller() for _ in range(callers)))
    finally:
        watcher.cancel()
        await b.ch.close(None)
    return acks, settles


def cpu_seconds(proc: ServiceProcess) -> float:
    """User + system CPU of a service process so far."""
    assert proc.proc is not None
    fields = Path(f"/proc/{proc.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def scrape(proc: ServiceProcess) -> str:
    """The queue process's /metrics text (the port file holds '<grpc> <metrics>')."""
    port_file = proc.data_dir / f".{proc.service}.port"
    metrics_port = int(port_file.read_text().split()[1])
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
        return str(r.read().decode())


def histogram(text: str, name: str) -> tuple[dict[float, float], float, float]:
    buckets: dict[float, float] = {}
    total = count = 0.0
    for line in text.splitlines():
        if line.startswith(f"{name}_bucket"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            buckets[float("inf") if le == "+Inf" else float(le)] = float(line.rsplit(" ", 1)[1])
        elif line.startswith(f"{name}_sum"):
            total = float(line.rsplit(" ", 1)[1])
        elif line.startswith(f"{name}_count"):
            count = float(line.rsplit(" ", 1)[1])
    return buckets, total, count


def bucket_quantile(buckets: dict[float, float], count: float, q: float) -> str:
    for le in sorted(buckets):
        if count and buckets[le] >= q * count:
            top = max((b for b in buckets if b != float("inf")), default=0.0)
            return f"> {top * 1000:g} ms" if le == float("inf") else f"<= {le * 1000:g} ms"
    return "n/a"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sessions", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--direct", action="store_true", help="call queue_svc directly, not through the gateway")
    ap.add_argument("--callers", default="1,8", help="concurrent cancelling callers, one phase each")
    args = ap.parse_args()
    phases = [int(c) for c in args.callers.split(",") if c.strip()]
    via_gateway = not args.direct and importlib.util.find_spec("gateway.main") is not None
    with tempfile.TemporaryDirectory(prefix="flynn-bench-") as d:
        root = Path(d)
        tokens = make_tokens(root)
        cfg = root / "queue.yaml"
        cfg.write_text(CONFIG)
        queue = ServiceProcess("queue", "queue_svc.main", root / "queue", tokens,
                               extra=["--queue-config-file", str(cfg), "--log-level", "warning"])  # fmt: skip
        queue.start()
        procs = [queue]
        address = queue.address
        try:
            if via_gateway:
                dead = {b: f"127.0.0.1:{free_port()}" for b in ("config", "reactions", "nodes", "voice")}
                gw = ServiceProcess("gateway", "gateway.main", root / "gateway", tokens,
                                    addresses={"queue": queue.address, **dead}, extra=["--log-level", "warning"])  # fmt: skip
                gw.start()
                procs.append(gw)
                address = gw.address
            results: list[Phase] = []
            before = scrape(queue)
            cpu_before = {p.service: cpu_seconds(p) for p in procs}
            for callers in phases:
                acks, settles = asyncio.run(
                    run(
                        address,
                        tokens.operator,
                        via_gateway,
                        args.sessions,
                        args.rounds,
                        callers,
                        f"c{callers}",
                    )
                )
                after = scrape(queue)
                cpu_after = {p.service: cpu_seconds(p) for p in procs}
                cpu = {k: cpu_after[k] - cpu_before[k] for k in cpu_after}
                results.append((callers, acks, settles, before, after, cpu, os.getloadavg()[0]))
                before, cpu_before = after, cpu_after
        finally:
            for p in reversed(procs):
                p.stop()
    report(results, args.sessions, via_gateway)


Phase = tuple[int, list[float], list[float], str, str, dict[str, float], float]


def report(results: list[Phase], sessions: int, via_gateway: bool) -> None:
    """Print each phase: client-side percentiles, CPU, the server's histograms and where the time goes."""
    path = (
        "through the gateway (Gateway/CancelRun)"
        if via_gateway
        else "direct to queue_svc (RunControl/CancelRun)"
    )
    for callers, acks, settles, before, after, cpu, load in results:
        print(
            f"cancel latency, {sessions} sessions streaming, {len(acks)} cancels, {callers} cancelling "
            f"caller(s) at a time, {path} (load average {load:.1f} at the end of the phase)"
        )
        print(
            f"  cancel-to-ack:       p50 {pct(acks, 50):.2f} ms  p95 {pct(acks, 95):.2f} ms  p99 {pct(acks, 99):.2f} ms"
        )
        print(
            f"  cancel-to-cancelled: p50 {pct(settles, 50):.2f} ms  p95 {pct(settles, 95):.2f} ms  p99 {pct(settles, 99):.2f} ms"
        )
        per = ", ".join(f"{k} {v / len(acks) * 1000:.2f} ms" for k, v in cpu.items())
        print(f"  CPU per cancel (whole phase: streaming runs, watch, submits included): {per}")
        print("  server side (queue_svc histograms over this phase, bucket bounds):")
        means: dict[str, float] = {}
        for name in (
            "flynn_cancel_to_ack_seconds",
            "flynn_cancel_to_cancelled_seconds",
            "flynn_queue_batch_wait_seconds",
            "flynn_queue_commit_seconds",
        ):
            b, total, n = delta(histogram(before, name), histogram(after, name))
            qs = "  ".join(f"p{int(q * 100)} {bucket_quantile(b, n, q)}" for q in (0.5, 0.95, 0.99))
            mean = f", mean {total / n * 1000:.2f} ms" if n else ""
            means[name] = total / n * 1000 if n else float("nan")
            print(f"    {name}: {qs}  (n={int(n)}{mean})")
        outside = sum(acks) / len(acks) - means["flynn_cancel_to_ack_seconds"]
        print(
            f"  where the time goes (means): server handler->ack {means['flynn_cancel_to_ack_seconds']:.2f} ms "
            f"(of which: a batch waits for the one in flight {means['flynn_queue_batch_wait_seconds']:.2f} ms, "
            f"a commit takes {means['flynn_queue_commit_seconds']:.2f} ms); outside the handler "
            f"({'gateway, ' if via_gateway else ''}transport, client) {outside:.2f} ms"
        )


def delta(
    a: tuple[dict[float, float], float, float], b: tuple[dict[float, float], float, float]
) -> tuple[dict[float, float], float, float]:
    """Histogram b minus histogram a (the observations made between the two scrapes)."""
    return {le: c - a[0].get(le, 0.0) for le, c in b[0].items()}, b[1] - a[1], b[2] - a[2]


if __name__ == "__main__":
    main()
