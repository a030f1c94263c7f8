"""The bootstrap every service starts through.

    def main() -> None:
        run_service(settings.parse("queue"), QueueApp)

gives the service: a grpc.aio server with the shared interceptor (call limits, auth, metrics, traces,
rich errors), TLS from certificate files that are reloaded when they change and mutual TLS when a mesh
CA is set (flynn_runtime.tls), health (Check, Watch and List, per service name), server reflection
(method symbols included), a Prometheus port, JSON logs, an
audit log, and a graceful SIGTERM: health goes NOT_SERVING, `runtime.stopping` is set so streams end
with UNAVAILABLE/SHUTTING_DOWN (clients reconnect), in-flight calls get the grace period, exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import grpc
from flynn.v1 import system_pb2_grpc

# Registers google.rpc.* descriptors so reflection can resolve the error details grpcurl prints.
from google.rpc import error_details_pb2  # noqa: F401
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from flynn_runtime import VERSION, logs, metrics, reflection_service, tls, tracing
from flynn_runtime.audit import AuditLog
from flynn_runtime.auth import Authenticator, TokenStore, parse_networks
from flynn_runtime.channels import client_channel, server_options
from flynn_runtime.database import Database, Timeouts
from flynn_runtime.database_health import DatabaseHealth
from flynn_runtime.database_url import DatabaseSettingError, DatabaseSettings, database_from_settings
from flynn_runtime.errors import shutting_down
from flynn_runtime.health_service import HealthServicer
from flynn_runtime.interceptor import ServerInterceptor
from flynn_runtime.pg_migrations import Migration
from flynn_runtime.principal_feed import PrincipalFeed
from flynn_runtime.proxy_front import ProxyFront
from flynn_runtime.replica import new_replica_id
from flynn_runtime.replica_registry import ReplicaRegistry, Report
from flynn_runtime.replicas_servicer import SERVICE_NAME as REPLICAS_SERVICE
from flynn_runtime.replicas_servicer import ReplicasServicer
from flynn_runtime.settings import Settings

log = logging.getLogger(__name__)


class Runtime:
    """What the bootstrap hands to a service: settings, audit log, auth, lifecycle, channels."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.audit = AuditLog(settings.data_dir, settings.service)
        self.tokens = TokenStore(settings.tokens_file)
        try:
            trusted = parse_networks(settings.trusted_proxies)
        except ValueError as e:
            raise SystemExit(f"--trusted-proxies: {e}") from None
        self.authenticator = Authenticator(self.tokens, trusted_proxies=trusted)
        self.stopping = asyncio.Event()
        self._channels: dict[str, grpc.aio.Channel] = {}
        #: The configured PostgreSQL database (None: embedded SQLite under data_dir).
        self.database_settings: DatabaseSettings | None = database_from_settings(settings)
        self.databases: list[Database] = []
        self._credentials: grpc.ChannelCredentials | None = None
        #: The gRPC port actually bound (known before ServiceApp.start; --listen may say port 0).
        self.bound_port = 0
        #: This process among the replicas of its service (leases, presence, database session names).
        self.replica_id = new_replica_id(settings.service)

    async def open_database(
        self,
        schema: str,
        migrations: Sequence[Migration],
        *,
        max_size: int = 8,
        timeouts: Timeouts | None = None,
    ) -> Database:
        """Open (and migrate) this service's schema; its health is watched while serving and the pool
        is closed with the runtime. Only valid when a database is configured."""
        if self.database_settings is None:
            raise RuntimeError("open_database without --database-url")
        db = await Database.open(
            self.database_settings,
            service=self.settings.service,
            schema=schema,
            migrations=migrations,
            max_size=max_size,
            timeouts=timeouts,
            replica_id=self.replica_id,
        )
        self.databases.append(db)
        return db

    def channel(self, backend: str) -> grpc.aio.Channel:
        """A shared channel to another service, carrying this service's bearer token."""
        if backend not in self._channels:
            target = self.settings.address(backend)
            self._channels[backend] = client_channel(
                target,
                self.settings.service_token,
                max_message_bytes=self.settings.max_message_bytes,
                credentials=self.channel_credentials(),
            )
        return self._channels[backend]

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        """TLS credentials for calls to other services (mutual TLS when a mesh CA is configured)."""
        if self._credentials is None and self.settings.tls.mesh_tls:
            self._credentials = tls.channel_credentials(self.settings.tls)
        return self._credentials

    def advertise_address(self) -> str:
        """host:port other replicas reach this process at (flynn_runtime/replica.py)."""
        from flynn_runtime.replica import advertise_address

        return advertise_address(self.settings.listen, self.bound_port)

    def replica_registry(
        self, report: Callable[[], Report], db: Database | None = None, *, gone_after: float = 5.0
    ) -> ReplicaRegistry:
        """This process in its service's replica view (flynn_runtime/replica_registry.py), under its
        replica id and advertised address; `db` None (SQLite) answers from memory."""
        return ReplicaRegistry(db, self.replica_id, self.advertise_address(), report, gone_after=gone_after)

    def shutting_down_error(self) -> Exception:
        return shutting_down(self.settings.service)

    async def wait_stopping(self) -> None:
        await self.stopping.wait()

    async def close(self) -> None:
        for ch in self._channels.values():
            await ch.close(None)
        self._channels.clear()
        for db in self.databases:
            await db.close()
        self.databases.clear()
        self.audit.close()


class ServiceApp:
    """Base of a service's wiring. Subclasses register servicers and own their domain objects."""

    #: Fully-qualified gRPC service names served (for health and reflection).
    service_names: Sequence[str] = ()
    #: Further services listed by reflection only, not by health (the gateway's forwarded services).
    reflection_names: Sequence[str] = ()
    #: Count every answered call by status class too (flynn_gateway_calls_total; the gateway does).
    counts_calls_by_class: bool = False
    #: Whether the runtime follows the issued principals from the config service (WatchPrincipals);
    #: the config service itself owns them, and tools without a mesh turn it off.
    follows_principals: bool = True
    #: A stateful service serves flynn.v1.Replicas from `self.replicas`, set in start()
    #: (flynn_runtime/replica_registry.py).
    replicated: bool = False

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.replicas: ReplicaRegistry | None = None

    def register(self, server: grpc.aio.Server) -> None:
        raise NotImplementedError

    async def start(self) -> None:
        """Called before the server accepts calls (open storage, start background tasks)."""

    def ready(self) -> bool:
        """With a database: whether this replica may serve besides the database answering (for
        example its liveness lease is held). Health (and so readiness) goes NOT_SERVING when not."""
        return True

    async def stop(self) -> None:
        """Called on SIGTERM after health went NOT_SERVING and runtime.stopping was set."""

    async def close(self) -> None:
        """Called after the server stopped (close storage)."""


App = TypeVar("App", bound=ServiceApp)


@dataclass
class RunningServer:
    port: int
    metrics_port: int
    app: ServiceApp
    runtime: Runtime
    server: grpc.aio.Server
    health: HealthServicer
    database_health: list[DatabaseHealth]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@contextlib.asynccontextmanager
async def running(
    settings: Settings, factory: Callable[[Runtime], ServiceApp]
) -> AsyncIterator[RunningServer]:
    """Start a service and stop it gracefully on exit (used by run_service and by in-process tests)."""
    runtime = Runtime(settings)
    app = factory(runtime)
    server = grpc.aio.server(
        interceptors=[ServerInterceptor(runtime.authenticator, settings.limits, app.counts_calls_by_class)],
        options=server_options(
            settings.max_message_bytes,
            settings.max_concurrent_streams,
            settings.limits.streams_per_connection,
        ),
        maximum_concurrent_rpcs=None,
    )
    health_servicer = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    app.register(server)
    names = [*app.service_names, *app.reflection_names, health.SERVICE_NAME, reflection.SERVICE_NAME]
    reflection_service.enable([*names, *_register_replicas(app, server)], server)
    credentials = tls.server_credentials(settings.tls, settings.service)
    if credentials is None:
        port = server.add_insecure_port(settings.listen)
    else:
        port = server.add_secure_port(settings.listen, credentials)
    if port == 0:
        raise SystemExit(f"cannot listen on {settings.listen}")
    if settings.tls.local_listen and not server.add_insecure_port(
        tls.check_local_listen(settings.tls.local_listen)
    ):
        raise SystemExit(f"cannot listen on {settings.tls.local_listen}")
    runtime.bound_port = port
    metrics_port = metrics.start_metrics_server(settings.metrics_listen)
    metrics.SERVICE_INFO.labels(settings.service, VERSION).set(1)
    await health_servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    for name in app.service_names:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    try:
        await app.start()
    except BaseException:
        await runtime.close()
        raise
    feed = PrincipalFeed(runtime, follow_config=app.follows_principals)
    feed.start()
    await server.start()
    front: ProxyFront | None = None
    if settings.proxy_protocol_listen:
        host = settings.listen.rpartition(":")[0].strip("[]")
        loopback = "127.0.0.1" if host in ("", "0.0.0.0", "::") else host
        front = ProxyFront(
            settings.proxy_protocol_listen, f"{loopback}:{port}", runtime.authenticator.trusted_proxies
        )
        await front.start()
    await _set_health(health_servicer, app, True)
    watchers = [
        DatabaseHealth(db, settings.service, _health_setter(health_servicer, app, runtime), ready=app.ready)
        for db in runtime.databases
    ]
    for w in watchers:
        w.start()
    if settings.port_file is not None:
        tmp = settings.port_file.with_suffix(".tmp")
        tmp.write_text(f"{port} {metrics_port}\n")
        tmp.replace(settings.port_file)
    log.info(
        "serving",
        extra={
            "address": f"{settings.listen.rpartition(':')[0]}:{port}",
            "services": list(app.service_names),
        },
    )
    handle = RunningServer(port, metrics_port, app, runtime, server, health_servicer, watchers)
    try:
        yield handle
    finally:
        if front is not None:
            await front.stop()
        await feed.stop()
        await _graceful_stop(handle)


def _register_replicas(app: ServiceApp, server: grpc.aio.Server) -> list[str]:
    """flynn.v1.Replicas on a stateful service (its registry is set in start(), before serving)."""
    if not app.replicated:
        return []
    system_pb2_grpc.add_ReplicasServicer_to_server(ReplicasServicer(lambda: app.replicas), server)
    return [REPLICAS_SERVICE]


async def _graceful_stop(h: RunningServer) -> None:
    s = h.runtime.settings
    log.info("stopping", extra={"grace_seconds": s.grace_seconds})
    for w in h.database_health:
        await w.stop()
    await h.health.enter_graceful_shutdown()
    h.runtime.stopping.set()
    try:
        await asyncio.wait_for(h.app.stop(), timeout=s.grace_seconds)
    except TimeoutError:
        log.warning("service stop hook exceeded the grace period")
    if h.app.replicas is not None:
        await h.app.replicas.leave()  # listed as gone ("stopped") at once
    await h.server.stop(s.grace_seconds)
    try:
        await asyncio.wait_for(h.app.close(), timeout=s.grace_seconds)
    finally:
        await h.runtime.close()
    log.info("stopped")


async def _set_health(health_servicer: HealthServicer, app: ServiceApp, serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    await health_servicer.set("", status)
    for name in app.service_names:
        await health_servicer.set(name, status)


def _health_setter(
    health_servicer: HealthServicer, app: ServiceApp, runtime: Runtime
) -> Callable[[bool], Awaitable[None]]:
    async def on_change(up: bool) -> None:
        if not runtime.stopping.is_set():
            await _set_health(health_servicer, app, up)

    return on_change


async def serve(settings: Settings, factory: Callable[[Runtime], ServiceApp]) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with running(settings, factory):
        await stop.wait()


def run_service(settings: Settings, factory: Callable[[Runtime], ServiceApp]) -> None:
    """Entry point of every service process; returns (exit 0) after a graceful stop."""
    logs.configure(settings.service, settings.log_level)
    tracing.configure(settings.service)  # OTEL_* environment; off unless OTEL_TRACES_EXPORTER=otlp
    try:
        asyncio.run(serve(settings, factory))
    except DatabaseSettingError as e:
        # A start-up problem with the database setting or server: one line naming it, no traceback.
        print(f"flynn-{settings.service}: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        tracing.shutdown()  # export the spans still buffered


async def until_stopping(runtime: Runtime, source: AsyncIterator[object]) -> AsyncIterator[object]:
    """Relay `source` until the service is stopping, then end the stream with UNAVAILABLE/SHUTTING_DOWN."""
    stop_task = asyncio.ensure_future(runtime.stopping.wait())
    try:
        while True:
            next_task = asyncio.ensure_future(anext(source))
            done, _ = await asyncio.wait({next_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
            if next_task in done:
                try:
                    item = next_task.result()
                except StopAsyncIteration:
                    return
                yield item
            else:
                next_task.cancel()
                raise runtime.shutting_down_error()
    finally:
        stop_task.cancel()
