"""Keeps a service's TokenStore current: the tokens file (polled every second) and the principals
issued through flynn.v1.Principals, followed from the config service (WatchPrincipals snapshots).

The last snapshot is cached in the data dir, so a restart while the config service is down still
knows the issued principals and, above all, the revocations.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

import grpc
from flynn.v1 import principals_pb2, principals_pb2_grpc

from flynn_runtime.auth import Principal, Role
from flynn_runtime.backoff import Backoff

if TYPE_CHECKING:
    from flynn_runtime.server import Runtime

log = logging.getLogger(__name__)

POLL_SECONDS = 1.0

ROLE_TO_PROTO = {
    Role.OPERATOR: principals_pb2.PRINCIPAL_ROLE_OPERATOR,
    Role.CHANNEL: principals_pb2.PRINCIPAL_ROLE_CHANNEL,
    Role.SERVICE: principals_pb2.PRINCIPAL_ROLE_SERVICE,
    Role.AGENT: principals_pb2.PRINCIPAL_ROLE_AGENT,
    Role.NODE: principals_pb2.PRINCIPAL_ROLE_NODE,
}
PROTO_TO_ROLE = {v: k for k, v in ROLE_TO_PROTO.items()}


def credential_to_principal(c: principals_pb2.IssuedCredential) -> Principal | None:
    role = PROTO_TO_ROLE.get(c.role)
    if role is None or role is Role.SERVICE:  # service credentials come with the deployment only
        return None
    channels = frozenset(c.channels) if role is Role.CHANNEL else frozenset()
    return Principal(c.name, role, channels, frozenset(), c.sha256)


def apply_snapshot(runtime: Runtime, snap: principals_pb2.WatchPrincipalsResponse) -> None:
    issued: dict[str, Principal] = {}
    for c in snap.credentials:
        p = credential_to_principal(c)
        if p is not None:
            issued[p.sha256] = p
    runtime.tokens.set_issued(issued, frozenset(snap.revoked_sha256))


class PrincipalFeed:
    def __init__(self, runtime: Runtime, follow_config: bool = True) -> None:
        self._runtime = runtime
        s = runtime.settings
        self._follow = follow_config and bool(s.service_token) and bool(s.address("config"))
        self._cache = s.data_dir / "principals-cache" / f"{s.service}.bin"
        self._tasks: list[asyncio.Task[None]] = []
        self.version = 0

    def start(self) -> None:
        self._load_cache()
        self._tasks.append(asyncio.ensure_future(self._poll_file()))
        if self._follow:
            self._tasks.append(asyncio.ensure_future(self._watch()))

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks.clear()

    def _load_cache(self) -> None:
        if not self._follow or not self._cache.exists():
            return
        try:
            snap = principals_pb2.WatchPrincipalsResponse.FromString(self._cache.read_bytes())
        except Exception:  # noqa: BLE001 - a damaged cache is ignored; the watch refills it
            log.warning("ignoring an unreadable principals cache", extra={"path": str(self._cache)})
            return
        apply_snapshot(self._runtime, snap)

    def _save_cache(self, snap: principals_pb2.WatchPrincipalsResponse) -> None:
        self._cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._cache.with_suffix(".tmp")
        tmp.write_bytes(snap.SerializeToString())
        tmp.replace(self._cache)

    async def _poll_file(self) -> None:
        while True:
            await asyncio.sleep(POLL_SECONDS)
            try:
                self._runtime.tokens.poll()
            except Exception:  # noqa: BLE001 - a half-written or bad file keeps the last good one
                log.exception("cannot reload the tokens file; keeping the previous one")

    async def _watch(self) -> None:
        backoff = Backoff(0.2, 5.0)
        while not self._runtime.stopping.is_set():
            stub = principals_pb2_grpc.PrincipalsStub(self._runtime.channel("config"))
            call = stub.WatchPrincipals(principals_pb2.WatchPrincipalsRequest())
            try:
                async for snap in call:
                    apply_snapshot(self._runtime, snap)
                    self.version = snap.version
                    backoff.reset()
                    await asyncio.to_thread(self._save_cache, snap)
            except grpc.aio.AioRpcError as err:
                log.debug("principals watch ended", extra={"code": err.code().name})
            finally:
                call.cancel()
            await asyncio.sleep(backoff.next_delay())
