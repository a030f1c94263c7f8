"""A node's live stream (`NodeSession`) and one dispatched invoke (`PendingInvoke`).

Plain Python (no grpc). A session owns a bounded outbound queue of ready-made `ConnectResponse`
protos; `close` puts a `SessionClose` on it (making room if it is full) and fails the session's
in-flight invokes at once. A `PendingInvoke` fans its progress and result out to every waiting caller
and keeps a bounded history for callers that attach later (idempotent retries).
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass

from flynn.v1 import nodes_pb2

from flynn_runtime import errors
from flynn_runtime.errors import Code, FlynnError
from nodes_svc.node_store import NodeRecord

OUTBOUND_MAX = 1024
LAST_SEEN_FLUSH = 5.0  # seconds between last_seen writes of one node (phases spread, batched per tick)
QUEUE_PROGRESS_MAX = 1000
HISTORY_MAX = 100  # progress messages kept per invoke for late-attaching callers

# Why a stream is closed by the server: (NodeClose.reconnect, status the stream ends with).
CLOSE_REASONS: dict[str, tuple[bool, Code]] = {
    "nodes_disabled": (True, Code.UNAVAILABLE),
    "role_not_allowed": (False, Code.PERMISSION_DENIED),
    "token_revoked": (False, Code.UNAUTHENTICATED),
    "replaced": (False, Code.ABORTED),
    "replica_lost": (True, Code.UNAVAILABLE),
    "shutdown": (True, Code.UNAVAILABLE),
    "lease_expired": (True, Code.UNAVAILABLE),
    "slow_consumer": (True, Code.UNAVAILABLE),
    "protocol_error": (False, Code.INVALID_ARGUMENT),
    "stream_closed": (True, Code.UNAVAILABLE),
}


@dataclass(frozen=True)
class SessionClose:
    """Put on a session's outbound queue: send NodeClose, then end the stream with `code`."""

    reason: str
    reconnect: bool
    message: str
    code: Code


class PendingInvoke:
    """One dispatched invoke: its progress history and result, fanned out to every waiting caller."""

    __slots__ = (
        "invoke_id",
        "node_id",
        "command",
        "fingerprint",
        "session",
        "started",
        "history",
        "result",
        "error",
        "subscribers",
        "idem_key",
    )

    def __init__(
        self,
        invoke_id: str,
        node_id: str,
        command: str,
        fingerprint: str,
        session: NodeSession,
        idem_key: str,
    ) -> None:
        self.invoke_id = invoke_id
        self.node_id = node_id
        self.command = command
        self.fingerprint = fingerprint
        self.session = session
        self.idem_key = idem_key
        self.started = time.perf_counter()
        self.history: list[nodes_pb2.InvokeNodeResponse] = []
        self.result: nodes_pb2.InvokeResult | None = None
        self.error: FlynnError | None = None
        self.subscribers: list[asyncio.Queue[nodes_pb2.InvokeNodeResponse | FlynnError]] = []

    @property
    def done(self) -> bool:
        return self.result is not None or self.error is not None

    def publish(self, item: nodes_pb2.InvokeNodeResponse | FlynnError) -> None:
        if isinstance(item, FlynnError):
            self.error = item
        elif item.HasField("result") or len(self.history) < HISTORY_MAX:
            # Kept for callers that attach later (idempotent retries); a chatty node cannot grow it unbounded.
            self.history.append(item)
            if item.HasField("result"):
                self.result = item.result
        progress = not isinstance(item, FlynnError) and item.HasField("progress")
        for q in self.subscribers:
            if progress and q.qsize() >= QUEUE_PROGRESS_MAX:
                continue  # a caller that does not keep up loses progress, never the result
            q.put_nowait(item)


class NodeSession:
    """A live Connect stream of one node at one epoch."""

    __slots__ = (
        "node_id",
        "role",
        "epoch",
        "capabilities",
        "token_id",
        "outbound",
        "last_seen",
        "last_sent",
        "closed",
        "closed_at",
        "ended",
        "close_reason",
        "invokes",
        "canvas",
        "connected_at",
        "flushed_seen",
        "flush_due",
    )

    def __init__(self, rec: NodeRecord, canvas: bool, now: float) -> None:
        self.node_id = rec.node_id
        self.role = rec.role
        self.epoch = rec.epoch
        self.capabilities = frozenset(rec.capabilities)
        self.token_id = rec.token_id
        self.outbound: asyncio.Queue[nodes_pb2.ConnectResponse | SessionClose] = asyncio.Queue(OUTBOUND_MAX)
        self.last_seen = now  # monotonic; renewed by anything the node sends
        self.last_sent = now  # monotonic; when the server last sent something
        self.flushed_seen = now
        self.flush_due = now + random.uniform(0, LAST_SEEN_FLUSH)  # spread the batched writes
        self.closed = False
        self.closed_at = 0.0  # monotonic, when close() was asked
        self.ended = False  # end_session ran
        self.close_reason = ""
        self.invokes: dict[str, PendingInvoke] = {}
        self.canvas = canvas
        self.connected_at = time.time()

    def send(self, msg: nodes_pb2.ConnectResponse) -> bool:
        if self.closed:
            return False
        try:
            self.outbound.put_nowait(msg)
        except asyncio.QueueFull:
            self.close("slow_consumer", "the node does not read its stream")
            return False
        self.last_sent = time.monotonic()
        return True

    def close(self, reason: str, message: str = "") -> bool:
        """Ask the stream to send NodeClose and end; fails in-flight invokes at once. False if already closing."""
        if self.closed:
            return False
        self.closed = True
        self.closed_at = time.monotonic()
        self.close_reason = reason
        reconnect, code = CLOSE_REASONS.get(reason, (True, Code.UNAVAILABLE))
        while True:  # make room: the close must get through even when the queue is full
            try:
                self.outbound.put_nowait(
                    SessionClose(reason, reconnect, message or reason.replace("_", " "), code)
                )
                break
            except asyncio.QueueFull:
                self.outbound.get_nowait()
        self.fail_invokes(reason)
        return True

    def fail_invokes(self, reason: str) -> None:
        pending, self.invokes = self.invokes, {}
        for p in pending.values():
            if not p.done:
                p.publish(
                    errors.unavailable(
                        f"node {self.node_id!r} disconnected ({reason}) before answering invoke {p.invoke_id}",
                        reason="NODE_DISCONNECTED",
                        node_id=self.node_id,
                        invoke_id=p.invoke_id,
                    )
                )
