"""The floor of a grpc.aio server-stream fan-out on this machine: what config propagation cannot beat.

    .venv/bin/python -m bench.grpc_fanout_floor [--streams 1000] [--procs 4] [--rounds 20] [--size 1000]

A bare grpc.aio server (no auth, no interceptor, no storage) holds `--streams` server streams from
`--procs` bare grpc.aio client processes (100 streams per connection, as bench.config_propagation
does). Each round it hands one pre-built message to every stream (one shared wake-up pass; each
stream writes it with context.write) and the clients note when it arrived. Printed: the time for
the LAST stream to receive each round (p50/p90, CLOCK_MONOTONIC shared by the processes), and the
server's and the clients' CPU per round. Bounded: every wait has a timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc

SERVICE, METHOD = "floor.Floor", "Watch"


def _same(b: bytes) -> bytes:
    return b


class _State:
    round = -1
    msg = b""


async def serve(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    waiters: list[asyncio.Future[None]] = []
    state = _State()
    connected = 0

    async def watch(request: bytes, context: Any) -> None:
        nonlocal connected
        connected += 1
        await context.write(b"hello")
        last = -1
        while True:
            if state.round == last:
                fut = loop.create_future()
                waiters.append(fut)
                await fut
            last = state.round
            await context.write(state.msg)

    handler = grpc.unary_stream_rpc_method_handler(
        watch, request_deserializer=_same, response_serializer=_same
    )
    server = grpc.aio.server(options=[("grpc.max_concurrent_streams", 100_000)])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {METHOD: handler}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    deadline = time.monotonic() + 60
    while connected < args.streams and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)
    rounds = []
    payload = b"x" * args.size
    for r in range(args.rounds):
        c0, t0 = time.process_time(), time.monotonic()
        state.round, state.msg = r, payload + r.to_bytes(4, "big")
        ready, waiters[:] = list(waiters), []
        for fut in ready:
            if not fut.done():
                fut.set_result(None)
        await asyncio.sleep(args.spacing)
        rounds.append((t0, time.process_time() - c0))
    print(json.dumps(rounds), flush=True)
    await server.stop(0)


async def watch_client(args: argparse.Namespace) -> None:
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{args.port}") for _ in range((args.count + 99) // 100)]
    seen: dict[int, list[float]] = {}

    async def follow(i: int) -> None:
        call = channels[i % len(channels)].unary_stream(
            f"/{SERVICE}/{METHOD}", request_serializer=_same, response_deserializer=_same
        )(b"")
        async for msg in call:
            if msg != b"hello":
                seen.setdefault(int.from_bytes(msg[-4:], "big"), []).append(time.monotonic())

    tasks = [asyncio.create_task(follow(i)) for i in range(args.count)]
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    c0 = time.process_time()
    await asyncio.wait_for(stop.wait(), 600)
    cpu = time.process_time() - c0
    summary = {str(r): [max(ts), len(ts)] for r, ts in seen.items()}
    await asyncio.to_thread(Path(args.out).write_text, json.dumps({"seen": summary, "cpu": cpu}))
    for t in tasks:
        t.cancel()


def drive(args: argparse.Namespace) -> None:
    me = [sys.executable, "-m", "bench.grpc_fanout_floor"]
    common = ["--streams", str(args.streams), "--rounds", str(args.rounds), "--spacing", str(args.spacing)]
    srv = subprocess.Popen(
        [*me, "--serve", *common, "--size", str(args.size)],
        stdout=subprocess.PIPE,
        text=True,
        stderr=subprocess.DEVNULL,
    )
    assert srv.stdout is not None
    port = int(srv.stdout.readline())
    with tempfile.TemporaryDirectory(prefix="flynn-floor-") as tmp:
        per = [
            args.streams // args.procs + (1 if i < args.streams % args.procs else 0)
            for i in range(args.procs)
        ]
        outs = [Path(tmp) / f"c{i}.json" for i in range(args.procs)]
        clients = [
            subprocess.Popen(
                [*me, "--client", "--port", str(port), "--count", str(n), "--out", str(out)],
                stderr=subprocess.DEVNULL,
            )
            for n, out in zip(per, outs, strict=True)
        ]
        try:
            rounds = json.loads(srv.stdout.readline())
            srv.wait(30)
        finally:
            for c in clients:
                c.send_signal(signal.SIGTERM)
            for c in clients:
                c.wait(30)
            if srv.poll() is None:
                srv.kill()
        last: dict[int, float] = {}
        count: dict[int, int] = {}
        client_cpu = 0.0
        for out in outs:
            data = json.loads(out.read_text())
            client_cpu += float(data["cpu"])
            for r, (t, n) in data["seen"].items():
                last[int(r)] = max(last.get(int(r), 0.0), float(t))
                count[int(r)] = count.get(int(r), 0) + int(n)
    lat = sorted((last[r] - t0) * 1000 for r, (t0, _) in enumerate(rounds) if count.get(r) == args.streams)
    cpu = sorted(c * 1000 for _, c in rounds)
    print(
        f"{args.streams} bare streams, {args.procs} client processes, {args.size}-byte message:"
        f" last stream p50 {lat[len(lat) // 2]:.1f} ms, p90 {lat[int(len(lat) * 0.9)]:.1f} ms"
        f" ({len(lat)}/{args.rounds} rounds complete); server CPU per round p50 {cpu[len(cpu) // 2]:.1f} ms;"
        f" client CPU per round {client_cpu / args.rounds * 1000:.1f} ms (connecting included)"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--out", default="", help=argparse.SUPPRESS)
    p.add_argument("--streams", type=int, default=1000)
    p.add_argument("--procs", type=int, default=4)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--spacing", type=float, default=0.4, help="seconds between rounds")
    p.add_argument("--size", type=int, default=1000, help="message bytes (a config is ~1 KB)")
    args = p.parse_args()
    if args.serve:
        asyncio.run(serve(args))
    elif args.client:
        asyncio.run(watch_client(args))
    else:
        drive(args)


if __name__ == "__main__":
    main()
