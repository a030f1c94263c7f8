"""Actions of fired rules, as calls to run control, nodes and canvas (each with a timeout and an idempotency key).

reply  -> RunControl.PostReply(kind REACTION)            ack   -> RunControl.PostReply(kind ACK, triggering message)
speak  -> RunControl.PostReply(kind REACTION, speak)     submit -> RunControl.SubmitMessage(causation: REACTION, depth+1)
invoke_node -> Nodes.InvokeNode (streamed; the result)   put_canvas -> Canvas.PutArtifact

Canvas.PutArtifact takes no idempotency key: the pipeline records each finished action under its key, so
a replay after a restart does not put again (only a crash inside the call itself can repeat one write).
"""

from __future__ import annotations

import grpc
from flynn.v1 import (
    canvas_pb2,
    canvas_pb2_grpc,
    config_pb2,
    nodes_pb2,
    nodes_pb2_grpc,
    run_control_pb2,
    run_control_pb2_grpc,
)

from flynn_runtime import tracing
from flynn_runtime.server import Runtime
from flynn_runtime.timestamps import duration_value
from reactions_svc.engine import child_causation
from reactions_svc.reactor import ActionContext, ActionOutcome
from reactions_svc.rules import substitute

CALL_TIMEOUT = 5.0
_TRANSIENT = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}


class GrpcActionRunner:
    def __init__(self, runtime: Runtime, timeout: float = CALL_TIMEOUT) -> None:
        self.runtime = runtime
        self.timeout = timeout

    def _run_control(self) -> run_control_pb2_grpc.RunControlStub:
        return run_control_pb2_grpc.RunControlStub(self.runtime.channel("queue"))

    async def run(self, kind: str, action: config_pb2.ReactionAction, ctx: ActionContext) -> ActionOutcome:
        if not tracing.ENABLED:
            return await self._caught(kind, action, ctx)
        # The action is a span of the trace of the event that caused it (the message's, from its
        # causation), linked to that event's span; the calls it makes carry it on.
        ev = ctx.event
        tp = ev.causation.traceparent
        attrs = {
            "flynn.reaction.rule_id": ctx.rule_id,
            "flynn.reaction.action": kind,
            "flynn.reaction.index": ctx.index,
            "flynn.reaction.event_id": ev.event_id,
            "flynn.session": ev.session_key or None,
            "flynn.channel": ev.channel or None,
            "flynn.message.id": ev.message_id or None,
            "flynn.run.id": ev.run_id or None,
        }
        links = tracing.link_to(tp, **{"flynn.link": "caused_by", "flynn.reaction.event_id": ev.event_id})
        with tracing.span(
            "flynn.reaction.action",
            parent=tp or None,
            attributes={k: v for k, v in attrs.items() if v is not None},
            links=links,
        ) as span:
            out = await self._caught(kind, action, ctx)
            if span is not None:
                span.set_attribute("flynn.reaction.ok", out.ok)
                if out.result_id:
                    span.set_attribute("flynn.reaction.result_id", out.result_id)
                if out.error:
                    tracing.mark_error(span, out.error[:256])
            return out

    async def _caught(
        self, kind: str, action: config_pb2.ReactionAction, ctx: ActionContext
    ) -> ActionOutcome:
        try:
            return await self._run(kind, action, ctx)
        except grpc.aio.AioRpcError as e:
            return ActionOutcome(
                False, error=f"{e.code().name}: {e.details()}", transient=e.code() in _TRANSIENT
            )

    async def _run(self, kind: str, action: config_pb2.ReactionAction, ctx: ActionContext) -> ActionOutcome:
        ev = ctx.event
        v = ctx.values
        causation = child_causation(ev, ctx.rule_id)
        if kind in ("reply", "ack", "speak"):
            if not ev.session_key or not ev.channel:
                return ActionOutcome(False, error=f"{kind}: the event has no session/channel to answer on")
            req = run_control_pb2.PostReplyRequest(
                session_key=ev.session_key,
                channel=ev.channel,
                idempotency_key=ctx.idempotency_key,
                causation=causation,
            )
            if kind == "ack":
                if not ev.message_id:
                    return ActionOutcome(False, error="ack: the event has no message to react to")
                req.kind = run_control_pb2.REPLY_KIND_ACK
                req.reply_to_message_id = ev.message_id
                req.emoji = action.ack.emoji
            else:
                req.kind = run_control_pb2.REPLY_KIND_REACTION
                req.text = substitute(action.reply.text if kind == "reply" else action.speak.text, v)
                req.speak = kind == "speak"
            resp = await self._run_control().PostReply(req, timeout=self.timeout)  # type: ignore[misc]
            return ActionOutcome(True, result_id=resp.reply.reply_id)
        if kind == "submit":
            a = action.submit
            session = a.session_key or ev.session_key
            channel = a.channel or ev.channel
            if not session or not channel:
                return ActionOutcome(
                    False, error="submit: no target session/channel (set submit.session_key and channel)"
                )
            sub = await self._run_control().SubmitMessage(  # type: ignore[misc]
                run_control_pb2.SubmitMessageRequest(
                    session_key=session,
                    channel=channel,
                    sender=f"reaction:{ctx.rule_id}",
                    text=substitute(a.text, v),
                    idempotency_key=ctx.idempotency_key,
                    causation=causation,
                ),
                timeout=self.timeout,
            )
            return ActionOutcome(True, result_id=sub.run_id or sub.message_id)
        if kind == "invoke_node":
            a2 = action.invoke_node
            node = a2.node_id or ev.node_id
            if not node:
                return ActionOutcome(False, error="invoke_node: no node (set invoke_node.node_id)")
            t = duration_value(a2.timeout) or 5.0
            call = nodes_pb2_grpc.NodesStub(self.runtime.channel("nodes")).InvokeNode(
                nodes_pb2.InvokeNodeRequest(
                    node_id=node,
                    command=a2.command,
                    args_json=substitute(a2.args_json, v, json_escape=True),
                    timeout_ms=int(t * 1000),
                    idempotency_key=ctx.idempotency_key,
                ),
                timeout=t + 1.0,
            )
            async for msg in call:
                if msg.WhichOneof("message") == "result":
                    r = msg.result
                    if r.ok:
                        return ActionOutcome(True, result_id=r.invoke_id)
                    return ActionOutcome(False, error=f"{r.error_code or 'failed'}: {r.error}")
            return ActionOutcome(False, error="invoke_node: stream ended without a result", transient=True)
        if kind == "put_canvas":
            a3 = action.put_canvas
            resp2 = await canvas_pb2_grpc.CanvasStub(self.runtime.channel("nodes")).PutArtifact(
                canvas_pb2.PutArtifactRequest(
                    name=substitute(a3.name, v),
                    content_type=a3.content_type,
                    content=substitute(a3.content, v).encode("utf-8"),
                ),
                timeout=self.timeout,
            )
            return ActionOutcome(True, result_id=f"{resp2.artifact.name}@{resp2.artifact.version}")
        return ActionOutcome(False, error=f"unknown action {kind!r}")
