"""`flynn.reply.delivered`: the span of a reply leaving the mesh on a StreamReplies stream.

It is recorded where the reply is handed to its subscriber: by the gateway for each reply it sends on
a `Gateway/StreamReplies` stream (a channel's), and by run control for each reply it sends on a
`RunControl/StreamReplies` stream opened directly (an operator, the console, a service). The gateway
opens its own run-control stream with the `x-flynn-delivery-span: gateway` header, so that stream's
replies are recorded once, at the edge: the busiest process, run control's event loop, records two
spans per message instead of three. A caller that sends the header itself only forgoes the spans of
its own stream. Call `delivered` only when tracing is on.
"""

from __future__ import annotations

from typing import Any

from flynn.v1 import run_control_pb2 as pb

from flynn_runtime import tracing
from flynn_runtime.enum_names import short_names

#: Metadata a StreamReplies caller sends when it records the delivered spans itself (the gateway).
DELIVERY_SPAN_HEADER = "x-flynn-delivery-span"

_KINDS: dict[int, str] = short_names(pb.ReplyKind)
_DELIVERIES: dict[int, str] = short_names(pb.DeliveryMode)


def recorded_by_caller(metadata: Any) -> bool:
    """Whether a StreamReplies call's metadata says its caller records the delivered spans."""
    return any(k == DELIVERY_SPAN_HEADER for k, _ in metadata or ())


def delivered(reply: pb.Reply) -> None:
    """Record flynn.reply.delivered for `reply` (a child of its causation's context, when sampled)."""
    tp = reply.causation.traceparent
    if not tracing.sampled(tp):
        return
    attrs: dict[str, Any] = {
        "flynn.reply.id": reply.reply_id,
        "flynn.reply.kind": _KINDS.get(reply.kind, str(reply.kind)),
        "flynn.reply.delivery": _DELIVERIES.get(reply.delivery, str(reply.delivery)),
    }
    if reply.run_id:
        attrs["flynn.run.id"] = reply.run_id
    if reply.tts_fallback_reason:
        attrs["flynn.tts.fallback_reason"] = reply.tts_fallback_reason
    attrs.update(tracing.content("flynn.reply.text", reply.text))
    tracing.end_span(tracing.start_span("flynn.reply.delivered", parent=tp, attributes=attrs))
