"""ReactionsApp: wiring of the reactions service (config watcher, store, reactor, consumers, servicer)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from collections.abc import Callable
from pathlib import Path

import grpc
from flynn.v1 import reactions_pb2, reactions_pb2_grpc

from flynn_runtime import config_yaml
from flynn_runtime.config_source import ConfigSource, StaticConfig
from flynn_runtime.errors import FlynnError
from flynn_runtime.replica_registry import Report
from flynn_runtime.server import Runtime, ServiceApp
from flynn_runtime.settings import env_arg
from reactions_svc.actions import GrpcActionRunner
from reactions_svc.consumers import (
    NODE_CURSOR,
    RUN_CURSOR,
    StreamConsumer,
    node_events_consumer,
    node_events_source,
    run_events_consumer,
    run_events_source,
)
from reactions_svc.partitioned_consumer import PartitionedConsumer, event_key
from reactions_svc.partitions import (
    DEFAULT_COUNT,
    DEFAULT_TTL,
    PartitionOwner,
    partition_name,
    partition_of,
)
from reactions_svc.reactor import Reactor, RuleSource, config_validator
from reactions_svc.servicer import ReactionsServicer
from reactions_svc.store import ReactionStore, open_reaction_store
from reactions_svc.store_pg import PgReactionStore

log = logging.getLogger(__name__)


def _flag(name: str, default: str) -> str:
    return os.environ.get(f"FLYNN_{name.upper()}", default)


def add_args(p: argparse.ArgumentParser) -> None:
    env_arg(
        p,
        "rules-file",
        "",
        "YAML config whose automation.reactions is used instead of watching the config service (for "
        "tools and tests without the mesh)",
        env="reactions_rules_file",
    )
    env_arg(
        p,
        "partitions",
        str(DEFAULT_COUNT),
        "with a database: how many partitions the event streams are divided into among replicas; the "
        "same on every replica, chosen once",
        type=int,
        env="reactions_partitions",
    )
    env_arg(
        p,
        "consume",
        "run,node",
        "event streams to consume: comma list of run, node; empty for none",
        env="reactions_consume",
    )


class ReactionsApp(ServiceApp):
    service_names = ("flynn.v1.Reactions",)
    replicated = True

    def __init__(self, runtime: Runtime) -> None:
        super().__init__(runtime)
        extra = runtime.settings.extra
        rules_file = str(extra.get("rules_file") or _flag("reactions_rules_file", ""))
        consume = extra.get("consume")
        consume_s = str(consume) if consume is not None else _flag("reactions_consume", "run,node")
        self.consume = {c.strip() for c in consume_s.split(",") if c.strip()}
        self.watcher = None
        self.config: ConfigSource
        if rules_file:
            cfg = config_yaml.yaml_to_config(Path(rules_file).read_text(encoding="utf-8"))
            config_validator(cfg)
            self.config = StaticConfig(cfg, revision=1)
        else:
            from flynn_runtime.config_watcher import ConfigWatcher

            self.watcher = ConfigWatcher(runtime, validator=config_validator)
            self.config = self.watcher
        self.rule_source = RuleSource(self.config)
        # The store opens in start() (a database connects there); the servicer is added then too.
        self.store: ReactionStore | None = None
        self._server: grpc.aio.Server | None = None
        self.consumers: list[StreamConsumer | PartitionedConsumer] = []
        self.owner: PartitionOwner | None = None
        self._resumes: set[asyncio.Task[None]] = set()
        self.partition_count = int(
            str(extra.get("partitions") or _flag("reactions_partitions", str(DEFAULT_COUNT)))
        )

    def register(self, server: grpc.aio.Server) -> None:
        self._server = server

    async def start(self) -> None:
        self.store = await open_reaction_store(self.runtime)
        self.reactor = Reactor(
            self.store,
            self.rule_source.current,
            GrpcActionRunner(self.runtime),
            audit=self.runtime.audit.record,
            claim_shared_keys=isinstance(self.store, PgReactionStore),
        )
        await self.reactor.load()
        self.servicer = ReactionsServicer(self.reactor)
        assert self._server is not None
        reactions_pb2_grpc.add_ReactionsServicer_to_server(self.servicer, self._server)
        if self.watcher is not None:
            await self.watcher.start()
        if isinstance(self.store, PgReactionStore):
            await self._start_partitioned(self.store)
            return
        self.replicas = self.runtime.replica_registry(self._replica_report)
        resumed = await self.reactor.resume_pending()
        if resumed:
            log.info("resumed pending reactions", extra={"events": resumed})
        # A stream whose owner is not deployed (empty address) has nothing to consume.
        deployed = self.runtime.settings.deployed
        if "run" in self.consume and deployed("queue"):
            self.consumers.append(run_events_consumer(self.runtime, self.reactor))
        if "node" in self.consume and deployed("nodes"):
            self.consumers.append(node_events_consumer(self.runtime, self.reactor))
        for c in self.consumers:
            c.start()

    async def _start_partitioned(self, store: PgReactionStore) -> None:
        """Several replicas may share the database: consume only the partitions leased here."""
        self.owner = PartitionOwner(
            store.db,
            self.runtime.replica_id,
            self.runtime.advertise_address(),
            count=self.partition_count,
            on_change=self._partitions_changed,
        )
        if "run" in self.consume:
            self.consumers.append(
                PartitionedConsumer(
                    RUN_CURSOR,
                    self.runtime,
                    self.reactor,
                    store,
                    self.owner,
                    *run_events_source(self.runtime),
                )
            )
        if "node" in self.consume:
            self.consumers.append(
                PartitionedConsumer(
                    NODE_CURSOR,
                    self.runtime,
                    self.reactor,
                    store,
                    self.owner,
                    *node_events_source(self.runtime),
                )
            )
        self.replicas = self.runtime.replica_registry(self._replica_report, store.db, gone_after=DEFAULT_TTL)
        await self.replicas.join()
        self.owner.heartbeat = self.replicas.beat  # each balance round (ttl/3): no timer of its own
        await self.owner.balance()
        self.owner.start()
        for c in self.consumers:
            c.start()

    def ready(self) -> bool:
        return self.owner is None or self.owner.lease_ok

    def _replica_report(self) -> Report:
        owner = self.owner
        stopping = self.runtime.stopping.is_set()
        if owner is None:  # SQLite: the one process consumes every event
            return Report(
                ready=not stopping, lease_held=True, holdings=(("consumers", float(len(self.consumers))),)
            )
        reachable = owner.db.reachable
        held = sorted(owner.held)
        return Report(
            ready=reachable and owner.lease_ok and not stopping,
            lease_held=owner.lease_ok,
            database_reachable=reachable,
            holdings=(("partitions", float(len(held))), ("partitions_total", float(owner.count))),
            detail=" ".join(partition_name(p) for p in held),
        )

    async def consumed_upto(self, stream: str) -> int:
        """The stream's cursor: with partitions, the highest of their cursors (one replica reads
        the stream in order, so every event up to it was handled or belongs to another replica)."""
        assert self.store is not None
        if self.owner is None:
            return await self.store.cursor(stream)
        names = [f"{stream}/{partition_name(p)}" for p in range(self.owner.count)]
        return max([await self.store.cursor(n) for n in names], default=0)

    def _partitions_changed(self, added: set[int], removed: set[int]) -> None:
        log.info("partitions changed", extra={"added": sorted(added), "removed": sorted(removed)})
        for c in self.consumers:
            if isinstance(c, PartitionedConsumer):
                c.partitions_changed(added)
        if added and self.owner is not None:
            owner = self.owner

            def mine(ev: reactions_pb2.ReactionEvent) -> bool:
                return partition_of(event_key(ev), owner.count) in added and owner.holds(
                    partition_of(event_key(ev), owner.count)
                )

            task = asyncio.create_task(self._resume(mine), name="reactions-resume")
            self._resumes.add(task)
            task.add_done_callback(self._resumes.discard)

    async def _resume(self, only: Callable[[reactions_pb2.ReactionEvent], bool]) -> None:
        try:
            resumed = await self.reactor.resume_pending(only)
        except FlynnError as e:
            log.warning("resuming pending reactions failed", extra={"error": e.message[:200]})
            return
        if resumed:
            log.info("resumed pending reactions of partitions taken over", extra={"events": resumed})

    async def stop(self) -> None:
        if self.owner is not None:
            await self.owner.stop()
        for c in self.consumers:
            await c.stop()
        if self.owner is not None:
            await self.owner.leave()
        if self.watcher is not None:
            await self.watcher.stop()

    async def close(self) -> None:
        self.rule_source.close()
        if self.store is not None:
            await self.store.close()
