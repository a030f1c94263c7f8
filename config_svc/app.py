"""ConfigApp: wiring of the config service (storage, seed, fan-out hub, watcher registry)."""

from __future__ import annotations

import argparse
import gc
import logging
import os
from pathlib import Path

import grpc
from flynn.v1 import principals_pb2_grpc

from config_svc import metrics
from config_svc.config_editor import ConfigEditor
from config_svc.principal_cache import PrincipalCache
from config_svc.principal_store import SQLITE_FILE as PRINCIPALS_FILE
from config_svc.principal_store import PrincipalStore, open_principal_store
from config_svc.principal_store_pg import NOTIFY_CHANNEL as PRINCIPALS_CHANNEL
from config_svc.principal_store_pg import adopt_sqlite_file
from config_svc.principals_servicer import PrincipalsServicer
from config_svc.revision_feed import RevisionFeed
from config_svc.revision_store import RevisionStore, open_revision_store
from config_svc.revision_store_pg import NOTIFY_CHANNEL, PgRevisionStore
from config_svc.service import ConfigServicer, add_to_server
from config_svc.watch_hub import WatchHub
from config_svc.watcher_registry import WatcherRegistry
from config_svc.watcher_table import TTL, WatcherTable
from flynn_runtime import config_yaml, topology
from flynn_runtime.pg_listen import Listener
from flynn_runtime.replica_registry import Report
from flynn_runtime.server import Runtime, ServiceApp

log = logging.getLogger(__name__)

DEFAULT_SEED = Path(__file__).resolve().parents[1] / "config" / "flynn.yaml"


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--seed-file",
        default=os.environ.get("FLYNN_SEED_FILE", ""),
        help=f"YAML seeded as revision 1 when the history is empty (FLYNN_SEED_FILE; default {DEFAULT_SEED})",
    )
    p.add_argument(
        "--bookmark-seconds",
        type=float,
        default=float(os.environ.get("FLYNN_BOOKMARK_SECONDS", "15")),
        help="interval of WatchConfig bookmarks on a silent stream (FLYNN_BOOKMARK_SECONDS)",
    )
    p.add_argument(
        "--revision-poll-seconds",
        type=float,
        default=float(os.environ.get("FLYNN_REVISION_POLL_SECONDS", "1")),
        help="with a database: how often a replica re-reads the revision and principal tables even"
        " without a NOTIFY wake-up, the safety net for a lost notification (FLYNN_REVISION_POLL_SECONDS)",
    )
    p.add_argument(
        "--watch-queue-size",
        type=int,
        default=int(os.environ.get("FLYNN_WATCH_QUEUE_SIZE", "256")),
        help="revisions buffered per watch before a slow watcher is told to reconnect (FLYNN_WATCH_QUEUE_SIZE)",
    )


class ConfigApp(ServiceApp):
    service_names = topology.SERVICES["config"].grpc_services
    follows_principals = False  # it owns them (config_svc/principals_servicer.py)
    replicated = True

    def __init__(self, runtime: Runtime) -> None:
        super().__init__(runtime)
        extra = runtime.settings.extra
        seed = str(extra.get("seed_file") or os.environ.get("FLYNN_SEED_FILE", ""))
        self.seed_explicit = bool(seed)
        self.seed_file = Path(seed) if seed else DEFAULT_SEED
        self.bookmark_seconds = float(
            str(extra.get("bookmark_seconds") or os.environ.get("FLYNN_BOOKMARK_SECONDS", "15"))
        )
        queue_size = int(
            str(extra.get("watch_queue_size") or os.environ.get("FLYNN_WATCH_QUEUE_SIZE", "256"))
        )
        self.queue_size = queue_size
        self.store: RevisionStore | None = None
        self.hub = WatchHub(queue_size=queue_size, bookmark_seconds=self.bookmark_seconds)
        self.registry = WatcherRegistry()
        self.principal_store: PrincipalStore | None = None
        self.principal_cache: PrincipalCache | None = None
        self.principals = PrincipalsServicer(runtime)
        self._server: grpc.aio.Server | None = None
        self.poll_seconds = float(
            str(extra.get("revision_poll_seconds") or os.environ.get("FLYNN_REVISION_POLL_SECONDS", "1"))
        )
        self.feed: RevisionFeed | None = None
        self.listener: Listener | None = None
        self.watcher_table: WatcherTable | None = None

    def register(self, server: grpc.aio.Server) -> None:
        # The config servicer needs the store, which opens in start(); it is added there, before serving.
        self._server = server
        principals_pb2_grpc.add_PrincipalsServicer_to_server(self.principals, server)

    async def start(self) -> None:
        self.store = await open_revision_store(self.runtime)
        # Principals live next to the revisions: the same SQLite data dir, or the same database.
        shared = self.store.db if isinstance(self.store, PgRevisionStore) else None
        if shared is not None:
            leftover = self.runtime.settings.data_dir / PRINCIPALS_FILE
            adopted = await adopt_sqlite_file(shared, leftover)
            if adopted:
                log.warning(
                    "merged a leftover principals file into the database",
                    extra={"path": str(leftover), **adopted},
                )
        self.principal_store = open_principal_store(self.runtime, shared)
        self.principal_cache = await self.principals.attach(self.principal_store)
        self.editor = ConfigEditor(self.store)
        await self.editor.load()
        self.servicer = ConfigServicer(
            self.runtime, self.editor, self.hub, self.registry, self.bookmark_seconds
        )
        assert self._server is not None
        add_to_server(self.servicer, self._server)
        if self.editor.head_revision == 0:
            if self.seed_file.exists():
                cfg = config_yaml.yaml_to_config(self.seed_file.read_text(encoding="utf-8"))
                reason = f"seed from {self.seed_file}"
            elif self.seed_explicit:
                raise SystemExit(f"seed file {self.seed_file} not found (--seed-file / FLYNN_SEED_FILE)")
            else:
                log.warning("seed file %s not found; seeding an empty config", self.seed_file)
                cfg, reason = config_yaml.dict_to_config({}), "empty seed"
            stored = await self.editor.seed_if_empty(cfg, "system", reason)
            if stored is not None:
                self.runtime.audit.record(
                    "configSeed", actor="system", revision=stored.revision, reason=reason
                )
        self.hub.head = self.editor.head_revision
        metrics.HEAD_REVISION.set(self.editor.head_revision)
        if isinstance(self.store, PgRevisionStore):
            # Other replicas may commit revisions and principals too: follow the tables, woken by
            # NOTIFY on one LISTEN connection, polled as a safety net.
            self.feed = RevisionFeed(self.editor, self.servicer.publish)
            self.servicer.feed = self.feed
            self.feed.start()
            self.principal_cache.start()
            feed, principals = self.feed, self.principal_cache

            def wake() -> None:
                feed.wake()
                principals.wake()

            self.listener = Listener(
                self.store.db, (NOTIFY_CHANNEL, PRINCIPALS_CHANNEL), wake, poll_seconds=self.poll_seconds
            )
            self.listener.start()
            self.watcher_table = WatcherTable(
                self.store.db, self.registry, self.runtime.replica_id, self.runtime.advertise_address()
            )
            await self.watcher_table.join()
            self.servicer.watcher_table = self.watcher_table
            self.replicas = self.runtime.replica_registry(self._replica_report, self.store.db, gone_after=TTL)
            await self.replicas.join()
            self.watcher_table.heartbeat = self.replicas.beat  # renewed every TTL/3: no timer of its own
            self.watcher_table.start()
        else:
            self.replicas = self.runtime.replica_registry(self._replica_report)
        # Everything allocated so far lives as long as the process: keep it out of every future
        # collection, so the fan-out's short-lived garbage does not make the collector walk it again.
        gc.freeze()
        log.info("config ready", extra={"head_revision": self.editor.head_revision})

    def _replica_report(self) -> Report:
        table = self.watcher_table
        reachable = not isinstance(self.store, PgRevisionStore) or self.store.db.reachable
        lease = table is None or table.lease_ok
        return Report(
            ready=reachable and lease and not self.runtime.stopping.is_set(),
            lease_held=lease,
            database_reachable=reachable,
            holdings=(("watch_streams", float(self.hub.watchers)),),
        )

    async def stop(self) -> None:
        if self.listener is not None:
            await self.listener.stop()
        if self.feed is not None:
            await self.feed.stop()
        if self.principal_cache is not None:
            await self.principal_cache.stop()
        await self.hub.aclose()
        if self.watcher_table is not None:
            await self.watcher_table.stop()

    async def close(self) -> None:
        if self.store is not None:
            await self.store.close()
        if self.principal_store is not None:
            await self.principal_store.close()
