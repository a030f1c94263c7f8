"""flynn.v1.ConfigService servicer: thin mapping between RPCs and the config domain.

Writes are serialized by one lock and run off the event loop (SQLite fsync); after each commit
the serialized CHANGE message is published once to every open watch (watch_hub).
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from flynn.v1 import config_pb2
from grpc.aio import ServicerContext

from config_svc import metrics
from config_svc.config_editor import ChangeResult, ConfigEditor
from config_svc.explain import explain
from config_svc.revision_feed import RevisionFeed
from config_svc.revision_store import StoredRevision
from config_svc.watch_hub import WatchHub
from config_svc.watcher_registry import WatcherEntry, WatcherRegistry
from config_svc.watcher_table import WatcherTable
from flynn_runtime import auth, errors, targeting
from flynn_runtime import metrics as grpc_metrics
from flynn_runtime.enum_names import short_names
from flynn_runtime.server import Runtime
from flynn_runtime.timestamps import timestamp, timestamp_ns
from flynn_runtime.validation import Violations, page_size

log = logging.getLogger(__name__)

Ctx = ServicerContext[Any, Any]
# A watcher further behind than this gets a snapshot instead of a replay of every revision.
MAX_REPLAY = 1000
# The most sessions one ExplainConfig call may ask about (its bulk form).
MAX_EXPLAIN_SESSIONS = 5000
# Messages of WatchConfig (written with context.write, so counted here rather than by the interceptor).
_WATCH_SENT = grpc_metrics.GRPC_MSG_SENT.labels("flynn.v1.ConfigService", "WatchConfig", "server_stream")
_KIND_NAMES = short_names(config_pb2.ConfigRevisionKind)


def revision_proto(s: StoredRevision) -> config_pb2.ConfigRevision:
    ts = timestamp_ns(s.create_time_ns)
    return config_pb2.ConfigRevision(
        revision=s.revision,
        kind=s.kind,
        actor=s.actor,
        reason=s.reason,
        create_time=ts,
        diff=[config_pb2.ConfigDiffEntry(path=p, old_value=a, new_value=b) for p, a, b in s.diff],
        restored_revision=s.restored_revision,
    )


def _diff_proto(diff: list[tuple[str, str, str]]) -> list[config_pb2.ConfigDiffEntry]:
    return [config_pb2.ConfigDiffEntry(path=p, old_value=a, new_value=b) for p, a, b in diff]


def _token(prefix: str, value: int) -> str:
    return base64.urlsafe_b64encode(f"{prefix}:{value}".encode()).decode()


def _untoken(prefix: str, token: str) -> int:
    if not token:
        return 0
    try:
        kind, _, value = base64.urlsafe_b64decode(token.encode()).decode().partition(":")
        if kind != prefix:
            raise ValueError(kind)
        n = int(value)
        if n < 0:
            raise ValueError(value)
        return n
    except (ValueError, UnicodeDecodeError):
        raise errors.invalid_argument("page_token", "is not a token returned by this method") from None


class ConfigServicer:
    def __init__(
        self,
        runtime: Runtime,
        editor: ConfigEditor,
        hub: WatchHub,
        registry: WatcherRegistry,
        bookmark_seconds: float,
    ) -> None:
        self.runtime = runtime
        self.editor = editor
        self.hub = hub
        self.registry = registry
        self.bookmark_seconds = bookmark_seconds
        self._write_lock = asyncio.Lock()
        #: Set by the app when revisions may be committed by other replicas too (PostgreSQL).
        self.feed: RevisionFeed | None = None
        self.watcher_table: WatcherTable | None = None
        self._snapshot: tuple[int, bytes] = (0, b"")
        hub.head = editor.head_revision

    # --- messages -------------------------------------------------------------------------------

    def change_payload(self, s: StoredRevision) -> bytes:
        msg = config_pb2.WatchConfigResponse(
            kind=config_pb2.WATCH_EVENT_KIND_CHANGE, revision=s.revision, metadata=revision_proto(s)
        )
        # The stored blob is the serialized FlynnConfig: splice it in as field 3 without re-parsing.
        return msg.SerializeToString() + _length_delimited(3, s.config)

    async def snapshot_payload(self) -> tuple[int, bytes]:
        """(revision, serialized SNAPSHOT) of the head, built once per head revision."""
        rev = self.editor.head_revision
        cached = self._snapshot
        if cached[0] == rev:
            return cached
        stored = await self.editor.store.get(rev)
        assert stored is not None
        msg = config_pb2.WatchConfigResponse(
            kind=config_pb2.WATCH_EVENT_KIND_SNAPSHOT, revision=rev, metadata=revision_proto(stored)
        )
        built = (rev, msg.SerializeToString() + _length_delimited(3, stored.config))
        if built[0] > self._snapshot[0]:
            self._snapshot = built
        return built

    def bookmark_payload(self, head: int) -> bytes:
        return config_pb2.WatchConfigResponse(
            kind=config_pb2.WATCH_EVENT_KIND_BOOKMARK, revision=head
        ).SerializeToString()

    def publish(self, s: StoredRevision) -> None:
        metrics.HEAD_REVISION.set(s.revision)
        metrics.REVISIONS_COMMITTED.labels(_KIND_NAMES.get(s.kind, str(s.kind))).inc()
        self.hub.publish(s.revision, self.change_payload(s))

    # --- reads ----------------------------------------------------------------------------------

    async def GetConfig(
        self, request: config_pb2.GetConfigRequest, context: Ctx
    ) -> config_pb2.GetConfigResponse:
        if request.revision < 0:
            raise errors.invalid_argument("revision", "must not be negative")
        stored, cfg = await self.editor.revision(request.revision)
        return config_pb2.GetConfigResponse(
            config=cfg, revision=stored.revision, metadata=revision_proto(stored)
        )

    async def ListRevisions(
        self, request: config_pb2.ListRevisionsRequest, context: Ctx
    ) -> config_pb2.ListRevisionsResponse:
        size = page_size(request.page_size)
        before = _untoken("before", request.page_token)
        rows = await self.editor.store.newest_first(before, size + 1)
        more = len(rows) > size
        rows = rows[:size]
        token = _token("before", rows[-1].revision) if more and rows else ""
        return config_pb2.ListRevisionsResponse(
            revisions=[revision_proto(r) for r in rows], next_page_token=token
        )

    async def ExplainConfig(
        self, request: config_pb2.ExplainConfigRequest, context: Ctx
    ) -> config_pb2.ExplainConfigResponse:
        v = Violations()
        v.text("key", request.key, required=True, max_bytes=512)
        v.text("session_key", request.session_key, max_bytes=1024)
        v.text("channel", request.channel, max_bytes=256)
        v.text("node_id", request.node_id, max_bytes=256)
        v.check(request.revision >= 0, "revision", "must not be negative")
        v.id_list("session_keys", request.session_keys, max_items=MAX_EXPLAIN_SESSIONS, max_len=1024)
        v.raise_if_any()
        stored, cfg = await self.editor.revision(request.revision)

        def answer(session_key: str) -> config_pb2.ExplainConfigResponse:
            e = explain(cfg, request.key, targeting.Target(session_key, request.channel, request.node_id))
            return config_pb2.ExplainConfigResponse(
                key=e.key,
                value=e.value_json,
                source=e.source,
                bucket=e.bucket,
                basis_points=e.basis_points,
                hashed_key=e.hashed_key,
                explanation=e.explanation,
                revision=stored.revision,
                session_key=session_key,
            )

        out = answer(request.session_key)
        if request.session_keys:
            # One call for "which of these sessions are in?": the same key, channel and revision each.
            keys = list(request.session_keys)
            out.sessions.extend(await asyncio.to_thread(lambda: [answer(k) for k in keys]))
        return out

    # --- writes ---------------------------------------------------------------------------------

    async def _write(self, fn: Callable[[], Awaitable[ChangeResult]]) -> ChangeResult:
        async with self._write_lock:
            if self.feed is not None:
                await self.feed.catch_up()  # so the head we check against is the table's
            result = await fn()
            if result.committed is not None:
                if self.feed is not None:
                    self.feed.committed(result.committed)
                else:
                    self.publish(result.committed)
                c = result.committed
                self.runtime.audit.record(
                    "configChange",
                    revision=c.revision,
                    kind=_KIND_NAMES.get(c.kind),
                    reason=c.reason,
                    restored_revision=c.restored_revision or None,
                    changed=[p for p, _, _ in c.diff][:50],
                )
        return result

    async def UpdateConfig(
        self, request: config_pb2.UpdateConfigRequest, context: Ctx
    ) -> config_pb2.UpdateConfigResponse:
        actor = auth.actor()
        paths = list(request.update_mask.paths)
        r = await self._write(
            lambda: self.editor.update(
                request.config, paths, request.expected_revision, request.reason, actor, request.dry_run
            )
        )
        return config_pb2.UpdateConfigResponse(
            revision=r.revision,
            config=r.config,
            diff=_diff_proto(r.diff),
            dry_run=r.dry_run,
            unchanged=r.unchanged,
        )

    async def RollbackConfig(
        self, request: config_pb2.RollbackConfigRequest, context: Ctx
    ) -> config_pb2.RollbackConfigResponse:
        actor = auth.actor()
        r = await self._write(
            lambda: self.editor.rollback(
                request.to_revision, request.expected_revision, request.reason, actor, request.dry_run
            )
        )
        return config_pb2.RollbackConfigResponse(
            revision=r.revision,
            config=r.config,
            diff=_diff_proto(r.diff),
            dry_run=r.dry_run,
            unchanged=r.unchanged,
        )

    # --- watchers -------------------------------------------------------------------------------

    async def ReportStatus(
        self, request: config_pb2.ReportStatusRequest, context: Ctx
    ) -> config_pb2.ReportStatusResponse:
        v = Violations()
        v.text("identity.service", request.identity.service, required=True, max_bytes=128)
        v.text("identity.instance_id", request.identity.instance_id, required=True, max_bytes=256)
        v.text("identity.version", request.identity.version, max_bytes=128)
        v.check(request.applied_revision >= 0, "applied_revision", "must not be negative")
        v.check(request.nack_revision >= 0, "nack_revision", "must not be negative")
        v.text("nack_reason", request.nack_reason, max_bytes=4096)
        v.raise_if_any()
        ident = request.identity
        self.registry.report(
            ident.service,
            ident.instance_id,
            ident.version,
            request.applied_revision,
            request.nack_revision,
            request.nack_reason,
        )
        if request.nack_revision:
            metrics.NACKS.labels(ident.service).inc()
            self.runtime.audit.record(
                "configNack",
                service=ident.service,
                instance_id=ident.instance_id,
                revision=request.nack_revision,
                reason=request.nack_reason,
            )
        return config_pb2.ReportStatusResponse()

    async def ListWatchers(
        self, request: config_pb2.ListWatchersRequest, context: Ctx
    ) -> config_pb2.ListWatchersResponse:
        size = page_size(request.page_size, default=100, maximum=1000)
        offset = _untoken("offset", request.page_token)
        if self.watcher_table is not None:  # several replicas: every replica's watchers
            page, more = await self.watcher_table.page(offset, size)
        else:
            entries = self.registry.sorted()
            page = entries[offset : offset + size]
            more = offset + size < len(entries)
        return config_pb2.ListWatchersResponse(
            watchers=[_watcher_proto(e) for e in page],
            head_revision=self.editor.head_revision,
            next_page_token=_token("offset", offset + size) if more else "",
        )

    async def WatchConfig(self, request: config_pb2.WatchConfigRequest, context: Ctx) -> None:
        """Writes pre-built messages with context.write: per message, no generator layer of its own
        (nor of the interceptor's wrapper) between the hub's wake-up and grpc's send."""
        v = Violations()
        v.check(request.after_revision >= 0, "after_revision", "must not be negative")
        v.text("identity.service", request.identity.service, max_bytes=128)
        v.text("identity.instance_id", request.identity.instance_id, max_bytes=256)
        v.raise_if_any()
        peer = context.peer() or ""
        service = request.identity.service or "(anonymous)"
        instance = request.identity.instance_id or peer
        # Subscribe before reading the head, so no revision committed meanwhile can slip between.
        sub = self.hub.subscribe()
        self.registry.opened(service, instance, request.identity.version, peer)
        metrics.WATCH_STREAMS.set(self.hub.watchers)
        write = context.write
        sent = _WATCH_SENT
        try:
            head = self.editor.head_revision
            last = request.after_revision
            if last == 0 or last > head or head - last > MAX_REPLAY:
                last, snapshot = await self.snapshot_payload()
                await write(snapshot)
                sent.inc()
            elif last < head:
                for rev, payload in await self._replay(last, head):
                    await write(payload)
                    sent.inc()
                    last = rev
            else:
                await write(self.bookmark_payload(head))
                sent.inc()
            while True:
                batch = await sub.next_batch(last)
                if sub.closed:
                    raise self.runtime.shutting_down_error()
                if batch is None:  # the bookmark tick: say the stream is alive, and at which revision
                    await write(self.bookmark_payload(last))
                    sent.inc()
                    continue
                if sub.overflowed:
                    metrics.WATCHERS_TOO_SLOW.inc()
                    raise errors.unavailable(
                        "this watch fell too far behind; reconnect with after_revision to resume",
                        reason="WATCHER_TOO_SLOW",
                        retry_after=0.1,
                    )
                head = self.hub.head
                for rev, payload in batch:
                    if rev <= last:
                        continue
                    if rev > last + 1:  # no longer in the hub's log: never leave a gap
                        for grev, gpayload in await self._replay(last, rev - 1):
                            await write(gpayload)
                            sent.inc()
                            last = grev
                    await write(payload)
                    sent.inc()
                    last = rev
                if last < head:  # the newest ones were not in the log either
                    for grev, gpayload in await self._replay(last, head):
                        await write(gpayload)
                        sent.inc()
                        last = grev
        finally:
            self.hub.unsubscribe(sub)
            self.registry.closed(service, instance)
            metrics.WATCH_STREAMS.set(self.hub.watchers)

    async def _replay(self, after: int, upto: int) -> list[tuple[int, bytes]]:
        """CHANGE messages after < r <= upto, from the in-memory cache or else from storage."""
        out: list[tuple[int, bytes]] = []
        missing = False
        for rev in range(after + 1, upto + 1):
            p = self.hub.cached(rev)
            if p is None:
                missing = True
                break
            out.append((rev, p))
        if not missing:
            return out
        rows = await self.editor.store.range(after, upto, MAX_REPLAY + 1)
        result = []
        for s in rows:
            payload = self.change_payload(s)
            self.hub.remember(s.revision, payload)
            result.append((s.revision, payload))
        return result


def _watcher_proto(e: WatcherEntry) -> config_pb2.WatcherStatus:
    seen = timestamp(e.last_seen)
    return config_pb2.WatcherStatus(
        identity=config_pb2.WatcherIdentity(service=e.service, instance_id=e.instance_id, version=e.version),
        connected=e.connected,
        applied_revision=e.applied_revision,
        last_nack_revision=e.last_nack_revision,
        last_nack_reason=e.last_nack_reason,
        last_seen_time=seen,
        peer=e.peer,
    )


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _length_delimited(field_number: int, payload: bytes) -> bytes:
    return _varint((field_number << 3) | 2) + _varint(len(payload)) + payload


def _passthrough(m: Any) -> bytes:
    return m if isinstance(m, bytes) else m.SerializeToString()


def add_to_server(servicer: ConfigServicer, server: grpc.aio.Server) -> None:
    """Like the generated add_ConfigServiceServicer_to_server, but WatchConfig sends pre-serialized bytes."""
    svc = config_pb2.DESCRIPTOR.services_by_name["ConfigService"]
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    for m in svc.methods:
        req_cls = getattr(config_pb2, m.input_type.name)
        resp_cls = getattr(config_pb2, m.output_type.name)
        fn = getattr(servicer, m.name)
        if m.server_streaming:
            handlers[m.name] = grpc.unary_stream_rpc_method_handler(
                fn, request_deserializer=req_cls.FromString, response_serializer=_passthrough
            )
        else:
            handlers[m.name] = grpc.unary_unary_rpc_method_handler(
                fn, request_deserializer=req_cls.FromString, response_serializer=resp_cls.SerializeToString
            )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(svc.full_name, handlers),))
    server.add_registered_method_handlers(svc.full_name, handlers)  # type: ignore[attr-defined]
