"""Run-control and node events as ReactionEvents (pure mapping; event ids "run:<global_seq>" / "node:<seq>")."""

from __future__ import annotations

from flynn.v1 import common_pb2, config_pb2, nodes_pb2, reactions_pb2, run_control_pb2

_RUN_TYPES = {
    run_control_pb2.RUN_EVENT_TYPE_MESSAGE_RECEIVED: config_pb2.REACTION_EVENT_TYPE_MESSAGE_RECEIVED,
    run_control_pb2.RUN_EVENT_TYPE_RUN_STARTED: config_pb2.REACTION_EVENT_TYPE_RUN_STARTED,
    run_control_pb2.RUN_EVENT_TYPE_RUN_COMPLETED: config_pb2.REACTION_EVENT_TYPE_RUN_COMPLETED,
    run_control_pb2.RUN_EVENT_TYPE_RUN_CANCELLED: config_pb2.REACTION_EVENT_TYPE_RUN_CANCELLED,
    run_control_pb2.RUN_EVENT_TYPE_RUN_ERROR: config_pb2.REACTION_EVENT_TYPE_RUN_ERROR,
    run_control_pb2.RUN_EVENT_TYPE_TTS_FALLBACK: config_pb2.REACTION_EVENT_TYPE_TTS_FALLBACK,
}

_NODE_TYPES = {
    nodes_pb2.NODE_EVENT_TYPE_CONNECTED: config_pb2.REACTION_EVENT_TYPE_NODE_CONNECTED,
    nodes_pb2.NODE_EVENT_TYPE_RECONNECTED: config_pb2.REACTION_EVENT_TYPE_NODE_CONNECTED,
    nodes_pb2.NODE_EVENT_TYPE_DISCONNECTED: config_pb2.REACTION_EVENT_TYPE_NODE_DISCONNECTED,
    nodes_pb2.NODE_EVENT_TYPE_CANVAS_CHANGED: config_pb2.REACTION_EVENT_TYPE_CANVAS_CHANGED,
}


def run_event_id(global_seq: int) -> str:
    return f"run:{global_seq}"


def stored_event_id(event_id: str) -> str:
    """The id reactions keeps an event under, from any id a caller holds: the RunEvent's own
    `evt_<global_seq>` is the same event as `run:<global_seq>` (both are accepted everywhere)."""
    prefix, _, seq = event_id.partition("_")
    if prefix == "evt" and seq.isdigit():
        return run_event_id(int(seq))
    return event_id


def node_event_id(seq: int) -> str:
    return f"node:{seq}"


def from_run_event(e: run_control_pb2.RunEvent) -> reactions_pb2.ReactionEvent | None:
    """None for run events no rule can react to (queued, cancel requested, output, drops, steering)."""
    t = _RUN_TYPES.get(e.type)
    if t is None:
        return None
    event_id = run_event_id(e.global_seq)
    cz = common_pb2.Causation()
    cz.CopyFrom(e.causation)
    if cz.origin == common_pb2.ORIGIN_UNSPECIFIED:
        cz.origin = common_pb2.ORIGIN_USER
    if not cz.chain_id:
        cz.chain_id = event_id
    out = reactions_pb2.ReactionEvent(
        event_id=event_id,
        type=t,
        session_key=e.session_key,
        channel=e.channel,
        sender=e.sender,
        text=e.text,
        run_id=e.run_id,
        message_id=e.message_id,
        error_kind=e.error_kind,
        causation=cz,
    )
    if e.reason:
        out.attributes["reason"] = e.reason
    out.attributes["run_event_id"] = e.event_id
    if e.HasField("time"):
        out.time.CopyFrom(e.time)
    return out


def from_node_event(e: nodes_pb2.NodeEvent) -> reactions_pb2.ReactionEvent | None:
    t = _NODE_TYPES.get(e.type)
    if t is None:
        return None
    event_id = node_event_id(e.seq)
    out = reactions_pb2.ReactionEvent(
        event_id=event_id,
        type=t,
        node_id=e.node_id,
        node_role=e.role,
        artifact_name=e.artifact_name,
        # Node events carry no causation of their own: they are Flynn's (system) observations.
        causation=common_pb2.Causation(origin=common_pb2.ORIGIN_SYSTEM, chain_id=event_id),
    )
    if e.reason:
        out.attributes["reason"] = e.reason
    out.attributes["reconnected"] = "true" if e.type == nodes_pb2.NODE_EVENT_TYPE_RECONNECTED else "false"
    out.attributes["epoch"] = str(e.epoch)
    if e.HasField("time"):
        out.time.CopyFrom(e.time)
    return out
