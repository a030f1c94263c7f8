"""Wiring of the gateway process: System and Gateway servicers, the forwarder, merged reflection."""

from __future__ import annotations

from pathlib import Path

import grpc
from flynn.v1 import gateway_pb2_grpc, system_pb2, system_pb2_grpc

from flynn_runtime import config_yaml, topology
from flynn_runtime.config_source import ConfigSource, StaticConfig
from flynn_runtime.server import Runtime, ServiceApp
from gateway import mesh_metrics
from gateway.backends import Backends
from gateway.forwarder import Forwarder
from gateway.gateway_api import GatewayServicer
from gateway.routes import Route, build_routes, external_methods, forwarded_services
from gateway.system import SystemServicer


class GatewayApp(ServiceApp):
    service_names = topology.SERVICES["gateway"].grpc_services
    counts_calls_by_class = True
    # Reflection lists every flynn.v1 service (forwarded and external) so grpcurl list/describe work here.
    reflection_names = (*forwarded_services(), *topology.EXTERNAL_SERVICES)

    def __init__(self, runtime: Runtime) -> None:
        super().__init__(runtime)
        self.backends = Backends(runtime.settings)
        self.forwarder = Forwarder(self.backends, self.routes(), external_methods(), runtime.stopping)
        extra = runtime.settings.extra
        self.metrics_addrs = mesh_metrics.parse_addrs(str(extra.get("metrics_addrs") or ""))
        # The gateway reads audio.enabled (inbound voice notes) from the live config.
        self.watcher = None
        self.config: ConfigSource
        config_file = str(extra.get("gateway_config_file") or "")
        if config_file:
            cfg = config_yaml.yaml_to_config(Path(config_file).read_text(encoding="utf-8"))
            self.config = StaticConfig(cfg, revision=1)
        else:
            from flynn_runtime.config_watcher import ConfigWatcher

            self.watcher = ConfigWatcher(runtime)
            self.config = self.watcher

    def routes(self) -> dict[str, Route]:
        """The forwarding table (tests override it to exercise kinds no proto method has yet)."""
        return build_routes()

    def _own_health(self) -> int:
        return (
            system_pb2.SERVICE_HEALTH_NOT_SERVING
            if self.runtime.stopping.is_set()
            else system_pb2.SERVICE_HEALTH_SERVING
        )

    def register(self, server: grpc.aio.Server) -> None:
        system_pb2_grpc.add_SystemServicer_to_server(
            SystemServicer(self.runtime, self.backends, self._own_health, self.metrics_addrs), server
        )
        gateway_pb2_grpc.add_GatewayServicer_to_server(
            GatewayServicer(self.runtime, self.backends, self.config), server
        )
        server.add_generic_rpc_handlers((self.forwarder,))

    async def start(self) -> None:
        if self.watcher is not None:
            await self.watcher.start()

    async def stop(self) -> None:
        if self.watcher is not None:
            await self.watcher.stop()

    async def close(self) -> None:
        await self.backends.close()
