"""Invokes of node commands: dispatch to the node's stream, idempotent retries, deadlines, cancels.

Plain Python (no grpc). An invoke is dispatched on the node's live `NodeSession` as one
`InvokeRequest` carrying the absolute deadline; every caller waiting for it (the first one and the
idempotent retries with the same key) subscribes to the one `PendingInvoke`. A caller that goes away
while nobody else waits and no retry can attach tells the node to stop (`InvokeCancel`).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import OrderedDict
from collections.abc import AsyncIterator

from flynn.v1 import nodes_pb2

from flynn_runtime import errors, tracing
from flynn_runtime.errors import Code, FlynnError
from flynn_runtime.ids import new_id
from flynn_runtime.timestamps import timestamp
from nodes_svc import metrics
from nodes_svc.node_session import NodeSession, PendingInvoke
from nodes_svc.node_store import NodeStore

IDEMPOTENCY_MAX = 10_000

Subscription = asyncio.Queue[nodes_pb2.InvokeNodeResponse | FlynnError]


def deadline_error(p: PendingInvoke, why: str) -> FlynnError:
    """The DEADLINE_EXCEEDED error of invoke `p`."""
    return FlynnError(
        Code.DEADLINE_EXCEEDED,
        f"invoke {p.invoke_id} of {p.command!r} on node {p.node_id!r} missed its deadline: {why}",
        reason="INVOKE_DEADLINE_EXCEEDED",
        metadata={"node_id": p.node_id, "invoke_id": p.invoke_id},
    )


def cancel_on_node(p: PendingInvoke, reason: str) -> None:
    """Tell the node to stop working on `p`."""
    p.session.send(
        nodes_pb2.ConnectResponse(cancel=nodes_pb2.InvokeCancel(invoke_id=p.invoke_id, reason=reason))
    )


def _check_dispatchable(session: NodeSession, node_id: str, command: str) -> None:
    if command not in session.capabilities:
        raise errors.failed_precondition(
            f"node {node_id!r} did not declare command {command!r}",
            reason="COMMAND_NOT_DECLARED",
            node_id=node_id,
            command=command,
        )
    if command.startswith("canvas.") and not session.canvas:
        raise errors.failed_precondition(
            "canvas commands are off (server.nodes.feature_gates.ui.canvas)",
            reason="CANVAS_DISABLED",
            command=command,
        )


def _invoke_message(p: PendingInvoke, args_json: str, deadline_wall: float) -> nodes_pb2.ConnectResponse:
    msg = nodes_pb2.ConnectResponse(
        invoke=nodes_pb2.InvokeRequest(
            invoke_id=p.invoke_id, command=p.command, args_json=args_json, deadline=timestamp(deadline_wall)
        )
    )
    if tracing.ENABLED:  # the node continues the InvokeNode call's trace from its invoke message
        trace_carrier = tracing.carrier()
        msg.invoke.traceparent = trace_carrier.get(tracing.TRACEPARENT, "")
        msg.invoke.tracestate = trace_carrier.get(tracing.TRACESTATE, "")
    return msg


def _outcome_of(item: nodes_pb2.InvokeNodeResponse, cached: bool) -> str:
    if cached:
        return "cached"
    return "ok" if item.result.ok else "error"


class Invokes:
    """The invokes of the node streams held here (`sessions`, shared with the registry)."""

    def __init__(self, sessions: dict[str, NodeSession], store: NodeStore) -> None:
        self.sessions = sessions
        self.store = store
        self._idem: OrderedDict[tuple[str, str], PendingInvoke] = OrderedDict()

    # traffic from the node ----------------------------------------------------------------

    @staticmethod
    def on_progress(session: NodeSession, progress: nodes_pb2.InvokeProgress) -> None:
        session.last_seen = time.monotonic()
        p = session.invokes.get(progress.invoke_id)
        if p is not None and not p.done:
            p.publish(nodes_pb2.InvokeNodeResponse(progress=progress))

    @staticmethod
    def on_result(session: NodeSession, result: nodes_pb2.InvokeResult) -> None:
        session.last_seen = time.monotonic()
        p = session.invokes.pop(result.invoke_id, None)
        if p is None or p.done:
            return
        metrics.INVOKE_LATENCY.observe(time.perf_counter() - p.started)
        if not result.ok and result.error_code == "deadline_exceeded":
            p.publish(deadline_error(p, "the node reported that the deadline passed"))
        else:
            p.publish(nodes_pb2.InvokeNodeResponse(result=result))

    # invoke -------------------------------------------------------------------------------

    async def _dispatch(
        self,
        *,
        node_id: str,
        command: str,
        args_json: str,
        deadline_wall: float,
        idem_key: str,
        fingerprint: str,
    ) -> PendingInvoke:
        session = self.sessions.get(node_id)
        if session is None or session.closed:
            known = await self.store.get_node(node_id) is not None
            if not known:
                raise errors.not_found("node_id", node_id, reason="NODE_NOT_FOUND")
            raise errors.failed_precondition(
                f"node {node_id!r} is not online", reason="NODE_OFFLINE", node_id=node_id
            )
        _check_dispatchable(session, node_id, command)
        p = PendingInvoke(new_id("inv"), node_id, command, fingerprint, session, idem_key)
        session.invokes[p.invoke_id] = p
        if not session.send(_invoke_message(p, args_json, deadline_wall)):
            session.invokes.pop(p.invoke_id, None)
            raise errors.unavailable(
                f"node {node_id!r} is disconnecting", reason="NODE_DISCONNECTED", node_id=node_id
            )
        return p

    def _cached(self, key: tuple[str, str], fingerprint: str) -> PendingInvoke | None:
        """The invoke an earlier call with this idempotency key dispatched, if it can be joined."""
        p = self._idem.get(key)
        if p is None:
            return None
        if p.fingerprint != fingerprint:
            metrics.INVOKES.labels("refused").inc()
            raise errors.invalid_argument(
                "idempotency_key",
                "was used for a different command or arguments on this node",
                reason="IDEMPOTENCY_KEY_REUSED",
            )
        if p.error is not None:  # failed attempts are not cached: a retry dispatches again
            del self._idem[key]
            return None
        self._idem.move_to_end(key)
        return p

    async def _attach(
        self, node_id: str, command: str, args_json: str, deadline_wall: float, idempotency_key: str
    ) -> PendingInvoke:
        """Join the cached invoke of this idempotency key, or dispatch a new one."""
        fingerprint = hashlib.sha256(f"{command}\x00{args_json}".encode()).hexdigest()
        key = (node_id, idempotency_key)
        p = self._cached(key, fingerprint) if idempotency_key else None
        if p is not None:
            return p
        try:
            p = await self._dispatch(
                node_id=node_id,
                command=command,
                args_json=args_json,
                deadline_wall=deadline_wall,
                idem_key=idempotency_key,
                fingerprint=fingerprint,
            )
        except FlynnError:
            metrics.INVOKES.labels("refused").inc()
            raise
        if idempotency_key:
            self._idem[key] = p
            while len(self._idem) > IDEMPOTENCY_MAX:
                self._idem.popitem(last=False)
        return p

    @staticmethod
    def _subscribe(p: PendingInvoke) -> Subscription:
        """A queue that gets what `p` already said (for a late caller) and everything after."""
        q: Subscription = asyncio.Queue()
        for seen in p.history:
            q.put_nowait(seen)
        if p.error is not None:
            q.put_nowait(p.error)
        p.subscribers.append(q)
        return q

    def _detach(self, p: PendingInvoke, q: Subscription, node_id: str) -> None:
        if q in p.subscribers:
            p.subscribers.remove(q)
        if not p.subscribers and not p.done and not p.idem_key:
            # Nobody waits and no retry can attach: tell the node to stop, drop a late answer.
            p.session.invokes.pop(p.invoke_id, None)
            cancel_on_node(p, "cancelled")
        if p.error is not None and p.idem_key and self._idem.get((node_id, p.idem_key)) is p:
            del self._idem[(node_id, p.idem_key)]

    @staticmethod
    def _expire(p: PendingInvoke, timeout_s: float) -> FlynnError:
        """The caller's deadline passed: fail the invoke (if still open) and tell the node."""
        if not p.done:
            p.session.invokes.pop(p.invoke_id, None)
            p.publish(deadline_error(p, f"no answer within {timeout_s:.3f} s"))
            cancel_on_node(p, "deadline_exceeded")
        return deadline_error(p, f"no answer within {timeout_s:.3f} s")

    async def invoke(
        self, node_id: str, command: str, args_json: str, *, timeout_s: float, idempotency_key: str = ""
    ) -> AsyncIterator[nodes_pb2.InvokeNodeResponse]:
        """Run `command` on the node: yields progress, then the result; raises FlynnError otherwise.

        The node gets the absolute deadline now + timeout_s; the same deadline is enforced here.
        """
        deadline_wall = time.time() + timeout_s
        loop_deadline = asyncio.get_running_loop().time() + timeout_s
        p = await self._attach(node_id, command, args_json, deadline_wall, idempotency_key)
        q = self._subscribe(p)
        cached = p.done
        outcome = "cached" if cached else "cancelled"
        try:
            async with asyncio.timeout_at(loop_deadline):
                while True:
                    item = await q.get()
                    if isinstance(item, FlynnError):
                        deadline = item.code == Code.DEADLINE_EXCEEDED
                        outcome = "deadline_exceeded" if deadline else "unavailable"
                        raise item
                    yield item
                    if item.HasField("result"):
                        outcome = _outcome_of(item, cached)
                        return
        except TimeoutError:
            outcome = "deadline_exceeded"
            raise self._expire(p, timeout_s) from None
        finally:
            self._detach(p, q, node_id)
            metrics.INVOKES.labels(outcome).inc()
