"""flynn.v1.System: the mesh's status (health, version, applied config revision) in one call."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
from flynn.v1 import config_pb2, config_pb2_grpc, system_pb2, system_pb2_grpc
from grpc.aio import ServicerContext
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY, generate_latest

from flynn_runtime import VERSION, topology
from flynn_runtime.server import Runtime
from flynn_runtime.settings import BACKENDS
from flynn_runtime.validation import Violations
from gateway import mesh_metrics
from gateway.backends import Backends

HEALTH_TIMEOUT = 1.0
WATCHERS_TIMEOUT = 2.0
REPLICAS_TIMEOUT = 2.0
_MAX_WATCHER_PAGES = 20

_HEALTH = {
    health_pb2.HealthCheckResponse.SERVING: system_pb2.SERVICE_HEALTH_SERVING,
    health_pb2.HealthCheckResponse.NOT_SERVING: system_pb2.SERVICE_HEALTH_NOT_SERVING,
}


class SystemServicer(system_pb2_grpc.SystemServicer):
    def __init__(
        self,
        runtime: Runtime,
        backends: Backends,
        own_health: Any,
        metrics_addrs: dict[str, str] | None = None,
    ) -> None:
        self._runtime = runtime
        self._metrics_addrs = metrics_addrs or {}
        self._backends = backends
        self._own_health = own_health  # callable returning the gateway's own health enum

    async def GetMetrics(
        self, request: system_pb2.GetMetricsRequest, context: ServicerContext[Any, Any]
    ) -> system_pb2.GetMetricsResponse:
        """Scrapes every service's /metrics in parallel (short timeout each); a service that cannot be
        read is listed in unavailable_services with why, never an error."""
        v = Violations()
        v.id_list("services", request.services, list(BACKENDS), max_items=len(BACKENDS) * 2)
        v.raise_if_any()
        asked = list(request.services) or list(BACKENDS)
        # A service left out of the deployment is neither scraped nor "unavailable": it is not there.
        wanted = [name for name in asked if self._backends.deployed(name)]
        not_deployed = [name for name in asked if not self._backends.deployed(name)]
        watchers_task = asyncio.ensure_future(self._watchers())
        results = await asyncio.gather(*(self._scrape(name) for name in wanted))
        scraped: dict[str, list[mesh_metrics.Sample]] = {}
        missing: list[tuple[str, str]] = []
        for name, (samples, why) in zip(wanted, results, strict=True):
            if samples is None:
                missing.append((name, why))
            else:
                scraped[name] = samples
        if not request.services:  # the gateway's own figures, from its own registry
            scraped["gateway"] = mesh_metrics.parse(generate_latest(REGISTRY).decode("utf-8"))
        resp = mesh_metrics.build(scraped)
        watchers, head = await watchers_task
        if head:
            resp.head_revision = head
        for name in wanted:
            w = watchers.get(name)
            if w is not None:
                resp.config_revisions.add(
                    service=name, instance_id=w.identity.instance_id, applied_revision=w.applied_revision
                )
            elif name in scraped:
                rev = int(mesh_metrics.total(scraped[name], "config_applied_revision"))
                if name == "config":
                    rev = resp.head_revision
                resp.config_revisions.add(service=name, applied_revision=rev)
        own = watchers.get("gateway")
        if own is not None and not request.services:
            resp.config_revisions.add(
                service="gateway", instance_id=own.identity.instance_id, applied_revision=own.applied_revision
            )
        for name, why in missing:
            resp.unavailable_services.append(name)
            resp.unavailable_details.append(f"{name}: {why}")
        resp.not_deployed_services.extend(not_deployed)
        resp.time.GetCurrentTime()
        return resp

    async def _scrape(self, service: str) -> tuple[list[mesh_metrics.Sample] | None, str]:
        addr = self._metrics_addrs.get(service, "")
        if not addr:
            return None, "no metrics address configured (gateway --metrics-addrs / FLYNN_METRICS_ADDRS)"
        try:
            text = await asyncio.wait_for(
                asyncio.to_thread(mesh_metrics.fetch, addr, mesh_metrics.SCRAPE_TIMEOUT),
                mesh_metrics.SCRAPE_TIMEOUT + 0.5,
            )
            return await asyncio.to_thread(mesh_metrics.parse, text), ""
        except (OSError, TimeoutError, ValueError) as e:
            return None, f"{addr}: {type(e).__name__}: {e}"

    async def GetStatus(
        self, request: system_pb2.GetStatusRequest, context: ServicerContext[Any, Any]
    ) -> system_pb2.GetStatusResponse:
        watchers_task = asyncio.ensure_future(self._watchers())
        statuses = list(await asyncio.gather(*(self._check(b) for b in BACKENDS)))
        watchers, head = await watchers_task
        out = system_pb2.GetStatusResponse(head_revision=head)
        statuses.append(
            system_pb2.ServiceStatus(
                service="gateway",
                address=self._runtime.settings.listen,
                health=self._own_health(),
                version=VERSION,
            )
        )
        for st in statuses:
            if st.service == "config" and st.health == system_pb2.SERVICE_HEALTH_SERVING:
                st.applied_revision = head  # the config service serves its own head revision
            w = watchers.get(st.service)
            if w is not None:
                st.applied_revision = w.applied_revision
                if not st.version:
                    st.version = w.identity.version
        out.services.extend(statuses)
        return out

    async def _check(self, backend: str) -> system_pb2.ServiceStatus:
        addr = self._backends.address(backend)
        st = system_pb2.ServiceStatus(service=backend, address=addr)
        if not self._backends.deployed(backend):
            st.health = system_pb2.SERVICE_HEALTH_NOT_DEPLOYED
            st.detail = "not deployed (left out of this mesh on purpose)"
            return st
        stub = health_pb2_grpc.HealthStub(self._backends.channel(backend))
        replicas = (
            asyncio.ensure_future(self._replicas(backend)) if topology.SERVICES[backend].stateful else None
        )
        try:
            resp = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=HEALTH_TIMEOUT)
            st.health = _HEALTH.get(resp.status, system_pb2.SERVICE_HEALTH_NOT_SERVING)
        except grpc.aio.AioRpcError as err:
            st.health = system_pb2.SERVICE_HEALTH_UNREACHABLE
            st.detail = f"{err.code().name}: {err.details()}"
        if replicas is not None:
            listed, why = await replicas
            st.replicas.extend(listed)
            st.replicas_detail = why
        return st

    async def _replicas(self, backend: str) -> tuple[list[system_pb2.ReplicaStatus], str]:
        """The service's replicas as they recorded themselves (any replica answers for all of them, so
        this works behind a Kubernetes headless Service as well as with a list of addresses)."""
        stub = system_pb2_grpc.ReplicasStub(self._runtime.channel(backend))
        try:
            resp = await stub.ListReplicas(system_pb2.ListReplicasRequest(), timeout=REPLICAS_TIMEOUT)
        except grpc.aio.AioRpcError as err:
            return [], f"replicas not listed: {err.code().name}: {err.details()}"
        return list(resp.replicas), ""

    async def _watchers(self) -> tuple[dict[str, config_pb2.WatcherStatus], int]:
        """Latest reported watcher per service (highest applied revision), and the config head revision."""
        stub = config_pb2_grpc.ConfigServiceStub(self._runtime.channel("config"))
        best: dict[str, config_pb2.WatcherStatus] = {}
        head = 0
        token = ""
        try:
            for _ in range(_MAX_WATCHER_PAGES):
                resp = await stub.ListWatchers(
                    config_pb2.ListWatchersRequest(page_size=1000, page_token=token), timeout=WATCHERS_TIMEOUT
                )
                head = max(head, resp.head_revision)
                for w in resp.watchers:
                    cur = best.get(w.identity.service)
                    if cur is None or (w.connected, w.applied_revision) > (
                        cur.connected,
                        cur.applied_revision,
                    ):
                        best[w.identity.service] = w
                token = resp.next_page_token
                if not token:
                    break
        except grpc.aio.AioRpcError:
            pass  # the config row already says whether config is reachable
        return best, head
