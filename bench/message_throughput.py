"""Run control throughput: submit -> final latency and sustained messages/s with the default agent.

    .venv/bin/python -m bench.message_throughput [--messages 3000] [--concurrency 32] [--sessions 200]

Starts queue_svc as a real process (its own data dir, SQLite with synchronous=FULL, the built-in
agent at zero think time, one chunk), opens StreamReplies, then submits messages from
`concurrency` callers spread over `sessions` sessions (followup mode, so every message is its own
run). Latency is from the submit call to the final reply arriving on the stream; the rate is
messages / wall time until the last final arrived. Bounded by --messages.
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

from tests.support.mesh import ServiceProcess, make_tokens

CONFIG = "server: {queue: {mode: followup, cap: 1000}, agent: {think_time: 0s, chunks: 1}}\n"


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def run(address: str, token: str, messages: int, concurrency: int, sessions: int) -> dict[str, float]:
    md = (("authorization", f"Bearer {token}"),)
    async with grpc.aio.insecure_channel(address) as ch:
        stub = pb_grpc.RunControlStub(ch)
        # Warm up (and learn the reply cursor to start after).
        for i in range(50):
            await stub.SubmitMessage(
                pb.SubmitMessageRequest(session_key="warm", channel="bench", text=f"w{i}", idempotency_key=f"w{i}"),
                metadata=md, timeout=10,
            )  # fmt: skip
        await asyncio.sleep(0.5)
        sent_at: dict[str, float] = {}
        final_at: dict[str, float] = {}
        done = asyncio.Event()
        stream = stub.StreamReplies(pb.StreamRepliesRequest(channels=["bench-run"]), metadata=md)

        async def reader() -> None:
            async for resp in stream:
                final_at[resp.reply.run_id] = time.perf_counter()
                if len(final_at) >= messages:
                    done.set()
                    return

        rt = asyncio.ensure_future(reader())
        await asyncio.sleep(0.2)
        submit_ms: list[float] = []
        counter = iter(range(messages))

        async def caller() -> None:
            for i in counter:
                t0 = time.perf_counter()
                resp = await stub.SubmitMessage(
                    pb.SubmitMessageRequest(session_key=f"s{i % sessions}", channel="bench-run", sender="b",
                                            text=f"message {i}", idempotency_key=f"m{i}"),
                    metadata=md, timeout=30,
                )  # fmt: skip
                submit_ms.append((time.perf_counter() - t0) * 1000)
                sent_at[resp.run_id] = t0

        t_start = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(concurrency)))
        await asyncio.wait_for(done.wait(), 120)
        wall = time.perf_counter() - t_start
        stream.cancel()
        rt.cancel()
        lat = [(final_at[r] - t) * 1000 for r, t in sent_at.items() if r in final_at]
        return {
            "messages": float(messages),
            "wall_s": wall,
            "rate": messages / wall,
            "final_p50": pct(lat, 50),
            "final_p95": pct(lat, 95),
            "final_p99": pct(lat, 99),
            "ack_p50": pct(submit_ms, 50),
            "ack_p99": pct(submit_ms, 99),
        }


async def open_loop(address: str, token: str, rate: float, messages: int, sessions: int) -> dict[str, float]:
    """Submit at a fixed rate (not waiting for answers) and measure submit -> final latency."""
    md = (("authorization", f"Bearer {token}"),)
    async with grpc.aio.insecure_channel(address) as ch:
        stub = pb_grpc.RunControlStub(ch)
        sent_at: dict[str, float] = {}
        final_at: dict[str, float] = {}
        done = asyncio.Event()
        stream = stub.StreamReplies(pb.StreamRepliesRequest(channels=["bench-open"]), metadata=md)

        async def reader() -> None:
            async for resp in stream:
                final_at[resp.reply.run_id] = time.perf_counter()
                if len(final_at) >= messages:
                    done.set()
                    return

        rt = asyncio.ensure_future(reader())
        await asyncio.sleep(0.2)

        async def one(i: int, t0: float) -> None:
            resp = await stub.SubmitMessage(
                pb.SubmitMessageRequest(session_key=f"o{i % sessions}", channel="bench-open", sender="b",
                                        text=f"message {i}", idempotency_key=f"o{i}"),
                metadata=md, timeout=30,
            )  # fmt: skip
            sent_at[resp.run_id] = t0

        start = time.perf_counter()
        tasks = []
        for i in range(messages):
            target = start + i / rate
            delay = target - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(one(i, time.perf_counter())))
        await asyncio.gather(*tasks)
        await asyncio.wait_for(done.wait(), 120)
        wall = time.perf_counter() - start
        stream.cancel()
        rt.cancel()
        lat = [(final_at[r] - t) * 1000 for r, t in sent_at.items() if r in final_at]
        return {"rate": messages / wall, "p50": pct(lat, 50), "p95": pct(lat, 95), "p99": pct(lat, 99)}


async def one_by_one(address: str, token: str, n: int) -> list[float]:
    """Unloaded submit -> final latency: one message at a time."""
    md = (("authorization", f"Bearer {token}"),)
    out = []
    async with grpc.aio.insecure_channel(address) as ch:
        stub = pb_grpc.RunControlStub(ch)
        stream = stub.StreamReplies(pb.StreamRepliesRequest(channels=["bench-solo"]), metadata=md)
        await asyncio.sleep(0.2)
        for i in range(n):
            t0 = time.perf_counter()
            await stub.SubmitMessage(
                pb.SubmitMessageRequest(session_key="solo", channel="bench-solo", text=f"x{i}", idempotency_key=f"x{i}"),
                metadata=md, timeout=10,
            )  # fmt: skip
            await stream.read()
            out.append((time.perf_counter() - t0) * 1000)
        stream.cancel()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=3000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--sessions", type=int, default=200)
    ap.add_argument("--rate", type=float, default=500.0, help="offered load of the open-loop phase, msg/s")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="flynn-bench-") as d:
        root = Path(d)
        tokens = make_tokens(root)
        cfg = root / "queue.yaml"
        cfg.write_text(CONFIG)
        proc = ServiceProcess("queue", "queue_svc.main", root / "queue", tokens,
                              extra=["--queue-config-file", str(cfg), "--log-level", "warning"])  # fmt: skip
        proc.start()
        try:
            assert proc.proc is not None
            solo = asyncio.run(one_by_one(proc.address, tokens.operator, 300))
            cpu0 = cpu_seconds(proc.proc.pid)
            r = asyncio.run(
                run(proc.address, tokens.operator, args.messages, args.concurrency, args.sessions)
            )
            cpu = cpu_seconds(proc.proc.pid) - cpu0
            ol = asyncio.run(
                open_loop(proc.address, tokens.operator, args.rate, int(args.rate * 6), args.sessions)
            )
        finally:
            proc.stop()
    print("run control throughput (direct to queue_svc, built-in agent, think_time 0, 1 chunk, followup)")
    print(
        f"  unloaded submit->final: p50 {pct(solo, 50):.2f} ms  p95 {pct(solo, 95):.2f} ms  p99 {pct(solo, 99):.2f} ms"
    )
    print(f"  loaded ({args.concurrency} callers, {args.sessions} sessions, {args.messages} messages):")
    print(
        f"    sustained {r['rate']:.0f} msg/s over {r['wall_s']:.2f} s; queue_svc CPU {cpu / r['wall_s'] * 100:.0f}%"
    )
    print(f"    submit ack: p50 {r['ack_p50']:.2f} ms  p99 {r['ack_p99']:.2f} ms")
    print(
        f"    submit->final: p50 {r['final_p50']:.2f} ms  p95 {r['final_p95']:.2f} ms  p99 {r['final_p99']:.2f} ms"
    )
    print(f"  open loop at {args.rate:.0f} msg/s offered for 6 s (achieved {ol['rate']:.0f} msg/s):")
    print(f"    submit->final: p50 {ol['p50']:.2f} ms  p95 {ol['p95']:.2f} ms  p99 {ol['p99']:.2f} ms")


if __name__ == "__main__":
    main()
