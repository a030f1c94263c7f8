"""End to end through the gateway: SendMessage → final reply latency, sustained messages/s, and the
rollback commands' propagation time.

    .venv/bin/python -m bench.e2e [--latency-messages 300] [--messages 2000] [--concurrency 32] [--reps 3]
    .venv/bin/python -m bench.e2e --tracing off,1.0,0.1 [--rounds 4] [--messages 2000] [--concurrency 32]

Starts the whole mesh as real processes (tests/support/flow.py: config, queue, reactions, nodes,
voice, gateway; SQLite with synchronous=FULL), with the default agent at zero think time, followup
mode (every message its own run), no reactions and no speech, so the figures are the message path
itself. A channel client talks only to the gateway: SendMessage, and the final arriving on
Gateway.StreamReplies.
- latency: one caller, one message at a time (send, wait for its final); p50/p95/p99.
- throughput: `concurrency` callers over 200 sessions; messages / wall time until the last final.
- rollback propagation: for each playbook step, from the UpdateConfig answer (the commit) to
  (a) the behaviour observed flipped through the gateway (queue: effective mode collect on the next
  message; reactions: Reactions.ListRules empty; canvas: PutArtifact refused; voice: a voice note
  refused by the gateway; nodes: a connected companion node disconnected), and (b) every watcher
  reporting the revision in ListWatchers (reports are deliberately delayed 0.25-1 s after the apply).
Bounded: every wait has a timeout.

--tracing compares tracing settings side by side in one run instead (docs/operations/OBSERVABILITY.md):
one mesh per setting, all started at once ("off": no OTEL_* variables, as today; a ratio r:
OTEL_TRACES_EXPORTER=otlp, parentbased sampler at r, exporting to a real OTLP/gRPC receiver in its
own process, tests/support/otlp.py). The settings take turns, `rounds` times, each turn a latency pass
(one caller, `latency-messages` messages) and a throughput pass (`messages / rounds` messages,
`concurrency` callers), so the machine's background load falls on every setting alike. Per setting:
latency p50/p99, messages/s, the CPU the mesh's processes spent per message (in all and by service),
and spans received.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
from flynn.v1 import (
    canvas_pb2,
    canvas_pb2_grpc,
    common_pb2,
    gateway_pb2,
    gateway_pb2_grpc,
    nodes_pb2,
    nodes_pb2_grpc,
    reactions_pb2,
    reactions_pb2_grpc,
    run_control_pb2,
)

from examples.companion_node import CompanionNode
from flynn_cli import playbook_cmds
from tests.support.flow import FLOW_SEED, FlowMesh
from tests.support.mesh import make_tokens
from tests.support.otlp import otel_env

FINAL = run_control_pb2.REPLY_KIND_FINAL


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))] if s else 0.0


def seed() -> dict[str, object]:
    s = copy.deepcopy(FLOW_SEED)
    s["server"]["queue"]["mode"] = "followup"
    s["server"]["queue"]["cap"] = 1000
    s["server"]["agent"] = {"think_time": "0s", "chunks": 1, "chunk_interval": "0s", "run_timeout": "60s"}
    s["tts"] = {"enabled": False, "enabled_channels": []}
    s["automation"] = {"reactions": []}
    return s


async def message_path(mesh: FlowMesh, latency_messages: int, messages: int, concurrency: int) -> None:
    md = mesh.md()
    async with grpc.aio.insecure_channel(mesh.gateway) as ch:
        gw = gateway_pb2_grpc.GatewayStub(ch)
        finals: dict[str, float] = {}
        waiters: dict[str, asyncio.Future[float]] = {}
        stream = gw.StreamReplies(gateway_pb2.GatewayStreamRepliesRequest(channels=["bench"]), metadata=md)

        async def reader() -> None:
            async for resp in stream:
                r = resp.reply
                if r.kind != FINAL:
                    continue
                now = time.perf_counter()
                finals[r.run_id] = now
                fut = waiters.pop(r.run_id, None)
                if fut is not None and not fut.done():
                    fut.set_result(now)

        task = asyncio.create_task(reader())
        loop = asyncio.get_running_loop()

        async def send(session: str, key: str) -> float:
            t0 = time.perf_counter()
            resp = await gw.SendMessage(
                gateway_pb2.SendMessageRequest(
                    channel="bench", session_key=session, sender="b", text="hi", idempotency_key=key
                ),
                metadata=md,
                timeout=30,
            )
            if resp.run_id in finals:
                return finals[resp.run_id] - t0
            fut = waiters.setdefault(resp.run_id, loop.create_future())
            if resp.run_id in finals and not fut.done():  # arrived between the check and the future
                fut.set_result(finals[resp.run_id])
            return await asyncio.wait_for(fut, 30) - t0

        for i in range(30):  # warm up
            await send(f"bench:warm{i % 5}", f"warm-{i}")
        lat = [await send("bench:lat", f"lat-{i}") for i in range(latency_messages)]
        print(
            f"latency (1 caller, {latency_messages} messages): SendMessage -> final on StreamReplies "
            f"p50 {pct(lat, 50) * 1000:.1f} ms  p95 {pct(lat, 95) * 1000:.1f} ms  p99 {pct(lat, 99) * 1000:.1f} ms"
        )
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(messages):
            queue.put_nowait(i)
        lats: list[float] = []

        async def worker() -> None:
            while not queue.empty():
                i = queue.get_nowait()
                lats.append(await send(f"bench:s{i % 200}", f"tp-{i}"))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
        print(
            f"throughput ({concurrency} callers, 200 sessions, {messages} messages): "
            f"{messages / wall:.0f} messages/s sustained (send to last final {wall:.2f} s); "
            f"latency under load p50 {pct(lats, 50) * 1000:.1f} ms  p99 {pct(lats, 99) * 1000:.1f} ms"
        )
        task.cancel()


CANARY: dict[str, dict[str, Any]] = {
    "queue": {
        "server.queue.mode": "followup",
        "server.queue.overrides": {"sessions": {"bench:rb": "interrupt"}},
        "server.queue.rollout": {"mode": "steer", "rollout": {"basis_points": 500}},
    },
    "reactions": {
        "automation.reactions": [
            {
                "id": "ack",
                "enabled": True,
                "trigger": {"event": "message_received"},
                "actions": [{"ack": {"emoji": "x"}}],
            }
        ]
    },
    "canvas": {"server.nodes.feature_gates.ui.canvas": True},
    "voice": {"audio.enabled": True, "tts.enabled": True},
    "nodes": {"server.nodes.enabled": True},
}


def flipped(mesh: FlowMesh, step: str, node: CompanionNode | None, n: int) -> bool:
    ch = mesh.channel()
    op = mesh.md("operator")
    if step == "queue":
        r = mesh.send("bench:rb", "x", f"rb-{n}-{time.monotonic_ns()}", channel="bench")
        return r.effective_mode.mode == 1  # QUEUE_MODE_COLLECT
    if step == "reactions":
        rx = reactions_pb2_grpc.ReactionsStub(ch)
        return len(rx.ListRules(reactions_pb2.ListRulesRequest(), metadata=op, timeout=5).rules) == 0
    if step == "canvas":
        try:
            canvas_pb2_grpc.CanvasStub(ch).PutArtifact(
                canvas_pb2.PutArtifactRequest(name="bench/rb", content_type="text/plain", content=b"x"),
                metadata=op,
                timeout=5,
            )
            return False
        except grpc.RpcError as e:
            return e.code() == grpc.StatusCode.FAILED_PRECONDITION
    if step == "voice":
        try:
            mesh.send("bench:v", "", f"v-{time.monotonic_ns()}", audio=common_pb2.Audio(content=b"RIFFxxxx"))
            return False
        except grpc.RpcError as e:
            return e.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert node is not None
    return not node.registered.is_set()


async def rollbacks(mesh: FlowMesh, reps: int) -> None:
    nodes = nodes_pb2_grpc.NodesStub(mesh.channel())
    issued = nodes.IssueNodeToken(
        nodes_pb2.IssueNodeTokenRequest(node_id="bench-desk", role="desktop"),
        metadata=mesh.md("operator"),
        timeout=10,
    )
    args = argparse.Namespace(
        addr=mesh.gateway, token=mesh.tokens.operator, timeout=10.0, reason="bench", dry_run=False
    )
    rows: dict[str, tuple[list[float], list[float]]] = {s: ([], []) for s in playbook_cmds.STEPS}
    for n in range(reps):
        for step_name, step in playbook_cmds.STEPS.items():
            await asyncio.to_thread(mesh.update, CANARY[step_name], f"bench: canary state for {step_name}")
            node = None
            task = None
            if step_name == "nodes":
                node = CompanionNode(mesh.gateway, "bench-desk", issued.token, role="desktop")
                task = node.start()
                await asyncio.wait_for(node.registered.wait(), 20)
            resp = await asyncio.to_thread(playbook_cmds.apply_step, args, step)
            assert resp is not None and not resp.unchanged
            t0 = time.perf_counter()
            deadline = t0 + 10
            while not await asyncio.to_thread(flipped, mesh, step_name, node, n):
                if time.perf_counter() > deadline:
                    raise TimeoutError(f"{step_name} did not flip within 10 s")
                await asyncio.sleep(0.005)
            rows[step_name][0].append(time.perf_counter() - t0)
            waited, _, behind, _ = await asyncio.to_thread(
                playbook_cmds.wait_applied, args, resp.revision, 10
            )
            assert not behind, behind
            rows[step_name][1].append(time.perf_counter() - t0)
            if node is not None and task is not None:
                await node.stop()
                await asyncio.wait_for(task, 10)
    print(f"rollback propagation ({reps} runs each; from the commit):")
    for step_name, (flip, acked) in rows.items():
        print(
            f"  rollback {step_name:<9} behaviour flipped: median {pct(flip, 50) * 1000:.0f} ms, max {max(flip) * 1000:.0f} ms;"
            f"  every watcher reported: median {pct(acked, 50) * 1000:.0f} ms, max {max(acked) * 1000:.0f} ms"
        )


class Channel:
    """A channel client of one mesh: SendMessage, and the final arriving on Gateway.StreamReplies."""

    def __init__(self, mesh: FlowMesh, ch: grpc.aio.Channel) -> None:
        self.md = mesh.md()
        self.gw = gateway_pb2_grpc.GatewayStub(ch)
        self.finals: dict[str, float] = {}
        self.waiters: dict[str, asyncio.Future[float]] = {}
        self.stream = self.gw.StreamReplies(
            gateway_pb2.GatewayStreamRepliesRequest(channels=["bench"]), metadata=self.md
        )
        self.task = asyncio.create_task(self._reader())

    async def _reader(self) -> None:
        async for resp in self.stream:
            r = resp.reply
            if r.kind != FINAL:
                continue
            now = time.perf_counter()
            self.finals[r.run_id] = now
            fut = self.waiters.pop(r.run_id, None)
            if fut is not None and not fut.done():
                fut.set_result(now)

    async def send(self, session: str, key: str) -> float:
        t0 = time.perf_counter()
        resp = await self.gw.SendMessage(
            gateway_pb2.SendMessageRequest(
                channel="bench", session_key=session, sender="b", text="hi", idempotency_key=key
            ),
            metadata=self.md,
            timeout=30,
        )
        if resp.run_id in self.finals:
            return self.finals.pop(resp.run_id) - t0
        fut = self.waiters.setdefault(resp.run_id, asyncio.get_running_loop().create_future())
        if resp.run_id in self.finals and not fut.done():
            fut.set_result(self.finals[resp.run_id])
        done = await asyncio.wait_for(fut, 30)
        self.finals.pop(resp.run_id, None)
        return done - t0

    def close(self) -> None:
        self.task.cancel()
        self.stream.cancel()


def cpu_by_service(mesh: FlowMesh) -> dict[str, float]:
    """User + system CPU time spent so far by each of the mesh's service processes (/proc/<pid>/stat)."""

    return {name: cpu_seconds(proc.proc.pid) for name, proc in mesh.procs.items() if proc.proc is not None}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has spent so far (/proc/<pid>/stat)."""
    import os

    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime (fields 14, 15)


def setting_label(setting: str) -> str:
    ratio, _, again = setting.partition("@")  # "off@2": a second mesh of the same setting (noise check)
    label = "off" if ratio == "off" else f"on, {float(ratio) * 100:g}% sampled"
    return f"{label} #{again}" if again else label


async def tracing_overhead(
    meshes: dict[str, FlowMesh], receiver: ReceiverProcess, rounds: int, latency_messages: int, messages: int,
    concurrency: int,
) -> None:  # fmt: skip
    chans: dict[str, grpc.aio.Channel] = {k: grpc.aio.insecure_channel(m.gateway) for k, m in meshes.items()}
    clients = {k: Channel(meshes[k], chans[k]) for k in meshes}
    lat: dict[str, list[float]] = {k: [] for k in meshes}
    load: dict[str, list[float]] = {k: [] for k in meshes}
    wall: dict[str, float] = dict.fromkeys(meshes, 0.0)
    cpu: dict[str, float] = dict.fromkeys(meshes, 0.0)
    by_service: dict[str, dict[str, float]] = {k: {} for k in meshes}
    sent: dict[str, int] = dict.fromkeys(meshes, 0)
    per_round = max(messages // rounds, concurrency)
    try:
        for k, c in clients.items():  # warm up
            for i in range(30):
                await c.send(f"bench:warm{i % 5}", f"warm-{k}-{i}")
        for rnd in range(rounds):
            order = list(meshes) if rnd % 2 == 0 else list(reversed(meshes))
            for k in order:
                c = clients[k]
                cpu0 = cpu_by_service(meshes[k])
                for i in range(latency_messages // rounds):
                    lat[k].append(await c.send("bench:lat", f"lat-{rnd}-{i}"))
                queue: asyncio.Queue[int] = asyncio.Queue()
                for i in range(per_round):
                    queue.put_nowait(i)

                async def worker(
                    c: Channel = c, rnd: int = rnd, k: str = k, queue: asyncio.Queue[int] = queue
                ) -> None:
                    while not queue.empty():
                        i = queue.get_nowait()
                        load[k].append(await c.send(f"bench:s{i % 200}", f"tp-{rnd}-{i}"))

                t0 = time.perf_counter()
                await asyncio.gather(*(worker() for _ in range(concurrency)))
                wall[k] += time.perf_counter() - t0
                for name, spent in cpu_by_service(meshes[k]).items():
                    by_service[k][name] = by_service[k].get(name, 0.0) + spent - cpu0.get(name, 0.0)
                    cpu[k] += spent - cpu0.get(name, 0.0)
                sent[k] += per_round + latency_messages // rounds
    finally:
        for c in clients.values():
            c.close()
        for ch in chans.values():
            await ch.close(None)
    await asyncio.sleep(1.0)  # let the batch exporters flush
    base = (
        sum(len(load[k]) for k in meshes if k == "off") / wall["off"]
        if "off" in wall and wall["off"]
        else 0.0
    )
    print(
        f"tracing overhead ({rounds} rounds, settings in turn; per setting {latency_messages} latency messages "
        f"(1 caller) and {per_round * rounds} load messages ({concurrency} callers, 200 sessions)):"
    )
    print(
        f"  {'setting':<22} {'latency p50':>11} {'p99':>8} | {'load p50':>9} {'p99':>8} | {'msg/s':>7} "
        f"{'vs off':>7} | {'CPU/msg':>8}"
    )
    for k in meshes:
        rate = len(load[k]) / wall[k] if wall[k] else 0.0
        vs = f"{(rate / base - 1) * 100:+.1f}%" if base else "-"
        print(
            f"  {setting_label(k):<22} {pct(lat[k], 50) * 1000:>8.2f} ms {pct(lat[k], 99) * 1000:>5.2f} ms |"
            f" {pct(load[k], 50) * 1000:>6.1f} ms {pct(load[k], 99) * 1000:>5.1f} ms | {rate:>7.0f} {vs:>7} |"
            f" {cpu[k] / max(sent[k], 1) * 1000:>5.2f} ms"
        )
    print("  CPU per message by service (ms):")
    for k in meshes:
        parts = "  ".join(
            f"{name} {spent / max(sent[k], 1) * 1000:.2f}" for name, spent in sorted(by_service[k].items())
        )
        print(f"  {setting_label(k):<22} {parts}")
    spans, requests, size = receiver.counts()
    print(
        f"  OTLP receiver (its own process): {spans} spans in {requests} export requests ({size / 1e6:.1f} MB),"
        f" {receiver.cpu_seconds():.2f} s of CPU"
    )


class ReceiverProcess:
    """The OTLP receiver as its own process (tests/support/otlp.py), so receiving spans costs the
    channel client nothing."""

    def __init__(self) -> None:
        import subprocess
        import sys

        from tests.support.mesh import ROOT

        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.otlp"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT,
        )  # fmt: skip
        assert self.proc.stdout is not None
        self.endpoint = self.proc.stdout.readline().strip()

    def cpu_seconds(self) -> float:
        """User + system CPU the receiver has spent (it shares the machine's cores with the meshes)."""
        return cpu_seconds(self.proc.pid)

    def counts(self) -> tuple[int, int, int]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        spans, requests, size = self.proc.stdout.readline().split()
        return int(spans), int(requests), int(size)

    def stop(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(10)


def run_tracing_overhead(ns: argparse.Namespace) -> None:
    settings = [s.strip() for s in ns.tracing.split(",") if s.strip()]
    receiver = ReceiverProcess()
    with tempfile.TemporaryDirectory(prefix="flynn-bench-tracing-") as tmp:
        meshes: dict[str, FlowMesh] = {}
        try:
            for i, k in enumerate(settings):
                root = Path(tmp) / f"mesh-{i}"
                ratio = k.partition("@")[0]
                env = (
                    {} if ratio == "off" else otel_env(receiver, ratio=float(ratio), delay_ms=ns.bsp_delay_ms)
                )
                if env and ns.bsp_batch:
                    env["OTEL_BSP_MAX_EXPORT_BATCH_SIZE"] = str(ns.bsp_batch)
                    env["OTEL_BSP_MAX_QUEUE_SIZE"] = str(ns.bsp_batch * 4)
                root.mkdir(parents=True)
                meshes[k] = FlowMesh(root, make_tokens(root), seed=seed(), env=env)
                meshes[k].start()
            asyncio.run(
                tracing_overhead(
                    meshes, receiver, ns.rounds, ns.latency_messages, ns.messages, ns.concurrency
                )
            )
        finally:
            for m in meshes.values():
                m.stop()
            receiver.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--latency-messages", type=int, default=300)
    p.add_argument("--messages", type=int, default=2000)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument(
        "--tracing",
        default="",
        help="compare tracing settings instead, e.g. off,1.0,0.1 (off, or a sampling ratio)",
    )
    p.add_argument("--rounds", type=int, default=4, help="with --tracing: turns per setting")
    p.add_argument("--bsp-delay-ms", type=int, default=1000, help="with --tracing: OTEL_BSP_SCHEDULE_DELAY")
    p.add_argument(
        "--bsp-batch", type=int, default=0, help="with --tracing: OTEL_BSP_MAX_EXPORT_BATCH_SIZE (queue: 4x)"
    )
    ns = p.parse_args()
    if ns.tracing:
        run_tracing_overhead(ns)
        return
    with tempfile.TemporaryDirectory(prefix="flynn-bench-e2e-") as tmp:
        root = Path(tmp)
        mesh = FlowMesh(root, make_tokens(root), seed=seed())
        try:
            mesh.start()
            asyncio.run(message_path(mesh, ns.latency_messages, ns.messages, ns.concurrency))
            asyncio.run(rollbacks(mesh, ns.reps))
        finally:
            mesh.stop()


if __name__ == "__main__":
    main()
