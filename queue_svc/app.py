"""QueueApp: wiring of run control (config source, store, agents, speech, servicer)."""

from __future__ import annotations

import argparse
import gc
import os
import socket
from pathlib import Path

import grpc
from flynn.v1 import run_control_pb2_grpc

from flynn_runtime import config_yaml
from flynn_runtime.config_source import ConfigSource, StaticConfig
from flynn_runtime.replica_registry import ReplicaRegistry, Report
from flynn_runtime.server import Runtime, ServiceApp
from flynn_runtime.settings import env_arg
from flynn_runtime.timestamps import duration_seconds
from queue_svc import store_pg
from queue_svc.access import DEFAULT_MAX_SESSIONS_PER_PRINCIPAL
from queue_svc.agent_driver import AgentProvider
from queue_svc.agents import EchoAgent, EchoSettings
from queue_svc.grpc_agent import GrpcAgent
from queue_svc.ledger import ACTIVE
from queue_svc.ownership import Ownership, OwnershipSettings
from queue_svc.run_control import RunControl
from queue_svc.servicer import RunControlServicer
from queue_svc.store import QueueStore
from queue_svc.store_sqlite import SqliteQueueStore
from queue_svc.voice_client import VoiceSynthesizer


def _flag(name: str, default: str) -> str:
    return os.environ.get(f"FLYNN_{name.upper()}", default)


def add_args(p: argparse.ArgumentParser) -> None:
    env_arg(
        p,
        "queue-config-file",
        "",
        "YAML FlynnConfig used instead of watching the config service (for tools, benchmarks and tests "
        "without the mesh)",
    )
    env_arg(
        p,
        "max-sessions-per-principal",
        str(DEFAULT_MAX_SESSIONS_PER_PRINCIPAL),
        "sessions one channel principal may open over its channels, 0 = no limit",
        type=int,
    )
    env_arg(
        p,
        "agent-token-file",
        "",
        "file holding the credential presented to external agents; it grants nothing in the mesh "
        "(FLYNN_AGENT_TOKEN is read when no file is given)",
    )
    env_arg(
        p,
        "advertise-address",
        "",
        "host:port other run-control replicas forward calls to (default: the listen address, with $POD_IP "
        "or the host name when listening on all interfaces)",
    )
    env_arg(
        p,
        "replica-id",
        "",
        "unique id of this replica among live ones (default: host name + advertised address, stable across "
        "restarts of the same pod, so a restart takes its sessions back at once)",
    )
    env_arg(
        p,
        "session-lease-seconds",
        "5",
        "session ownership lease with PostgreSQL (1..60; default 5): a dead replica's sessions are taken "
        "over this long after its last renewal",
        type=float,
    )
    env_arg(
        p,
        "session-idle-seconds",
        "60",
        "an idle session leaves memory this long after its last operation (default 60); its rows stay in "
        "the store and the next operation loads it back",
        type=float,
    )


class QueueApp(ServiceApp):
    service_names = ("flynn.v1.RunControl",)
    replicated = True

    def __init__(self, runtime: Runtime, config: ConfigSource | None = None) -> None:
        super().__init__(runtime)
        config_file = str(runtime.settings.extra.get("queue_config_file") or _flag("queue_config_file", ""))
        self.watcher = None
        self.config: ConfigSource
        if config is not None:
            self.config = config
        elif config_file:
            cfg = config_yaml.yaml_to_config(Path(config_file).read_text(encoding="utf-8"))
            self.config = StaticConfig(cfg, revision=1)
        else:
            from flynn_runtime.config_watcher import ConfigWatcher

            self.watcher = ConfigWatcher(runtime)
            self.config = self.watcher
        self.store: QueueStore | None = None
        self.rc: RunControl | None = None
        self.ownership: Ownership | None = None

    def _echo_settings(self) -> EchoSettings:
        a = self.config.config.server.agent
        return EchoSettings(
            think_time=duration_seconds(a.think_time, 0.0),
            chunks=max(a.chunks, 1),
            chunk_interval=duration_seconds(a.chunk_interval, 0.0),
        )

    def _voice_channel(self) -> grpc.aio.Channel | None:
        if not self.runtime.settings.address("voice"):
            return None
        return self.runtime.channel("voice")

    @property
    def _max_sessions(self) -> int:
        raw = self.runtime.settings.extra.get("max_sessions_per_principal")
        return int(str(raw)) if raw is not None else DEFAULT_MAX_SESSIONS_PER_PRINCIPAL

    def _agent_token(self) -> str:
        """The agent credential (never the service's own: whoever runs the agent gets what it sends)."""
        path = str(self.runtime.settings.extra.get("agent_token_file") or "")
        if path:
            return Path(path).read_text().strip()
        return os.environ.get("FLYNN_AGENT_TOKEN", "")

    def _run_control(self) -> RunControl:
        assert self.rc is not None, "run control not started"
        return self.rc

    def register(self, server: grpc.aio.Server) -> None:
        run_control_pb2_grpc.add_RunControlServicer_to_server(
            RunControlServicer(self.runtime, self._run_control, self._max_sessions), server
        )

    async def _open_store(self) -> QueueStore:
        """PostgreSQL when --database-url is set (schema flynn_queue), else the SQLite file."""
        if self.runtime.database_settings is None:
            return SqliteQueueStore(self.runtime.settings.data_dir / "queue")
        db = await self.runtime.open_database(store_pg.SCHEMA, store_pg.MIGRATIONS)
        store = await store_pg.PgQueueStore.open(db)
        settings = self._ownership_settings()
        store.holder = settings.holder
        store.idle_in_transaction_ms = int(settings.ttl * 1000 / 2)
        self.ownership = Ownership(db, settings)
        # The replica's id in the view is the holder of its session leases (what forwarding names).
        self.replicas = ReplicaRegistry(
            db, settings.holder, settings.address, self._replica_report, gone_after=settings.ttl
        )
        self.ownership.heartbeat = self.replicas.beat  # after each renewal (ttl/3): no timer of its own
        return store

    def _replica_report(self) -> Report:
        rc, own = self.rc, self.ownership
        runs = sum(1 for r in rc._runs.values() if r.row.state in ACTIVE) if rc is not None else 0
        if own is None:  # SQLite: the one process, every session is its own
            sessions = len(rc._sessions) if rc is not None else 0
            return Report(
                ready=rc is not None and not self.runtime.stopping.is_set(),
                lease_held=True,
                holdings=(("sessions_owned", float(sessions)), ("runs_active", float(runs))),
            )
        reachable = own.db.reachable
        lease = own.renewing()
        return Report(
            ready=reachable and lease and rc is not None and not self.runtime.stopping.is_set(),
            lease_held=lease,
            database_reachable=reachable,
            holdings=(("sessions_owned", float(len(own.owned))), ("runs_active", float(runs))),
        )

    def _session_idle_seconds(self) -> float:
        idle = float(
            str(
                self.runtime.settings.extra.get("session_idle_seconds") or _flag("session_idle_seconds", "60")
            )
        )
        if idle <= 0:
            raise SystemExit("--session-idle-seconds must be positive")
        return idle

    def _ownership_settings(self) -> OwnershipSettings:
        """With PostgreSQL, run control is one of N replicas (N >= 1) that own sessions by lease."""
        extra = self.runtime.settings.extra
        ttl = float(str(extra.get("session_lease_seconds") or 5.0))
        if not 1.0 <= ttl <= 60.0:
            raise SystemExit("--session-lease-seconds must be between 1 and 60")
        address = str(extra.get("advertise_address") or "")
        if not address:
            host = self.runtime.settings.listen.rpartition(":")[0].strip("[]")
            if host in ("", "0.0.0.0", "::"):
                host = os.environ.get("POD_IP") or socket.gethostname()
            address = f"{host}:{self.runtime.bound_port}"
        holder = str(extra.get("replica_id") or "") or f"{socket.gethostname()}/{address}"
        return OwnershipSettings(holder=holder, address=address, ttl=ttl, takeover_seconds=min(0.5, ttl / 4))

    async def start(self) -> None:
        if self.watcher is not None:
            await self.watcher.start()
        self.store = await self._open_store()
        if self.replicas is None:
            self.replicas = self.runtime.replica_registry(self._replica_report)
        token = self._agent_token()
        agents = AgentProvider(EchoAgent(self._echo_settings), lambda address: GrpcAgent(address, token))
        self.rc = RunControl(
            self.store,
            self.config,
            agents,
            synthesizer=VoiceSynthesizer(self._voice_channel),
            audit=self.runtime.audit,
            ownership=self.ownership,
            session_idle_seconds=self._session_idle_seconds(),
        )
        await self.rc.start()
        await self.replicas.join()  # recorded once it can serve (ready at its first row)
        # Everything allocated so far (modules, grpc, the store, the sessions adopted at start) lives as
        # long as the process: keep it out of every future collection. Measured with 3 replicas under
        # bench/scale_out's cancel load, a full (generation 2) collection otherwise walked it in 25-32 ms,
        # a pause any call in flight pays (docs/operations/SCALING.md, "Cancels with several replicas").
        gc.freeze()

    async def stop(self) -> None:
        if self.rc is not None:
            await self.rc.stop()

    async def close(self) -> None:
        if self.watcher is not None:
            await self.watcher.stop()
        if self.store is not None:
            await self.store.close()
