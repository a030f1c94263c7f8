"""A companion node: connects to flynn.v1.Nodes, declares commands, answers invokes, reconnects.

    python -m examples.companion_node --addr 127.0.0.1:50054 --node-id desk-1 --token fln_... --role desktop

It registers, heartbeats at the interval the server gives, answers `canvas.present` (with progress),
`system.notify` and `device.info`, and honours each invoke's absolute deadline (an invoke still
running at its deadline is answered with error_code "deadline_exceeded"). When the stream ends for
any reason it reconnects with jittered exponential backoff, except when the server says not to
(NodeClose.reconnect = false: replaced, token_revoked, role_not_allowed) or refuses the credentials
(UNAUTHENTICATED / PERMISSION_DENIED / INVALID_ARGUMENT): then it stops and reports why.

`CompanionNode` is the reusable core (tests and bench run many of them in one event loop).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import platform
import random
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from flynn.v1 import nodes_pb2, nodes_pb2_grpc
from google.protobuf import timestamp_pb2

from flynn_runtime import tracing
from flynn_runtime.backoff import Backoff
from flynn_runtime.tls import caller_credentials

log = logging.getLogger("companion_node")
_EOF: Any = grpc.aio.EOF  # type: ignore[attr-defined]

DEFAULT_CAPABILITIES = ("canvas.present", "system.notify", "device.info")
FATAL_CODES = (
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.INVALID_ARGUMENT,
)
CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    # Come back quickly after a server restart; our own backoff spreads the storm.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
]


@dataclass
class InvokeContext:
    """What a command handler gets: the invoke, its absolute deadline, and a progress reporter."""

    invoke_id: str
    command: str
    deadline: float  # wall-clock seconds
    progress: Callable[[float, str], Awaitable[None]]

    def remaining(self) -> float:
        return self.deadline - time.time()


Handler = Callable[[dict[str, Any], InvokeContext], Awaitable[Any]]


async def _sleep_arg(args: dict[str, Any]) -> None:
    ms = float(args.get("sleep_ms", 0) or 0)
    if ms > 0:
        await asyncio.sleep(ms / 1000)


async def canvas_present(args: dict[str, Any], ctx: InvokeContext) -> Any:
    steps = max(1, min(int(args.get("steps", 3)), 100))
    delay = float(args.get("step_ms", 0)) / 1000
    for i in range(steps):
        if delay:
            await asyncio.sleep(delay)
        await ctx.progress((i + 1) / steps, f"rendering {args.get('name', '')} ({i + 1}/{steps})")
    await _sleep_arg(args)
    return {"presented": args.get("name", ""), "version": args.get("version", 0)}


async def system_notify(args: dict[str, Any], ctx: InvokeContext) -> Any:
    await _sleep_arg(args)
    log.info("notification: %s — %s", args.get("title", ""), args.get("body", ""))
    return {"shown": True}


async def device_info(args: dict[str, Any], ctx: InvokeContext) -> Any:
    await _sleep_arg(args)
    return {"hostname": socket.gethostname(), "platform": sys.platform, "python": platform.python_version()}


DEFAULT_HANDLERS: dict[str, Handler] = {
    "canvas.present": canvas_present,
    "system.notify": system_notify,
    "device.info": device_info,
}


@dataclass
class NodeStats:
    registrations: int = 0
    epochs: list[int] = field(default_factory=list)
    closes: list[nodes_pb2.NodeClose] = field(default_factory=list)
    gate_updates: list[nodes_pb2.NodeGates] = field(default_factory=list)
    stream_errors: list[tuple[str, str]] = field(default_factory=list)  # (status code name, details)
    invokes: int = 0
    deadline_missed: list[str] = field(default_factory=list)  # invoke ids answered as deadline_exceeded
    cancelled: list[tuple[str, str]] = field(default_factory=list)  # (invoke id, reason) the server cancelled
    heartbeats_received: int = 0
    last_registered_at: float = 0.0  # monotonic


class CompanionNode:
    def __init__(
        self,
        addr: str,
        node_id: str,
        token: str,
        role: str = "desktop",
        capabilities: Sequence[str] = DEFAULT_CAPABILITIES,
        *,
        display_name: str = "",
        platform_name: str = sys.platform,
        handlers: dict[str, Handler] | None = None,
        channel: grpc.aio.Channel | None = None,
        backoff_initial: float = 0.2,
        backoff_max: float = 5.0,
    ) -> None:
        self.addr = addr
        self.node_id = node_id
        self.token = token
        self.role = role
        self.capabilities = list(capabilities)
        self.display_name = display_name or node_id
        self.platform_name = platform_name
        self.handlers = dict(DEFAULT_HANDLERS if handlers is None else handlers)
        self._own_channel = channel is None
        self._channel = channel
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.stats = NodeStats()
        self.registered = asyncio.Event()  # set while a registration is live
        self.epoch = 0
        self.gates = nodes_pb2.NodeGates()
        self.stopped_reason = ""  # why run() gave up (empty while it keeps reconnecting)
        self._stop = asyncio.Event()
        self._call: Any = None
        self._write_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self._running: dict[str, asyncio.Task[None]] = {}  # invoke id -> handler task

    # lifecycle ----------------------------------------------------------------------------

    async def run(self) -> str:
        """Connect and stay connected until stop() or a final refusal; returns the stop reason."""
        if self._channel is None:
            self._channel = grpc.aio.insecure_channel(self.addr, options=CHANNEL_OPTIONS)
        backoff = Backoff(self.backoff_initial, self.backoff_max)
        try:
            while not self._stop.is_set():
                before = self.stats.registrations
                final = await self._connect_once()
                if self.stats.registrations > before:
                    backoff.reset()  # a registration succeeded: start the backoff over
                if final:
                    self.stopped_reason = final
                    return final
                if self._stop.is_set():
                    break
                delay = backoff.next_delay()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), delay)
            self.stopped_reason = "stopped"
            return "stopped"
        finally:
            if self._own_channel and self._channel is not None:
                await self._channel.close(None)
                self._channel = None

    async def stop(self) -> None:
        self._stop.set()
        call = self._call
        if call is not None:
            call.cancel()

    def start(self) -> asyncio.Task[str]:
        return asyncio.create_task(self.run(), name=f"node:{self.node_id}")

    # one stream ---------------------------------------------------------------------------

    async def _connect_once(self) -> str:
        """One Connect stream; returns a final reason to stop, or "" to reconnect."""
        assert self._channel is not None
        stub: Any = nodes_pb2_grpc.NodesStub(self._channel)
        call = stub.Connect()
        self._call = call
        hb_task: asyncio.Task[None] | None = None
        final = ""
        try:
            await call.write(
                nodes_pb2.ConnectRequest(
                    register=nodes_pb2.NodeRegister(
                        node_id=self.node_id,
                        token=self.token,
                        role=self.role,
                        capabilities=self.capabilities,
                        protocol_version=1,
                        display_name=self.display_name,
                        platform=self.platform_name,
                    )
                )
            )
            while True:
                got = await call.read()
                if got is _EOF:
                    break
                msg: nodes_pb2.ConnectResponse = got
                kind = msg.WhichOneof("message")
                if kind == "registered":
                    hb_task = self._on_registered(call, msg.registered)
                elif kind == "close":
                    self.stats.closes.append(msg.close)
                    if not msg.close.reconnect:
                        final = f"closed by server: {msg.close.reason}"
                else:
                    self._on_message(call, msg, kind)
        except grpc.aio.AioRpcError as e:
            self.stats.stream_errors.append((e.code().name, e.details() or ""))
            if e.code() in FATAL_CODES and not final and not self.registered.is_set():
                final = f"refused: {e.code().name}: {e.details()}"
            if e.code() == grpc.StatusCode.CANCELLED and self._stop.is_set():
                final = "stopped"
        except asyncio.CancelledError:
            call.cancel()
            task = asyncio.current_task()
            if self._stop.is_set() and task is not None and not task.cancelling():
                final = "stopped"  # stop() cancelled the call, not our task
            else:
                raise
        finally:
            self.registered.clear()
            self._call = None
            if hb_task is not None:
                hb_task.cancel()
            for t in list(self._tasks):
                t.cancel()
        if final:
            log.info("node %s stops: %s", self.node_id, final)
        return final

    def _on_registered(self, call: Any, r: nodes_pb2.NodeRegistered) -> asyncio.Task[None]:
        """Registered: remember the epoch and gates, start heartbeating at the server's interval."""
        self.epoch = r.epoch
        self.gates = r.gates
        self.stats.registrations += 1
        self.stats.epochs.append(r.epoch)
        self.stats.last_registered_at = time.monotonic()
        self.registered.set()
        interval = max(r.heartbeat_interval_ms, 50) / 1000
        return asyncio.create_task(self._heartbeats(call, interval))

    def _on_message(self, call: Any, msg: nodes_pb2.ConnectResponse, kind: str | None) -> None:
        """A heartbeat, an invoke, a cancel or a gate update from the server."""
        if kind == "heartbeat":
            self.stats.heartbeats_received += 1
        elif kind == "invoke":
            inv_id = msg.invoke.invoke_id
            t = asyncio.create_task(self._invoke(call, msg.invoke))
            self._tasks.add(t)
            self._running[inv_id] = t
            t.add_done_callback(self._forget)
        elif kind == "cancel":
            running = self._running.pop(msg.cancel.invoke_id, None)
            self.stats.cancelled.append((msg.cancel.invoke_id, msg.cancel.reason))
            if running is not None and not running.done():
                if msg.cancel.reason == "deadline_exceeded":
                    # The server saw the deadline pass before our own timer fired.
                    self.stats.deadline_missed.append(msg.cancel.invoke_id)
                running.cancel()
        elif kind == "gates":
            self.gates = msg.gates.gates
            self.stats.gate_updates.append(msg.gates.gates)

    def _forget(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        for inv_id, t in list(self._running.items()):
            if t is task:
                del self._running[inv_id]

    async def _write(self, call: Any, req: nodes_pb2.ConnectRequest) -> None:
        async with self._write_lock:
            await call.write(req)

    async def _heartbeats(self, call: Any, interval: float) -> None:
        with contextlib.suppress(Exception):
            while True:
                await asyncio.sleep(interval * random.uniform(0.9, 1.0))
                ts = timestamp_pb2.Timestamp()
                ts.GetCurrentTime()
                await self._write(
                    call,
                    nodes_pb2.ConnectRequest(heartbeat=nodes_pb2.NodeHeartbeat(time=ts, epoch=self.epoch)),
                )

    async def _invoke(self, call: Any, inv: nodes_pb2.InvokeRequest) -> None:
        self.stats.invokes += 1
        deadline = inv.deadline.ToNanoseconds() / 1e9 if inv.HasField("deadline") else time.time() + 10

        async def progress(fraction: float, message: str) -> None:
            await self._write(
                call,
                nodes_pb2.ConnectRequest(
                    progress=nodes_pb2.InvokeProgress(
                        invoke_id=inv.invoke_id, fraction=fraction, message=message
                    )
                ),
            )

        ctx = InvokeContext(inv.invoke_id, inv.command, deadline, progress)
        result = nodes_pb2.InvokeResult(invoke_id=inv.invoke_id)
        # With tracing on (OTEL_* environment), the invoke is a span of the InvokeNode call's trace.
        attrs = {
            "flynn.node.id": self.node_id,
            "flynn.node.command": inv.command,
            "flynn.invoke.id": inv.invoke_id,
        }
        with tracing.span("flynn.node.invoke", parent=inv.traceparent or None, attributes=attrs):
            await self._answer(call, inv, ctx, result, deadline)

    async def _answer(
        self,
        call: Any,
        inv: nodes_pb2.InvokeRequest,
        ctx: InvokeContext,
        result: nodes_pb2.InvokeResult,
        deadline: float,
    ) -> None:
        handler = self.handlers.get(inv.command)
        try:
            if handler is None:
                result.ok, result.error_code, result.error = (
                    False,
                    "unknown_command",
                    f"no handler for {inv.command}",
                )
            else:
                args = json.loads(inv.args_json) if inv.args_json else {}
                async with asyncio.timeout(max(deadline - time.time(), 0.0)):
                    value = await handler(args, ctx)
                result.ok, result.result_json = True, json.dumps(value)
        except asyncio.CancelledError:
            return  # the server cancelled it (InvokeCancel) or the stream ended: no result is expected
        except TimeoutError:
            self.stats.deadline_missed.append(inv.invoke_id)
            result.ok, result.error_code, result.error = False, "deadline_exceeded", "the deadline passed"
        except Exception as e:  # noqa: BLE001 - reported to the caller as a failed invoke
            result.ok, result.error_code, result.error = False, "failed", str(e)
        with contextlib.suppress(Exception):
            await self._write(call, nodes_pb2.ConnectRequest(result=result))


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="companion_node", description=__doc__.split("\n\n")[0])
    p.add_argument("--addr", required=True, help="host:port of the gateway or the nodes service")
    p.add_argument("--node-id", required=True)
    p.add_argument("--token", required=True, help="secret from Nodes.IssueNodeToken")
    p.add_argument("--role", default="desktop")
    p.add_argument("--display-name", default="")
    p.add_argument(
        "--capability", action="append", help="declared command (repeat); default: the three built-ins"
    )
    p.add_argument("--backoff-max", type=float, default=30.0, help="longest reconnect delay in seconds")
    p.add_argument("--log-level", default="info")
    p.add_argument(
        "--cacert", default="", help="CA of a gateway serving TLS (flynn-dev up --tls: <data dir>/tls/ca.pem)"
    )
    ns = p.parse_args(argv)
    import signal

    logging.basicConfig(level=ns.log_level.upper(), format="%(asctime)s %(levelname)s %(message)s")
    credentials = caller_credentials(ns.cacert)

    async def _run() -> str:
        node = CompanionNode(
            ns.addr,
            ns.node_id,
            ns.token,
            ns.role,
            ns.capability or DEFAULT_CAPABILITIES,
            display_name=ns.display_name,
            backoff_max=ns.backoff_max,
            channel=(
                grpc.aio.secure_channel(ns.addr, credentials, options=CHANNEL_OPTIONS)
                if credentials is not None
                else None
            ),
        )
        task = node.start()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, lambda: asyncio.ensure_future(node.stop()))
        return await task

    tracing.configure("companion-node")
    try:
        reason = asyncio.run(_run())
    finally:
        tracing.shutdown()
    print(f"companion node stopped: {reason}", file=sys.stderr)
    sys.exit(0 if reason == "stopped" else 1)


if __name__ == "__main__":
    main()
