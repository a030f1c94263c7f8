"""ReactionsApp: wiring of the reactions service (config watcher, store, reactor, consumers, servicer)."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import grpc
from flynn.v1 import reactions_pb2_grpc

from flynn_runtime import config_yaml
from flynn_runtime.config_source import ConfigSource, StaticConfig
from flynn_runtime.server import Runtime, ServiceApp
from reactions_svc.actions import GrpcActionRunner
from reactions_svc.consumers import StreamConsumer, node_events_consumer, run_events_consumer
from reactions_svc.reactor import Reactor, RuleSource, config_validator
from reactions_svc.servicer import ReactionsServicer
from reactions_svc.store import ReactionStore, open_reaction_store

log = logging.getLogger(__name__)


def _flag(name: str, default: str) -> str:
    return os.environ.get(f"FLYNN_{name.upper()}", default)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--rules-file",
        default=_flag("reactions_rules_file", ""),
        help="YAML config whose automation.reactions is used instead of watching the config service "
        "(FLYNN_REACTIONS_RULES_FILE; for tools and tests without the mesh)",
    )
    p.add_argument(
        "--consume",
        default=_flag("reactions_consume", "run,node"),
        help="event streams to consume: comma list of run, node; empty for none (FLYNN_REACTIONS_CONSUME)",
    )


class ReactionsApp(ServiceApp):
    service_names = ("flynn.v1.Reactions",)

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
        self.consumers: list[StreamConsumer] = []

    def register(self, server: grpc.aio.Server) -> None:
        self._server = server

    async def start(self) -> None:
        self.store = await open_reaction_store(self.runtime)
        self.reactor = Reactor(
            self.store,
            self.rule_source.current,
            GrpcActionRunner(self.runtime),
            audit=self.runtime.audit.record,
        )
        await self.reactor.load()
        self.servicer = ReactionsServicer(self.reactor)
        assert self._server is not None
        reactions_pb2_grpc.add_ReactionsServicer_to_server(self.servicer, self._server)
        if self.watcher is not None:
            await self.watcher.start()
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

    async def stop(self) -> None:
        for c in self.consumers:
            await c.stop()
        if self.watcher is not None:
            await self.watcher.stop()

    async def close(self) -> None:
        self.rule_source.close()
        if self.store is not None:
            await self.store.close()
