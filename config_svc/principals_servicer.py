"""flynn.v1.Principals: issue, list and revoke tokens; tell a caller who it is; push the issued
principals and revocations to every service (WatchPrincipals).

Writes go to the store (config_svc/principal_store.py: SQLite, or PostgreSQL shared by every
replica). Every change, made here or through another replica, reaches this process's own token store
and every open watch through the PrincipalCache (config_svc/principal_cache.py), so a revoked
credential's open streams end within a second everywhere (flynn_runtime/interceptor.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from flynn.v1 import principals_pb2 as pb
from flynn.v1 import principals_pb2_grpc as pb_grpc
from google.protobuf import timestamp_pb2
from grpc.aio import ServicerContext

from config_svc.principal_cache import PrincipalCache
from config_svc.principal_store import (
    FINGERPRINT_LEN,
    ISSUABLE_ROLES,
    NAME_RE,
    IssuedRecord,
    PrincipalSet,
    PrincipalStore,
)
from flynn_runtime import auth, errors
from flynn_runtime.auth import Principal, Role
from flynn_runtime.principal_feed import PROTO_TO_ROLE, ROLE_TO_PROTO, apply_snapshot
from flynn_runtime.server import Runtime, until_stopping
from flynn_runtime.timestamps import timestamp
from flynn_runtime.validation import Violations

Ctx = ServicerContext[Any, Any]
MAX_CHANNELS = 32


def _ts(t: float | None) -> timestamp_pb2.Timestamp | None:
    return None if t is None else timestamp(t)


def principal_proto(p: Principal, source: str, revoked: bool = False) -> pb.Principal:
    return pb.Principal(
        name=p.name,
        role=ROLE_TO_PROTO[p.role],
        channels=sorted(p.channels),
        methods=sorted(p.methods),
        fingerprint=p.fingerprint,
        source=source,
        revoked=revoked,
    )


def issued_proto(r: IssuedRecord) -> pb.Principal:
    return pb.Principal(
        name=r.name,
        role=ROLE_TO_PROTO[r.role],
        channels=list(r.channels),
        fingerprint=r.fingerprint,
        source="issued",
        issue_time=_ts(r.issue_time),
        issued_by=r.issued_by,
        revoked=r.revoke_time is not None,
        revoke_time=_ts(r.revoke_time),
    )


class PrincipalsServicer(pb_grpc.PrincipalsServicer):
    """Serves once `attach`ed to the store (the config app does that in start(), before serving)."""

    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime
        self._cache: PrincipalCache | None = None
        self._changed = asyncio.Event()
        self._lock = asyncio.Lock()

    async def attach(self, store: PrincipalStore) -> PrincipalCache:
        """Load the store and apply it; returns the cache that follows the store from now on."""
        self._cache = PrincipalCache(store, self.publish)
        await self._cache.refresh()
        return self._cache

    @property
    def cache(self) -> PrincipalCache:
        assert self._cache is not None, "PrincipalsServicer used before attach()"
        return self._cache

    @property
    def _store(self) -> PrincipalStore:
        return self.cache.store

    def snapshot(self) -> pb.WatchPrincipalsResponse:
        current = self.cache.current
        snap = pb.WatchPrincipalsResponse(version=max(current.version, 0))
        for r in current.active():
            snap.credentials.add(
                sha256=r.sha256, name=r.name, role=ROLE_TO_PROTO[r.role], channels=r.channels
            )
        snap.revoked_sha256.extend(sorted(current.revoked_hashes()))
        return snap

    def publish(self, _: PrincipalSet | None = None) -> None:
        """Apply the cache to this process's own authenticator and wake every watch."""
        apply_snapshot(self._runtime, self.snapshot())
        self._changed.set()
        self._changed = asyncio.Event()

    async def _after_write(self) -> None:
        """Publish this replica's own change at once; if the store cannot be re-read right now (the
        write did commit), the cache's loop retries."""
        try:
            await self.cache.refresh()
        except errors.FlynnError:
            self.cache.wake()

    async def IssueToken(self, request: pb.IssueTokenRequest, context: Ctx) -> pb.IssueTokenResponse:
        v = Violations()
        if not NAME_RE.match(request.name):
            v.add("name", "must be 1..64 of letters, digits and . _ - @")
        role = PROTO_TO_ROLE.get(request.role)
        if role not in ISSUABLE_ROLES:
            v.add("role", "must be PRINCIPAL_ROLE_OPERATOR, PRINCIPAL_ROLE_CHANNEL or PRINCIPAL_ROLE_AGENT")
        if role is Role.CHANNEL:
            if not request.channels:
                v.add("channels", "a channel principal needs the channels it serves")
            v.check(len(request.channels) <= MAX_CHANNELS, "channels", f"at most {MAX_CHANNELS}")
            for i, ch in enumerate(request.channels[:MAX_CHANNELS]):
                v.check(
                    0 < len(ch) <= 64 and ch != auth.ALL_CHANNELS,
                    f"channels[{i}]",
                    'must be 1..64 characters, not "*"',
                )
        elif request.channels:
            v.add("channels", "only a channel principal has channels")
        v.raise_if_any()
        assert role is not None
        async with self._lock:
            rec, token = await self._store.issue(request.name, role, list(request.channels), auth.actor())
            await self._after_write()
        self._runtime.audit.record(
            "tokenIssued",
            name=rec.name,
            role=rec.role.value,
            channels=list(rec.channels),
            fingerprint=rec.fingerprint,
        )
        return pb.IssueTokenResponse(principal=issued_proto(rec), token=token)

    async def ListPrincipals(
        self, request: pb.ListPrincipalsRequest, context: Ctx
    ) -> pb.ListPrincipalsResponse:
        current = await self._store.load()  # the store, not this replica's copy: the latest truth
        revoked_file = current.revoked_file
        out = pb.ListPrincipalsResponse()
        for p in sorted(self._runtime.tokens.file_principals(), key=lambda p: (p.role.value, p.name)):
            gone = p.sha256 in revoked_file
            if gone and not request.include_revoked:
                continue
            item = principal_proto(p, "file", gone)
            if gone:
                item.revoke_time.CopyFrom(timestamp(revoked_file[p.sha256]))
            out.principals.append(item)
        for r in current.issued if request.include_revoked else current.active():
            out.principals.append(issued_proto(r))
        return out

    async def RevokeToken(self, request: pb.RevokeTokenRequest, context: Ctx) -> pb.RevokeTokenResponse:
        v = Violations()
        if bool(request.name) == bool(request.fingerprint):
            v.add("name", "give exactly one of name or fingerprint")
        if request.name and not NAME_RE.match(request.name):
            v.add("name", "must be 1..64 of letters, digits and . _ - @")
        if request.fingerprint and (
            len(request.fingerprint) != FINGERPRINT_LEN
            or any(c not in "0123456789abcdef" for c in request.fingerprint)
        ):
            v.add("fingerprint", f"must be {FINGERPRINT_LEN} lower-case hex digits (from ListPrincipals)")
        v.text("reason", request.reason, max_bytes=1024)
        v.raise_if_any()
        by = auth.actor()
        out = pb.RevokeTokenResponse()
        async with self._lock:
            for r in await self._store.revoke_issued(request.name, request.fingerprint, by):
                out.revoked.append(issued_proto(r))
            for p in self._runtime.tokens.file_principals():
                if (request.name and p.name == request.name) or (
                    request.fingerprint and p.fingerprint == request.fingerprint
                ):
                    if await self._store.revoke_file_hash(p.sha256, p.name, by):
                        out.revoked.append(principal_proto(p, "file", True))
            if not out.revoked:
                raise errors.not_found("principal", request.name or request.fingerprint)
            await self._after_write()
        for p_out in out.revoked:
            self._runtime.audit.record(
                "tokenRevoked",
                name=p_out.name,
                role=pb.PrincipalRole.Name(p_out.role),
                fingerprint=p_out.fingerprint,
                source=p_out.source,
                reason=request.reason or None,
            )
        return out

    async def WhoAmI(self, request: pb.WhoAmIRequest, context: Ctx) -> pb.WhoAmIResponse:
        p = auth.principal()
        if p is None:  # unreachable: the policy requires a token
            raise errors.unauthenticated("no credential", reason="MISSING_TOKEN")
        # The caller was authenticated from this replica's copy, so it holds the caller's record.
        rec = next((r for r in self.cache.current.active() if r.sha256 == p.sha256), None)
        proto = issued_proto(rec) if rec is not None else principal_proto(p, "file")
        return pb.WhoAmIResponse(principal=proto, client_address=auth.client_address())

    async def WatchPrincipals(
        self, request: pb.WatchPrincipalsRequest, context: Ctx
    ) -> AsyncIterator[pb.WatchPrincipalsResponse]:
        async def snapshots() -> AsyncIterator[object]:
            while True:
                changed = self._changed
                yield self.snapshot()
                await changed.wait()

        async for item in until_stopping(self._runtime, snapshots()):
            assert isinstance(item, pb.WatchPrincipalsResponse)
            yield item
