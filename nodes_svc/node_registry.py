"""Node registry: identities and tokens, live registrations with epochs, presence leases, invokes, events.

Plain Python (no grpc). The Connect servicer turns a stream into a `NodeSession` through `register`,
drains `session.outbound` to the node and feeds what the node sends back into `on_heartbeat`,
`on_progress` and `on_result`; it calls `end_session` in its `finally`. Messages on the outbound
queue are ready-made `ConnectResponse` protos, so a stream costs one queue and one small object.

One sweeper (`tick`) serves every session: it queues server heartbeats, expires leases and flushes
last_seen to SQLite in one batch, so 1,000 nodes heartbeating cost no per-beat disk write.
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass, replace

from flynn.v1 import config_pb2, nodes_pb2

from flynn_runtime import errors, targeting
from flynn_runtime.audit import AuditLog
from flynn_runtime.auth import FailureLimiter, hash_token
from flynn_runtime.config_source import ConfigSource
from flynn_runtime.errors import FlynnError
from flynn_runtime.ids import new_id
from flynn_runtime.ordered_writer import OrderedWriter
from flynn_runtime.timestamps import duration_seconds, timestamp
from nodes_svc import metrics
from nodes_svc.node_invokes import Invokes
from nodes_svc.node_session import LAST_SEEN_FLUSH, NodeSession, SessionClose
from nodes_svc.node_store import EpochConflict, EventRecord, NewEvent, NodeRecord, NodeStore, TokenRecord

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
DEFAULT_HEARTBEAT = 5.0
DEFAULT_LEASE = 15.0
CLOSE_GRACE = 5.0  # seconds a closed stream gets to deliver its NodeClose before the session is dropped
EVENTS_KEPT = 100_000

CONNECTED = nodes_pb2.NODE_EVENT_TYPE_CONNECTED
RECONNECTED = nodes_pb2.NODE_EVENT_TYPE_RECONNECTED
DISCONNECTED = nodes_pb2.NODE_EVENT_TYPE_DISCONNECTED
CANVAS_CHANGED = nodes_pb2.NODE_EVENT_TYPE_CANVAS_CHANGED

__all__ = ["PROTOCOL_VERSION", "NodeRegistry", "NodeSession", "NodesPolicy", "SessionClose"]


@dataclass(frozen=True)
class NodesPolicy:
    """The effective server.nodes settings (defaults applied)."""

    enabled: bool
    allowed_roles: frozenset[str]
    heartbeat_interval: float
    lease: float

    @classmethod
    def of(cls, cfg: config_pb2.FlynnConfig) -> NodesPolicy:
        n = cfg.server.nodes
        hb = duration_seconds(n.heartbeat_interval, DEFAULT_HEARTBEAT)
        lease = duration_seconds(n.lease, DEFAULT_LEASE)
        return cls(n.enabled, frozenset(n.allowed_roles), hb, max(lease, hb))


@dataclass(frozen=True)
class IssuedToken:
    token_id: str
    token: str
    node_id: str
    role: str


def _registration(
    reg: nodes_pb2.NodeRegister, existing: NodeRecord | None, token_id: str, now: float
) -> tuple[NodeRecord, NewEvent]:
    """The node's record at its next epoch, and its CONNECTED/RECONNECTED event."""
    epoch = 1 if existing is None else existing.epoch + 1
    reconnects = 0 if existing is None else existing.reconnect_count + 1
    rec = NodeRecord(
        node_id=reg.node_id,
        role=reg.role,
        capabilities=sorted(set(reg.capabilities)),
        epoch=epoch,
        online=True,
        last_seen=now,
        connect_time=now,
        reconnect_count=reconnects,
        protocol_version=reg.protocol_version,
        display_name=reg.display_name,
        platform=reg.platform,
        token_id=token_id,
    )
    etype = CONNECTED if existing is None else RECONNECTED
    return rec, NewEvent(etype, reg.node_id, reg.role, epoch, "", "", now)


class NodeRegistry:
    """The node streams held by this process, their tokens, presence and events (`Invokes` runs invokes)."""

    def __init__(
        self,
        store: NodeStore,
        config: ConfigSource,
        audit: AuditLog,
        limiter: FailureLimiter | None = None,
    ) -> None:
        self.store = store
        self.config = config
        self.audit = audit
        self.limiter = limiter or FailureLimiter()
        self.sessions: dict[str, NodeSession] = {}
        self._tokens: dict[str, TokenRecord] = {}  # sha256 -> record
        self._token_nodes: set[str] = set()
        self._events_changed = asyncio.Event()
        self._policy = NodesPolicy.of(config.config)
        self._closed = False  # set by shutdown(): handlers finishing late must not touch the closed store
        # Every store write goes through one ordered queue: the bookkeeping below stays synchronous,
        # writes keep their order, and promises (tokens, registrations) are awaited until committed.
        self.writes = OrderedWriter("nodes")
        self._register_lock = asyncio.Lock()
        #: Several replicas share the store (PostgreSQL): a node without a stream here may be online
        #: on another replica, so the stored `online` flag is the answer for it.
        self.shared = False
        self.invokes = Invokes(self.sessions, store)

    # lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        for t in await self.store.all_tokens():
            self._tokens[t.sha256] = t
            self._token_nodes.add(t.node_id)
        stale = await self.store.mark_all_offline("server_restart")
        if stale:
            log.info("nodes left online by the previous process marked offline", extra={"count": len(stale)})
            self._notify_events()
        self._policy = NodesPolicy.of(self.config.config)
        metrics.ONLINE.set(0)

    def shutdown(self) -> None:
        """Last call before the store closes: end what is left, flush last_seen, refuse later writes."""
        for s in list(self.sessions.values()):
            s.close("shutdown")
            self.end_session(s)
        self.flush_last_seen()
        self._closed = True

    async def drain(self) -> None:
        """Wait for every queued store write (before the store closes)."""
        await self.writes.close()

    def _background(self, write: Callable[[], Awaitable[object]], notify: bool = False) -> None:
        """A write nobody waits for (presence bookkeeping); watchers are woken after it commits."""
        if self._closed:
            return
        fut = self.writes.submit(write)
        if notify:
            fut.add_done_callback(lambda _: self._notify_events())

    def close_all(self, reason: str) -> int:
        n = 0
        for s in list(self.sessions.values()):
            n += s.close(reason)
        return n

    @property
    def policy(self) -> NodesPolicy:
        return self._policy

    # tokens -------------------------------------------------------------------------------

    async def issue_token(self, node_id: str, role: str, description: str) -> IssuedToken:
        token = f"fln_{secrets.token_urlsafe(32)}"
        rec = TokenRecord(new_id("ntok"), hash_token(token), node_id, role, description, time.time(), None)
        await self.writes.submit(lambda: self.store.insert_token(rec), awaited=True)
        self._tokens[rec.sha256] = rec
        self._token_nodes.add(node_id)
        self.audit.record(
            "tokenIssued", node_id=node_id, role=role, token_id=rec.token_id, description=description
        )
        return IssuedToken(rec.token_id, token, node_id, role)

    async def revoke_token(self, token_id: str, reason: str) -> tuple[bool, int]:
        """Returns (already_revoked, streams closed)."""
        when = time.time()
        before = await self.writes.submit(
            lambda: self.store.revoke_token(token_id, reason, when), awaited=True
        )
        if before is None:
            raise errors.not_found("token_id", token_id, reason="TOKEN_NOT_FOUND")
        already = before.revoked is not None
        if not already:
            self._tokens[before.sha256] = replace(before, revoked=time.time())
        closed = self.close_revoked([token_id])
        self.audit.record(
            "tokenRevoked",
            token_id=token_id,
            node_id=before.node_id,
            reason=reason,
            already_revoked=already,
            closed_streams=closed,
        )
        return already, closed

    # registration -------------------------------------------------------------------------

    def _refuse(
        self,
        err: FlynnError,
        *,
        node_id: str,
        peer: str,
        known: bool,
        auth_failure: bool,
        detail: str = "",
    ) -> FlynnError:
        """Count, audit and return the error a registration is refused with."""
        if auth_failure:
            # A wrong token for a claimed node id from a real client address: counted per (node id,
            # address) and per address; a valid token is never checked against these counts.
            try:
                self.limiter.guess(f"node:{node_id[:128]}", peer)
            except FlynnError as limited:
                err = limited
        metrics.REGISTRATIONS.labels("refused", err.reason).inc()
        if known:
            metrics.RECONNECTS.labels("failure", err.reason).inc()
        self.audit.record(
            "nodeRegisterRefused",
            actor=f"node:{node_id}",
            node_id=node_id,
            reason=err.reason,
            detail=detail or None,
            peer=peer,
        )
        return err

    async def register(
        self, reg: nodes_pb2.NodeRegister, peer: str
    ) -> tuple[NodeSession, nodes_pb2.NodeRegistered]:
        """Authenticate and register (the Register message is already validated); raises FlynnError.
        Registrations are serialized, so two streams of one node never compute the same epoch."""
        async with self._register_lock:
            for _ in range(4):
                try:
                    return await self._register(reg, peer)
                except EpochConflict:
                    continue  # another replica registered this node meanwhile: read its epoch again
            raise errors.unavailable(
                f"node {reg.node_id!r} is registering on several replicas at once; retry",
                reason="REGISTRATION_CONFLICT",
                retry_after=0.5,
            )

    async def _register(
        self, reg: nodes_pb2.NodeRegister, peer: str
    ) -> tuple[NodeSession, nodes_pb2.NodeRegistered]:
        existing = await self.store.get_node(reg.node_id)
        policy = self._policy
        tok = await self._admit(reg, peer, known=existing is not None, policy=policy)
        rec, event = _registration(reg, existing, tok.token_id, time.time())
        await self.writes.submit(lambda: self.store.save_registration(rec, event), awaited=True)
        old = self.sessions.get(reg.node_id)
        if old is not None:
            old.close("replaced", "the node connected again; this stream is replaced")
        self._notify_events()
        session = self._open_session(rec, policy)
        self._record_registration(rec, peer, known=existing is not None, replaced=old is not None)
        registered = nodes_pb2.NodeRegistered(
            epoch=rec.epoch,
            gates=self._gates(session.canvas),
            heartbeat_interval_ms=int(policy.heartbeat_interval * 1000),
            lease_ms=int(policy.lease * 1000),
            resumed=existing is not None,
        )
        return session, registered

    async def _admit(
        self, reg: nodes_pb2.NodeRegister, peer: str, *, known: bool, policy: NodesPolicy
    ) -> TokenRecord:
        """The checks a registration passes, in order: nodes enabled, token, role allowed."""
        node_id = reg.node_id
        if not policy.enabled:
            raise self._refuse(
                errors.unavailable(
                    "companion nodes are disabled (server.nodes.enabled is false)",
                    reason="NODES_DISABLED",
                    retry_after=5.0,
                ),
                node_id=node_id,
                peer=peer,
                known=known,
                auth_failure=False,
            )
        tok = await self._authenticate(reg, peer, known=known)
        if reg.role not in policy.allowed_roles:
            raise self._refuse(
                errors.permission_denied(
                    f"role {reg.role!r} is not in server.nodes.allowed_roles",
                    reason="ROLE_NOT_ALLOWED",
                    role=reg.role,
                ),
                node_id=node_id,
                peer=peer,
                known=known,
                auth_failure=False,
            )
        return tok

    async def _lookup_token(self, sha: str) -> TokenRecord | None:
        tok = self._tokens.get(sha)
        if self.shared:
            # Issued or revoked through another replica: the database is the truth.
            tok = await self.store.get_token(sha)
            if tok is not None:
                self._tokens[sha] = tok
                self._token_nodes.add(tok.node_id)
        return tok

    async def _authenticate(self, reg: nodes_pb2.NodeRegister, peer: str, *, known: bool) -> TokenRecord:
        """The registration's token: known, not revoked, and issued for this node id and role."""
        node_id = reg.node_id
        tok = await self._lookup_token(hash_token(reg.token))
        if tok is None:
            # One answer for "unknown node" and "wrong token", so callers cannot enumerate node ids;
            # the audit record keeps which one it was.
            detail = "wrong_token" if node_id in self._token_nodes or known else "unknown_node"
            err = errors.unauthenticated(
                f"unknown node or wrong token for node {node_id!r}", reason="INVALID_TOKEN"
            )
            raise self._refuse(err, node_id=node_id, peer=peer, known=known, auth_failure=True, detail=detail)
        if tok.revoked is not None:
            err = errors.unauthenticated(f"token {tok.token_id} was revoked", reason="TOKEN_REVOKED")
            raise self._refuse(err, node_id=node_id, peer=peer, known=known, auth_failure=True)
        if tok.node_id != node_id or tok.role != reg.role:
            err = errors.permission_denied(
                f"token {tok.token_id} is for node {tok.node_id!r} with role {tok.role!r}",
                reason="TOKEN_SCOPE",
                node_id=node_id,
                role=reg.role,
            )
            raise self._refuse(err, node_id=node_id, peer=peer, known=known, auth_failure=True)
        return tok

    def _open_session(self, rec: NodeRecord, policy: NodesPolicy) -> NodeSession:
        session = NodeSession(rec, self._canvas_gate(rec.node_id), time.monotonic())
        # Random heartbeat phase: after a reconnect storm the server's heartbeats do not go out in one burst.
        session.last_sent -= random.uniform(0, policy.heartbeat_interval)
        self.sessions[rec.node_id] = session
        metrics.ONLINE.set(len(self.sessions))
        return session

    def _record_registration(self, rec: NodeRecord, peer: str, *, known: bool, replaced: bool) -> None:
        metrics.REGISTRATIONS.labels("ok", "resumed" if known else "new").inc()
        if known:
            metrics.RECONNECTS.labels("success", "replaced" if replaced else "resumed").inc()
        self.audit.record(
            "nodeReconnect" if known else "nodeRegister",
            actor=f"node:{rec.node_id}",
            node_id=rec.node_id,
            role=rec.role,
            epoch=rec.epoch,
            reconnect_count=rec.reconnect_count,
            replaced_stream=replaced,
            peer=peer,
        )

    def end_session(self, session: NodeSession, reason: str = "") -> None:
        """The stream of `session` ended (any cause). Idempotent."""
        if session.ended:
            return
        session.ended = True
        if not session.closed:
            session.closed = True
            session.close_reason = reason or "stream_closed"
        session.fail_invokes(session.close_reason)
        if self.sessions.get(session.node_id) is not session:
            # Replaced by a newer epoch: the node stays online, so no DISCONNECTED event.
            metrics.DISCONNECTS.labels(session.close_reason).inc()
            self.audit.record(
                "nodeDisconnect",
                actor="system",
                node_id=session.node_id,
                epoch=session.epoch,
                reason=session.close_reason,
            )
            return
        del self.sessions[session.node_id]
        metrics.ONLINE.set(len(self.sessions))
        if self._closed:
            return
        reason = session.close_reason
        metrics.DISCONNECTS.labels(reason).inc()
        last_seen = time.time() - (time.monotonic() - session.last_seen)
        event = NewEvent(DISCONNECTED, session.node_id, session.role, session.epoch, reason, "", time.time())
        node_id, epoch = session.node_id, session.epoch
        self._background(
            lambda: self.store.mark_offline(node_id, epoch, reason, last_seen, event), notify=True
        )
        self.audit.record(
            "nodeDisconnect", actor="system", node_id=session.node_id, epoch=session.epoch, reason=reason
        )

    def has_stream(self, node_id: str) -> bool:
        s = self.sessions.get(node_id)
        return s is not None and not s.closed

    def held_epochs(self) -> dict[str, int]:
        """{node_id: epoch} of the streams open on this replica."""
        return {n: s.epoch for n, s in self.sessions.items() if not s.closed}

    def held_tokens(self) -> list[str]:
        return sorted({s.token_id for s in self.sessions.values() if not s.closed and s.token_id})

    def close_revoked(self, token_ids: list[str]) -> int:
        """Tokens revoked through another replica: close the streams here that use them."""
        closed = 0
        revoked = set(token_ids)
        for s in list(self.sessions.values()):
            if s.token_id in revoked and s.close("token_revoked", f"token {s.token_id} was revoked"):
                closed += 1
        return closed

    def close_replaced(self, stale: dict[str, int]) -> int:
        """Fence: these nodes ({node_id: epoch of the stream found stale}) registered again on
        another replica; their streams here end. A stream that registered again on this replica
        since the check (a newer epoch) is not the one found stale and stays open."""
        closed = 0
        for node_id, epoch in stale.items():
            s = self.sessions.get(node_id)
            if (
                s is not None
                and s.epoch == epoch
                and s.close("replaced", "the node connected to another replica; this stream is replaced")
            ):
                closed += 1
                metrics.STREAMS_FENCED.inc()
        return closed

    def owners_lost(self, owners: list[str], mark: Callable[[list[str]], Awaitable[object]]) -> None:
        """Replicas that died with nodes online: `mark` them offline (queued with the other writes)."""
        if owners:
            self._background(lambda: mark(owners), notify=True)

    # traffic from the node ----------------------------------------------------------------

    @staticmethod
    def on_heartbeat(session: NodeSession) -> None:
        session.last_seen = time.monotonic()

    def on_progress(self, session: NodeSession, progress: nodes_pb2.InvokeProgress) -> None:
        self.invokes.on_progress(session, progress)

    def on_result(self, session: NodeSession, result: nodes_pb2.InvokeResult) -> None:
        self.invokes.on_result(session, result)

    def invoke(
        self, node_id: str, command: str, args_json: str, *, timeout_s: float, idempotency_key: str = ""
    ) -> AsyncIterator[nodes_pb2.InvokeNodeResponse]:
        """Run `command` on the node: yields progress, then the result (`Invokes.invoke`)."""
        return self.invokes.invoke(
            node_id, command, args_json, timeout_s=timeout_s, idempotency_key=idempotency_key
        )

    # gates --------------------------------------------------------------------------------

    def _canvas_gate(self, node_id: str) -> bool:
        return targeting.canvas_enabled(self.config.config, targeting.Target(node_id=node_id)).value

    def _gates(self, canvas: bool) -> nodes_pb2.NodeGates:
        return nodes_pb2.NodeGates(canvas=canvas, config_revision=self.config.revision)

    def canvas_service_enabled(self) -> bool:
        """The Canvas service is on when the gate is on globally or for some nodes by rollout."""
        ui = self.config.config.server.nodes.feature_gates.ui
        return ui.canvas or (ui.HasField("canvas_rollout") and ui.canvas_rollout.basis_points > 0)

    def apply_config(self) -> dict[str, int]:
        """Re-evaluate every live stream against the applied config (called on each server.nodes change)."""
        self._policy = policy = NodesPolicy.of(self.config.config)
        counts = {"nodes_disabled": 0, "role_not_allowed": 0, "gate_updates": 0}
        for s in list(self.sessions.values()):
            if not policy.enabled:
                counts["nodes_disabled"] += s.close("nodes_disabled", "server.nodes.enabled is false")
                continue
            if s.role not in policy.allowed_roles:
                counts["role_not_allowed"] += s.close(
                    "role_not_allowed", f"role {s.role!r} was removed from server.nodes.allowed_roles"
                )
                continue
            canvas = self._canvas_gate(s.node_id)
            if canvas != s.canvas:
                s.canvas = canvas
                if s.send(nodes_pb2.ConnectResponse(gates=nodes_pb2.GateUpdate(gates=self._gates(canvas)))):
                    counts["gate_updates"] += 1
        if any(counts.values()):
            log.info("node config applied", extra={"revision": self.config.revision, **counts})
        return counts

    # sweeper ------------------------------------------------------------------------------

    def tick(self) -> None:
        """Heartbeats to nodes due one, lease expiry, and a batched last_seen flush of the nodes due one."""
        now = time.monotonic()
        wall = time.time()
        policy = self._policy
        dirty: list[tuple[str, float]] = []
        for s in list(self.sessions.values()):
            if s.closed:
                # A peer that stopped reading cannot take its NodeClose: end the session anyway.
                if now - s.closed_at > CLOSE_GRACE:
                    self.end_session(s)
                continue
            if now - s.last_seen > policy.lease:
                s.close("lease_expired", f"no heartbeat for {policy.lease:.1f} s")
                continue
            if now - s.last_sent >= policy.heartbeat_interval:
                s.send(
                    nodes_pb2.ConnectResponse(
                        heartbeat=nodes_pb2.NodeHeartbeat(time=timestamp(wall), epoch=s.epoch)
                    )
                )
            if now >= s.flush_due:
                s.flush_due = now + LAST_SEEN_FLUSH
                if s.last_seen > s.flushed_seen:
                    s.flushed_seen = s.last_seen
                    dirty.append((s.node_id, wall - (now - s.last_seen)))
        if dirty:
            self._background(lambda: self.store.touch_many(dirty))

    def flush_last_seen(self) -> None:
        """Write every node's last_seen now (on shutdown)."""
        now_m, now_w = time.monotonic(), time.time()
        dirty: list[tuple[str, float]] = []
        for s in self.sessions.values():
            if s.last_seen > s.flushed_seen:
                s.flushed_seen = s.last_seen
                dirty.append((s.node_id, now_w - (now_m - s.last_seen)))
        if dirty:
            self._background(lambda: self.store.touch_many(dirty))

    # reads --------------------------------------------------------------------------------

    def node_proto(self, rec: NodeRecord) -> nodes_pb2.Node:
        return node_proto(rec, self.sessions.get(rec.node_id), shared=self.shared)

    async def get_node(self, node_id: str) -> nodes_pb2.Node:
        rec = await self.store.get_node(node_id)
        if rec is None:
            raise errors.not_found("node_id", node_id, reason="NODE_NOT_FOUND")
        return self.node_proto(rec)

    async def list_nodes(self, after: str, limit: int, status: int) -> list[nodes_pb2.Node]:
        online = (
            None if status == nodes_pb2.NODE_STATUS_UNSPECIFIED else status == nodes_pb2.NODE_STATUS_ONLINE
        )
        return [self.node_proto(r) for r in await self.store.list_nodes(after, limit, online)]

    # events -------------------------------------------------------------------------------

    def _notify_events(self) -> None:
        ev, self._events_changed = self._events_changed, asyncio.Event()
        ev.set()

    def record_canvas_change(self, name: str, op: str) -> None:
        event = NewEvent(CANVAS_CHANGED, "", "", 0, op, name, time.time())
        self._background(lambda: self.store.append_event(event), notify=True)

    def prune_events(self) -> None:
        self._background(lambda: self.store.prune_events(EVENTS_KEPT))

    def wake_watchers(self) -> None:
        self._notify_events()

    async def watch_events(
        self, after_seq: int, stopping: asyncio.Event | None = None, batch: int = 500
    ) -> AsyncIterator[EventRecord]:
        """Replay events after `after_seq` from SQLite, then follow new ones (no gaps, no in-memory loss).

        Returns when `stopping` is set (checked on every wake-up; `wake_watchers` wakes everyone).
        """
        cursor = after_seq
        while stopping is None or not stopping.is_set():
            changed = self._events_changed
            rows = await self.store.events_after(cursor, batch)
            for r in rows:
                cursor = r.seq
                yield r
            if len(rows) < batch:
                await changed.wait()


def node_proto(rec: NodeRecord, s: NodeSession | None, *, shared: bool) -> nodes_pb2.Node:
    """The Node message of a stored node; `s` is its stream here, if any. Without a stream here the
    stored online flag counts only when several replicas share the store (`shared`)."""
    last_seen = rec.last_seen
    if s is not None:
        last_seen = max(last_seen, time.time() - (time.monotonic() - s.last_seen))
    online = (not s.closed) if s is not None else (shared and rec.online)
    return nodes_pb2.Node(
        node_id=rec.node_id,
        role=rec.role,
        capabilities=rec.capabilities,
        status=nodes_pb2.NODE_STATUS_ONLINE if online else nodes_pb2.NODE_STATUS_OFFLINE,
        epoch=rec.epoch,
        last_seen_time=timestamp(last_seen),
        reconnect_count=rec.reconnect_count,
        protocol_version=rec.protocol_version,
        display_name=rec.display_name,
        platform=rec.platform,
        offline_reason="" if online else rec.offline_reason,
        connect_time=timestamp(rec.connect_time),
    )


def event_proto(r: EventRecord) -> nodes_pb2.NodeEvent:
    """The NodeEvent message of a stored event (the record's fields are the message's, by name)."""
    fields = asdict(r)
    fields["time"] = timestamp(r.time)
    return nodes_pb2.NodeEvent(**fields)
