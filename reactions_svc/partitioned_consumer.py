"""A run-event or node-event consumer that handles only the partitions this replica holds.

Used instead of consumers.StreamConsumer when several reactions replicas share a PostgreSQL database
(reactions_svc/partitions.py). Each replica reads the whole stream from the lowest cursor of the
partitions it holds and skips the events of other partitions; each partition's cursor advances after
its event is handled, in a transaction fenced by the partition's lease epoch. When this replica gains
partitions the stream is reopened from the lowest cursor again (the new partitions may be behind);
losing one needs nothing but skipping its events from then on.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import grpc
from flynn.v1 import reactions_pb2

from flynn_runtime.backoff import Backoff
from flynn_runtime.database import DATABASE_UNAVAILABLE
from flynn_runtime.errors import FlynnError
from flynn_runtime.leases import StaleEpoch
from flynn_runtime.server import Runtime
from reactions_svc import metrics
from reactions_svc.consumers import MAX_FAILURES_PER_EVENT
from reactions_svc.partitions import SCOPE, PartitionOwner, partition_name, partition_of
from reactions_svc.reactor import Reactor
from reactions_svc.store_pg import PgReactionStore

log = logging.getLogger(__name__)


def event_key(ev: reactions_pb2.ReactionEvent) -> str:
    """What an event is partitioned by: its session, else its node."""
    return ev.session_key or ev.node_id


class PartitionedConsumer:
    def __init__(
        self,
        name: str,
        runtime: Runtime,
        reactor: Reactor,
        store: PgReactionStore,
        owner: PartitionOwner,
        open_stream: Callable[[int], Any],
        to_event: Callable[[Any], tuple[int, reactions_pb2.ReactionEvent | None]],
    ) -> None:
        self.name = name
        self.runtime = runtime
        self.reactor = reactor
        self.store = store
        self.owner = owner
        self._open = open_stream
        self._to_event = to_event
        self.handled = 0
        self.fenced = 0
        self.connected = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._call: Any = None
        self._reopen = False
        self._changed = asyncio.Event()
        self._failures: dict[int, int] = {}

    def cursor_name(self, p: int) -> str:
        return f"{self.name}/{partition_name(p)}"

    def partitions_changed(self, added: set[int]) -> None:
        """Called by the owner: reopen the stream when partitions were added (they may be behind)."""
        self._changed.set()
        if added and self._call is not None:
            self._reopen = True
            self._call.cancel()

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
        backoff = Backoff(0.1, 5.0)
        while not self.runtime.stopping.is_set():
            if not self.owner.held:
                self._changed.clear()
                try:
                    await asyncio.wait_for(self._changed.wait(), timeout=1.0)
                except TimeoutError:
                    pass
                continue
            try:
                await self._follow()
                backoff.reset()
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if self._reopen and task is not None and not task.cancelling():
                    continue  # we cancelled the stream ourselves to reopen it
                raise
            except grpc.aio.AioRpcError as e:
                if self._reopen:
                    continue
                log.info(
                    "event stream broke; reconnecting", extra={"consumer": self.name, "code": e.code().name}
                )
            except Exception:
                log.exception("consumer error; reconnecting", extra={"consumer": self.name})
            finally:
                self.connected.clear()
                self._call = None
            try:
                await asyncio.wait_for(self.runtime.stopping.wait(), timeout=backoff.next_delay())
            except TimeoutError:
                pass

    async def _follow(self) -> None:
        self._reopen = False
        held = dict(self.owner.held)
        cursors = {p: await self.store.cursor(self.cursor_name(p)) for p in held}
        start = min(cursors.values())
        self._call = self._open(start)
        self.connected.set()
        async for item in self._call:
            seq, ev = self._to_event(item)
            if ev is None:
                continue
            p = partition_of(event_key(ev), self.owner.count)
            epoch = self.owner.epoch(p)
            if epoch is None or seq <= cursors.get(p, start):
                continue
            await self._handle(seq, ev)
            try:
                await self.store.set_cursor_fenced(
                    self.cursor_name(p), seq, SCOPE, self.owner.replica_id, partition_name(p), epoch
                )
            except StaleEpoch:
                self.fenced += 1
                self.owner.dropped(p)
                continue
            cursors[p] = seq
            self.handled += 1
            metrics.EVENTS.labels(self.name).inc()

    async def _handle(self, seq: int, ev: reactions_pb2.ReactionEvent) -> None:
        try:
            await self.reactor.process(ev)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            if isinstance(e, FlynnError) and e.reason == DATABASE_UNAVAILABLE:
                raise
            n = self._failures.get(seq, 0) + 1
            self._failures[seq] = n
            if n < MAX_FAILURES_PER_EVENT:
                raise
            log.exception("event failed repeatedly; skipping", extra={"consumer": self.name, "seq": seq})
            self.runtime.audit.record("reactionEventFailed", consumer=self.name, seq=seq)
            self._failures.pop(seq, None)
