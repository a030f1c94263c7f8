"""Background consumers of RunControl.WatchRunEvents and Nodes.WatchNodeEvents with persisted cursors.

The cursor advances only after an event is fully handled (evaluated, acted on, recorded), so a restart
replays at most the event in flight; the reactor's dedupe and idempotency keys make that replay safe.
Streams reconnect with jittered exponential backoff and end when the service stops.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from flynn.v1 import nodes_pb2, nodes_pb2_grpc, reactions_pb2, run_control_pb2, run_control_pb2_grpc

from flynn_runtime.backoff import Backoff
from flynn_runtime.database import DATABASE_UNAVAILABLE
from flynn_runtime.errors import FlynnError
from flynn_runtime.server import Runtime
from reactions_svc import metrics
from reactions_svc.event_mapping import from_node_event, from_run_event
from reactions_svc.reactor import Reactor

log = logging.getLogger(__name__)

RUN_CURSOR = "run_events"
NODE_CURSOR = "node_events"
MAX_FAILURES_PER_EVENT = 3


class StreamConsumer:
    def __init__(
        self,
        name: str,
        runtime: Runtime,
        reactor: Reactor,
        open_stream: Callable[[int], AsyncIterator[Any]],
        to_event: Callable[[Any], tuple[int, reactions_pb2.ReactionEvent | None]],
        *,
        min_backoff: float = 0.1,
        max_backoff: float = 5.0,
    ) -> None:
        self.name = name
        self.runtime = runtime
        self.reactor = reactor
        self._open = open_stream
        self._to_event = to_event
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        self.handled = 0
        self.connected = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._failures: dict[int, int] = {}

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name=f"consumer:{self.name}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
            self._task = None

    async def _loop(self) -> None:
        backoff = Backoff(self.min_backoff, self.max_backoff)
        store = self.reactor.store
        while not self.runtime.stopping.is_set():
            try:
                cursor = await store.cursor(self.name)
                stream = self._open(cursor)
                self.connected.set()
                async for item in stream:
                    seq, ev = self._to_event(item)
                    if seq <= cursor:
                        continue
                    try:
                        if ev is not None:
                            await self.reactor.process(ev)
                    except asyncio.CancelledError:
                        raise
                    except Exception as e:
                        if isinstance(e, FlynnError) and e.reason == DATABASE_UNAVAILABLE:
                            raise  # our own storage is down: retry later, never count it as a poison event
                        n = self._failures.get(seq, 0) + 1
                        self._failures[seq] = n
                        if n < MAX_FAILURES_PER_EVENT:
                            raise
                        # A poison event must not stop every later reaction: record it and move on.
                        log.exception(
                            "event failed repeatedly; skipping", extra={"consumer": self.name, "seq": seq}
                        )
                        self.runtime.audit.record("reactionEventFailed", consumer=self.name, seq=seq)
                        self._failures.pop(seq, None)
                    await store.set_cursor(self.name, seq)
                    cursor = seq
                    self.handled += 1
                    metrics.EVENTS.labels(self.name).inc()
                    backoff.reset()
                # The server ended the stream (for example it is shutting down): reconnect.
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as e:
                log.info(
                    "event stream broke; reconnecting", extra={"consumer": self.name, "code": e.code().name}
                )
            except Exception:
                log.exception("consumer error; reconnecting", extra={"consumer": self.name})
            finally:
                self.connected.clear()
            metrics.CURSOR.labels(self.name).inc()
            delay = backoff.next_delay()
            try:
                await asyncio.wait_for(self.runtime.stopping.wait(), timeout=delay)
            except TimeoutError:
                pass


def run_events_consumer(runtime: Runtime, reactor: Reactor) -> StreamConsumer:
    return StreamConsumer(RUN_CURSOR, runtime, reactor, *run_events_source(runtime))


def run_events_source(
    runtime: Runtime,
) -> tuple[Callable[[int], Any], Callable[[Any], tuple[int, reactions_pb2.ReactionEvent | None]]]:
    """(open the stream after a cursor, map a response to (seq, event)) for run events."""

    def open_stream(cursor: int) -> Any:
        stub = run_control_pb2_grpc.RunControlStub(runtime.channel("queue"))
        call = stub.WatchRunEvents(
            run_control_pb2.WatchRunEventsRequest(after_seq=cursor, exclude_output=True)
        )
        return call

    def to_event(
        resp: run_control_pb2.WatchRunEventsResponse,
    ) -> tuple[int, reactions_pb2.ReactionEvent | None]:
        return resp.event.global_seq, from_run_event(resp.event)

    return open_stream, to_event


def node_events_consumer(runtime: Runtime, reactor: Reactor) -> StreamConsumer:
    return StreamConsumer(NODE_CURSOR, runtime, reactor, *node_events_source(runtime))


def node_events_source(
    runtime: Runtime,
) -> tuple[Callable[[int], Any], Callable[[Any], tuple[int, reactions_pb2.ReactionEvent | None]]]:
    def open_stream(cursor: int) -> Any:
        stub = nodes_pb2_grpc.NodesStub(runtime.channel("nodes"))
        call = stub.WatchNodeEvents(nodes_pb2.WatchNodeEventsRequest(after_seq=cursor))
        return call

    def to_event(resp: nodes_pb2.WatchNodeEventsResponse) -> tuple[int, reactions_pb2.ReactionEvent | None]:
        return resp.event.seq, from_node_event(resp.event)

    return open_stream, to_event
