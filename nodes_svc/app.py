"""Wiring of the nodes process: registry, canvas, config source, sweeper, servicers."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from flynn.v1 import canvas_pb2_grpc, config_pb2, nodes_pb2_grpc

from flynn_runtime import config_yaml
from flynn_runtime.config_source import ConfigSource, StaticConfig
from flynn_runtime.errors import FlynnError
from flynn_runtime.fencing import Fencer
from flynn_runtime.pg_listen import Listener
from flynn_runtime.replica_registry import Report
from flynn_runtime.server import Runtime, ServiceApp
from flynn_runtime.settings import env_arg
from nodes_svc.canvas_servicer import CanvasServicer
from nodes_svc.canvas_store import (
    DEFAULT_MAX_ARTIFACT_BYTES,
    DEFAULT_MAX_TOTAL_BYTES,
    DEFAULT_MAX_VERSIONS,
    Canvas,
    CanvasBackend,
    CanvasLimits,
    CanvasStore,
    SqliteCanvasBackend,
)
from nodes_svc.invoke_forwarder import InvokeForwarder
from nodes_svc.node_registry import NodeRegistry
from nodes_svc.node_store import NodeStore, open_node_store
from nodes_svc.node_store_pg import PgNodeStore
from nodes_svc.presence import DEFAULT_TTL as PRESENCE_TTL
from nodes_svc.presence import NOTIFY_CHANNEL as PRESENCE_CHANNEL
from nodes_svc.presence import Presence
from nodes_svc.servicer import NodesServicer

if TYPE_CHECKING:
    from flynn_runtime.config_watcher import ConfigWatcher

log = logging.getLogger(__name__)

SWEEP_INTERVAL = 0.1
PRUNE_INTERVAL = 600.0


def add_args(p: argparse.ArgumentParser) -> None:
    env_arg(
        p, "canvas-max-artifact-bytes", str(DEFAULT_MAX_ARTIFACT_BYTES), "largest artifact version", type=int
    )
    env_arg(
        p,
        "canvas-max-total-bytes",
        str(DEFAULT_MAX_TOTAL_BYTES),
        "bytes of all kept versions together; beyond it puts get RESOURCE_EXHAUSTED",
        type=int,
    )
    env_arg(p, "canvas-max-versions", str(DEFAULT_MAX_VERSIONS), "versions kept per artifact", type=int)
    env_arg(
        p,
        "nodes-config",
        "",
        "YAML/JSON FlynnConfig to use instead of watching the config service (tools, tests, bench)",
    )


def load_config_file(path: Path) -> config_pb2.FlynnConfig:
    """A FlynnConfig from the same YAML the config service seeds from (config/flynn.yaml)."""
    return config_yaml.yaml_to_config(path.read_text(encoding="utf-8"))


class NodesApp(ServiceApp):
    service_names = ("flynn.v1.Nodes", "flynn.v1.Canvas")
    replicated = True

    def __init__(self, runtime: Runtime, config: ConfigSource | None = None) -> None:
        super().__init__(runtime)
        s = runtime.settings
        self._watcher: ConfigWatcher | None = None
        if config is None:
            config = self._config_source()
        self.config = config
        self.limits = CanvasLimits(
            max_artifact_bytes=s.extra_int("canvas_max_artifact_bytes", DEFAULT_MAX_ARTIFACT_BYTES),
            max_total_bytes=s.extra_int("canvas_max_total_bytes", DEFAULT_MAX_TOTAL_BYTES),
            max_versions=s.extra_int("canvas_max_versions", DEFAULT_MAX_VERSIONS),
        )
        # The stores open in start() (a database connects there); servicers are added then too.
        self.store: NodeStore | None = None
        self._server: grpc.aio.Server | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.presence: Presence | None = None
        self.forwarder: InvokeForwarder | None = None
        self.listener: Listener | None = None
        self.fencer = Fencer("nodes", runtime.replica_id)
        self._fence_wake = asyncio.Event()
        self._unsubscribe = config.subscribe(self._on_config, key="server.nodes")

    def _config_source(self) -> ConfigSource:
        path = str(self.runtime.settings.extra.get("nodes_config") or "")
        if path:
            return StaticConfig(load_config_file(Path(path)))
        try:
            mod = importlib.import_module("flynn_runtime.config_watcher")
        except ImportError:
            log.warning("no config watcher available and no --nodes-config: nodes stay disabled")
            return StaticConfig()
        watcher = mod.ConfigWatcher(self.runtime)
        self._watcher = watcher
        assert isinstance(watcher, ConfigSource)
        return watcher

    def register(self, server: grpc.aio.Server) -> None:
        self._server = server

    async def _open_stores(self) -> None:
        self.store = await open_node_store(self.runtime)
        self.registry = NodeRegistry(self.store, self.config, self.runtime.audit)
        forwarder: InvokeForwarder | None = None
        if isinstance(self.store, PgNodeStore):
            # Several replicas may share this database: presence, fencing and invoke forwarding.
            replica_id = self.runtime.replica_id
            address = self.runtime.advertise_address()
            self.store.owner, self.store.owner_address = replica_id, address
            self.presence = Presence(self.store.db, replica_id, address)
            self.fencer = Fencer("nodes", replica_id)
            self.registry.shared = True
            forwarder = InvokeForwarder(
                self.runtime.settings.service_token, replica_id, self.runtime.settings.max_message_bytes
            )
            self.forwarder = forwarder
        backend: CanvasBackend
        if self.runtime.databases:
            from nodes_svc.canvas_store_pg import PgCanvasStore

            backend = PgCanvasStore(self.runtime.databases[0], self.limits)
        else:
            backend = SqliteCanvasBackend(CanvasStore(self.runtime.settings.data_dir / "canvas", self.limits))
        self.canvas = Canvas(
            backend,
            self.runtime.audit,
            enabled=self.registry.canvas_service_enabled,
            # PostgreSQL appends the change's event in the put's own transaction: only wake watchers.
            on_change=self._canvas_recorded if backend.records_events else self.registry.record_canvas_change,
        )
        assert self._server is not None
        nodes_pb2_grpc.add_NodesServicer_to_server(
            NodesServicer(self.runtime, self.registry, self.presence, forwarder), self._server
        )
        canvas_pb2_grpc.add_CanvasServicer_to_server(CanvasServicer(self.canvas), self._server)

    def _canvas_recorded(self, name: str, op: str) -> None:
        self.registry.wake_watchers()

    async def start(self) -> None:
        await self._open_stores()
        if self._watcher is not None:
            await self._watcher.start()
        if self.presence is not None and isinstance(self.store, PgNodeStore):
            await self.presence.join()
            self.replicas = self.runtime.replica_registry(
                self._replica_report, self.store.db, gone_after=PRESENCE_TTL
            )
            await self.replicas.join()
            self.presence.heartbeat = self.replicas.beat  # after each renewal (ttl/3): no timer of its own
        else:
            self.replicas = self.runtime.replica_registry(self._replica_report)
        await self.registry.start()
        if self.presence is not None and isinstance(self.store, PgNodeStore):
            self.presence.start(self._presence_renewed)
            self._tasks.append(asyncio.create_task(self._fence_loop(), name="nodes-fence"))
            self.listener = Listener(
                self.store.db, (PRESENCE_CHANNEL,), self._fence_wake.set, poll_seconds=2.0
            )
            self.listener.start()
        recovered = await self.canvas.start()
        log.info("canvas ready", extra={"recovered": recovered, "total_bytes": self.canvas.store.total_bytes})
        self._tasks.append(asyncio.create_task(self._sweep()))

    def ready(self) -> bool:
        return self.presence is None or self.presence.lease_ok

    def _replica_report(self) -> Report:
        stopping = self.runtime.stopping.is_set()
        held = (("nodes_connected", float(len(self.registry.sessions))),)
        if self.presence is None or not isinstance(self.store, PgNodeStore):
            return Report(ready=not stopping, lease_held=True, holdings=held)
        reachable = self.store.db.reachable
        lease = self.presence.lease_ok
        return Report(
            ready=reachable and lease and not stopping,
            lease_held=lease,
            database_reachable=reachable,
            holdings=held,
        )

    def _on_config(self, old: config_pb2.FlynnConfig, new: config_pb2.FlynnConfig, revision: int) -> None:
        if self.store is not None:
            self.registry.apply_config()

    async def _presence_renewed(self, rejoined: bool) -> None:
        """After each renewal of this replica's lease: nodes of replicas that died go offline; after
        this replica lost its lease and took it again, the streams still open here are online again."""
        assert self.presence is not None and isinstance(self.store, PgNodeStore)
        if rejoined:
            back = await self.presence.reassert(self.registry.held_epochs())
            log.warning("presence lease was lost and taken again", extra={"nodes_reasserted": back})
        async with self.store.db.connection() as c:
            # Replicas whose lease expired may be frozen inside a transaction (a registration's row
            # lock): end their sessions first.
            await self.fencer.end_dead_sessions(c)
        dead = await self.presence.dead_owners()
        if dead:
            log.warning("nodes replicas gone; their nodes go offline", extra={"replicas": dead})
            store = self.store
            self.registry.owners_lost(dead, lambda owners: store.mark_owners_offline(owners, "replica_lost"))

    async def _fence_loop(self) -> None:
        """Woken by NOTIFY (or the poll): close streams whose node registered again elsewhere."""
        assert self.presence is not None
        while True:
            await self._fence_wake.wait()
            self._fence_wake.clear()
            held = self.registry.held_epochs()
            try:
                stale = await self.presence.stale_sessions(held)
                assert isinstance(self.store, PgNodeStore)
                revoked = await self.store.revoked_tokens(self.registry.held_tokens())
            except FlynnError as e:
                log.warning("presence check failed", extra={"error": e.message[:200]})
                await asyncio.sleep(0.5)
                continue
            if stale:
                closed = self.registry.close_replaced({n: held[n] for n in stale})
                log.info("streams replaced on another replica closed", extra={"streams": closed})
            if revoked:
                self.registry.close_revoked(revoked)

    async def _sweep(self) -> None:
        since_prune = 0.0
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            try:
                self.registry.tick()
                since_prune += SWEEP_INTERVAL
                if since_prune >= PRUNE_INTERVAL:
                    since_prune = 0.0
                    self.registry.prune_events()
            except Exception:
                log.exception("node sweeper failed")

    async def stop(self) -> None:
        closed = self.registry.close_all("shutdown")
        self.registry.wake_watchers()  # WatchNodeEvents streams see runtime.stopping and end
        log.info("closing node streams", extra={"streams": closed})
        for _ in range(200):  # each stream sends NodeClose and ends; bounded wait
            if not self.registry.sessions:
                break
            await asyncio.sleep(0.01)

    async def close(self) -> None:
        self._unsubscribe()
        if self.listener is not None:
            await self.listener.stop()
        if self.presence is not None:
            await self.presence.stop()
            await self.presence.leave()
        if self.forwarder is not None:
            await self.forwarder.close()
        for t in self._tasks:
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await t
        if self.store is None:
            return
        self.registry.shutdown()
        await self.registry.drain()
        if self._watcher is not None:
            await self._watcher.stop()
        await self.canvas.close()
        await self.store.close()
