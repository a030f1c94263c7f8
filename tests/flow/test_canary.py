"""The playbook's canary tests, through the gateway only: run-control queue preemption + cancel,
reaction priority/cooldown, companion reconnect + re-register, canvas persistence across restart,
TTS failure fallback (no reply dropped)."""

from __future__ import annotations

import asyncio
import hashlib

import grpc
import pytest
from flynn.v1 import (
    canvas_pb2,
    canvas_pb2_grpc,
    common_pb2,
    gateway_pb2,
    nodes_pb2,
    nodes_pb2_grpc,
    run_control_pb2,
    run_control_pb2_grpc,
)

from examples.companion_node import CompanionNode
from tests.support.flow import FlowMesh, assert_gates_hold_after_kills, final_for, poll
from tests.support.mesh import as_call
from tests.support.voice import status_details

FINAL = run_control_pb2.REPLY_KIND_FINAL


def run_state(mesh: FlowMesh, run_id: str) -> int:
    stub = run_control_pb2_grpc.RunControlStub(mesh.channel())
    return int(
        stub.GetRun(run_control_pb2.GetRunRequest(run_id=run_id), metadata=mesh.md(), timeout=10).run.state
    )


def test_queue_preemption_and_cancel_for_a_canary_session(mesh: FlowMesh) -> None:
    mesh.update(
        {
            "server.queue.overrides": {"sessions": {"cli:canary-q": "interrupt"}},
            "server.agent.think_time": "3s",
        },
        reason="canary: interrupt for one session",
    )
    try:
        first = mesh.send("cli:canary-q", "long task", "cq-1")
        assert first.disposition == run_control_pb2.DISPOSITION_STARTED
        second = mesh.send("cli:canary-q", "actually, this", "cq-2")
        assert second.disposition == run_control_pb2.DISPOSITION_INTERRUPTED_PREVIOUS
        poll(
            lambda: run_state(mesh, first.run_id) == run_control_pb2.RUN_STATE_CANCELLED,
            what="first run cancelled",
        )
        # A session not in the canary keeps collect: its second message waits for the run.
        other = mesh.send("cli:not-canary", "long task", "cq-3")
        queued = mesh.send("cli:not-canary", "more", "cq-4")
        assert queued.disposition == run_control_pb2.DISPOSITION_COLLECTED
        # The user's /stop through the gateway.
        stop = mesh.gw().CancelRun(
            gateway_pb2.GatewayCancelRunRequest(
                session_key="cli:canary-q",
                scope=run_control_pb2.CANCEL_SCOPE_SESSION_AND_QUEUE,
                reason="/stop",
            ),
            metadata=mesh.md(),
            timeout=10,
        )
        assert stop.outcome == run_control_pb2.CANCEL_OUTCOME_CANCEL_REQUESTED
        poll(
            lambda: run_state(mesh, stop.run_id) == run_control_pb2.RUN_STATE_CANCELLED,
            what="stopped run cancelled",
        )
        mesh.gw().CancelRun(
            gateway_pb2.GatewayCancelRunRequest(
                session_key="cli:not-canary", scope=run_control_pb2.CANCEL_SCOPE_SESSION_AND_QUEUE
            ),
            metadata=mesh.md(),
            timeout=10,
        )
        # Cancelled runs never deliver a final.
        replies = mesh.wait_replies(lambda rs: len(rs) > 0, timeout=10)
        assert not [
            r for r in replies if r.kind == FINAL and r.run_id in (first.run_id, stop.run_id, other.run_id)
        ]
        m = mesh.metrics()
        assert m.runs.cancel_to_ack.count >= 2 and m.runs.cancel_to_ack.p95_ms <= 500
        out = mesh.flynn("gates", "check", "--window", "0", "--skip", "canvas_persistence", "--json")
        assert "cancel_to_ack_p95" in assert_gates_hold_after_kills(out.stdout)
    finally:
        mesh.update({"server.queue.overrides": {}, "server.agent.think_time": "20ms"}, reason="canary done")


def test_reaction_priority_exclusive_and_cooldown(mesh: FlowMesh) -> None:
    rules = [
        {
            "id": "ping-high",
            "enabled": True,
            "trigger": {"event": "message_received", "keywords": ["ping"]},
            "priority": 20,
            "exclusive": True,
            "cooldown": "60s",
            "cooldown_key": "session",
            "actions": [{"reply": {"text": "high says pong"}}],
        },
        {
            "id": "ping-low",
            "enabled": True,
            "trigger": {"event": "message_received", "keywords": ["ping"]},
            "priority": 5,
            "actions": [{"reply": {"text": "low says pong"}}],
        },
    ]
    mesh.update({"automation.reactions": rules}, reason="canary: ping rules")
    try:
        a = mesh.send("cli:rx", "ping one", "rx-1")
        got = mesh.wait_replies(
            lambda rs: any(r.text == "high says pong" for r in rs) and final_for(a.run_id)(rs)
        )
        texts = [
            r.text for r in got if r.kind == run_control_pb2.REPLY_KIND_REACTION and r.session_key == "cli:rx"
        ]
        assert texts == ["high says pong"]  # the exclusive high-priority rule skipped the low one
        cursor = max(r.cursor for r in got)
        b = mesh.send("cli:rx", "ping two", "rx-2")
        later = mesh.wait_replies(
            lambda rs: any(r.text == "low says pong" for r in rs) and final_for(b.run_id)(rs), after=cursor
        )
        texts = [
            r.text
            for r in later
            if r.kind == run_control_pb2.REPLY_KIND_REACTION and r.session_key == "cli:rx"
        ]
        assert texts == ["low says pong"]  # high is in its cooldown, so it did not fire (nor exclude)
        m = mesh.metrics()
        skips = {s.name: s.value for s in m.reactions.skips}
        assert skips.get("exclusive", 0) >= 1 and skips.get("cooldown", 0) >= 1
    finally:
        mesh.update(
            {"automation.reactions": [{"id": "ack-received", "enabled": True, "trigger": {"event": "message_received"},
                                       "actions": [{"ack": {"emoji": "👀"}}]}]},
            reason="canary done",
        )  # fmt: skip


async def test_companion_reconnects_and_re_registers_after_a_nodes_restart(mesh: FlowMesh) -> None:
    nodes = nodes_pb2_grpc.NodesStub(mesh.channel())
    issued = nodes.IssueNodeToken(
        nodes_pb2.IssueNodeTokenRequest(node_id="desk-1", role="desktop"),
        metadata=mesh.md("operator"),
        timeout=10,
    )
    node = CompanionNode(mesh.gateway, "desk-1", issued.token, role="desktop", backoff_max=1.0)
    task = node.start()
    try:
        await asyncio.wait_for(node.registered.wait(), 20)
        first_epoch = node.epoch
        await asyncio.to_thread(mesh.kill9, "nodes")
        await asyncio.to_thread(mesh.start_again, "nodes")
        for _ in range(400):
            if node.registered.is_set() and node.stats.registrations >= 2:
                break
            await asyncio.sleep(0.05)
        assert node.stats.registrations >= 2 and node.epoch != first_epoch
        listed = nodes.ListNodes(nodes_pb2.ListNodesRequest(), metadata=mesh.md("operator"), timeout=10)
        assert [n.node_id for n in listed.nodes].count("desk-1") == 1  # resumed, never duplicated
        m = mesh.metrics()
        assert m.nodes.online >= 1 and m.nodes.reconnect_success_rate >= 0.99
    finally:
        await node.stop()
        await asyncio.wait_for(task, 10)


def test_canvas_persistence_across_a_kill9(mesh: FlowMesh) -> None:
    canvas = canvas_pb2_grpc.CanvasStub(mesh.channel())
    content = b"# canvas doc\n" * 100
    put = canvas.PutArtifact(
        canvas_pb2.PutArtifactRequest(name="canary/doc.md", content_type="text/markdown", content=content),
        metadata=mesh.md("operator"),
        timeout=10,
    ).artifact
    # Earlier tests of this module kill services on purpose, so error_rate may fail for those kills.
    first = mesh.flynn("gates", "check", "--window", "0", "--json")
    assert_gates_hold_after_kills(first.stdout)
    mesh.kill9("nodes")
    mesh.start_again("nodes")
    again = mesh.flynn("gates", "check", "--window", "0", "--json")
    gates = assert_gates_hold_after_kills(again.stdout)
    assert gates["canvas_persistence"]["result"] == "pass", gates["canvas_persistence"]
    assert "previous probe v" in gates["canvas_persistence"]["note"]
    got = canvas.GetArtifact(
        canvas_pb2.GetArtifactRequest(name="canary/doc.md"), metadata=mesh.md("operator"), timeout=10
    ).artifact
    assert got.version == put.version and got.content == content
    assert got.sha256 == hashlib.sha256(content).hexdigest()


def test_tts_failure_falls_back_to_text_and_drops_nothing(mesh: FlowMesh) -> None:
    ok = mesh.send("voice-demo:1", "say hello", "tts-1", channel="voice-demo")
    got = mesh.wait_replies(final_for(ok.run_id), timeout=60)
    final = next(r for r in got if r.kind == FINAL and r.run_id == ok.run_id)
    assert final.delivery == run_control_pb2.DELIVERY_MODE_AUDIO and final.audio.content
    before = mesh.metrics()
    mesh.restart("voice", extra=["--fail-engines", "piper,espeak-ng"])
    try:
        sent = [
            mesh.send(f"voice-demo:f{i}", f"say {i}", f"tts-f-{i}", channel="voice-demo") for i in range(3)
        ]
        ids = {s.run_id for s in sent}
        got = mesh.wait_replies(lambda rs: ids <= {r.run_id for r in rs if r.kind == FINAL}, timeout=60)
        finals = [r for r in got if r.kind == FINAL and r.run_id in ids]
        assert len(finals) == 3  # every reply delivered, once
        assert all(r.delivery == run_control_pb2.DELIVERY_MODE_TEXT_AFTER_FALLBACK for r in finals)
        assert all(r.tts_fallback_reason and r.text for r in finals)
        after = mesh.metrics()
        assert after.voice.tts_fallbacks - before.voice.tts_fallbacks >= 3
        out = mesh.flynn("gates", "check", "--window", "0", "--skip", "canvas_persistence", "--json")
        gates = assert_gates_hold_after_kills(out.stdout)  # earlier tests of this module kill services
        assert gates["tts_no_dropped_replies"]["result"] == "pass", gates["tts_no_dropped_replies"]
    finally:
        mesh.restart("voice", extra=[])


def test_voice_service_down_text_still_flows_and_voice_notes_say_why(mesh: FlowMesh) -> None:
    mesh.kill9("voice")
    try:
        with pytest.raises(grpc.RpcError) as ei:
            mesh.send("cli:vdown", "", "vdown-1", audio=common_pb2.Audio(content=b"RIFF....WAVEfmt "))
        assert as_call(ei.value).code() == grpc.StatusCode.UNAVAILABLE
        info, _ = status_details(ei.value)
        assert info is not None and info.reason == "TRANSCRIPTION_FAILED" and info.metadata["notice_reply_id"]
        # The edge never names an internal address (issue 15).
        voice_port = mesh.procs["voice"].address.rpartition(":")[2]
        assert voice_port not in (as_call(ei.value).details() or ""), as_call(ei.value).details()
        nid = info.metadata["notice_reply_id"]
        spoken = mesh.send("voice-demo:down", "still there?", "vdown-2", channel="voice-demo")
        got = mesh.wait_replies(
            lambda rs: final_for(spoken.run_id)(rs) and any(r.reply_id == nid for r in rs), timeout=60
        )
        final = next(r for r in got if r.kind == FINAL and r.run_id == spoken.run_id)
        assert final.delivery == run_control_pb2.DELIVERY_MODE_TEXT_AFTER_FALLBACK and final.text
        # system.metrics still answers, naming the service it could not read; the gate says so.
        m = mesh.metrics()
        assert list(m.unavailable_services) == ["voice"] and m.unavailable_details[0].startswith("voice: ")
        assert m.runs.finals >= 1
        out = mesh.flynn("gates", "check", "--window", "0", "--skip", "canvas_persistence")
        assert (
            out.returncode == 1 and "metrics_available" in out.stdout and "unreachable: voice" in out.stdout
        )
    finally:
        mesh.start_again("voice")
