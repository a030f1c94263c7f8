"""The playbook as commands, run the way an operator would (`flynn gates …`, `flynn rollback …` as
subprocesses against the gateway): gates pass on a healthy mesh, snapshots compare, and each rollback
command is one audited revision that flips its behaviour in every service."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import grpc
import pytest
from flynn.v1 import (
    canvas_pb2,
    canvas_pb2_grpc,
    common_pb2,
    config_pb2,
    nodes_pb2,
    nodes_pb2_grpc,
    reactions_pb2,
    reactions_pb2_grpc,
    run_control_pb2,
)

from examples.companion_node import CompanionNode
from flynn_runtime.gates import GATE_NAMES
from tests.support.flow import NO_GATE_FAILED, FlowMesh, final_for, poll
from tests.support.mesh import as_call
from tests.support.voice import status_details

FINAL = run_control_pb2.REPLY_KIND_FINAL
FLIP_BOUND = 5.0  # generous: the measured figure is in bench/e2e.py


def silent_wav() -> bytes:
    import io
    import wave

    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(b"\x00\x00" * 8000)
    return buf.getvalue()


def rollback(mesh: FlowMesh, step: str) -> int:
    out = mesh.flynn("rollback", step, "--reason", "flow test", "--wait", "10")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "applied by every connected watcher" in out.stdout, out.stdout
    line = next(x for x in out.stdout.splitlines() if x.startswith(f"rollback {step}:"))
    revision = int(line.split("revision ")[1].split()[0].rstrip(")"))
    hist = mesh.config().ListRevisions(
        config_pb2.ListRevisionsRequest(page_size=1), metadata=mesh.md("operator"), timeout=10
    )
    top = hist.revisions[0]
    assert top.revision == revision and top.reason.startswith(f"rollback playbook: {step}")
    assert top.actor and "flow test" in top.reason
    return revision


def test_gates_pass_on_a_healthy_mesh_and_snapshots_compare(mesh: FlowMesh, tmp_path: Path) -> None:
    sent = mesh.send("cli:gates", "hello", "gates-1")
    mesh.wait_replies(final_for(sent.run_id))
    before = tmp_path / "before.json"
    after = tmp_path / "after.json"
    assert mesh.flynn("gates", "snapshot", "-o", str(before)).returncode == 0
    check = mesh.flynn("gates", "check", "--window", "1s")
    assert check.returncode in NO_GATE_FAILED, check.stdout + check.stderr
    for gate in GATE_NAMES:
        assert f"{gate} " in check.stdout, check.stdout
    # A one-second window of a quiet mesh is below most minimum samples: inconclusive, nothing failed.
    assert "0 fail" in check.stdout and ("PASSED: 8 of 8" in check.stdout or "INCONCLUSIVE: " in check.stdout)
    sent = mesh.send("cli:gates", "again", "gates-2")
    mesh.wait_replies(final_for(sent.run_id))
    assert mesh.flynn("gates", "snapshot", "-o", str(after)).returncode == 0
    cmp = mesh.flynn("gates", "compare", str(before), str(after))
    assert cmp.returncode in NO_GATE_FAILED, cmp.stdout + cmp.stderr
    assert "runs.finals" in cmp.stdout and "BEFORE" in cmp.stdout
    as_json = mesh.flynn("gates", "check", "--window", "0", "--json")
    assert as_json.returncode in NO_GATE_FAILED, as_json.stdout + as_json.stderr
    doc = json.loads(as_json.stdout)
    assert doc["verdict"] in ("passed", "inconclusive") and {g["gate"] for g in doc["gates"]} >= {
        "canvas_persistence",
        "duplicate_finals",
    }
    probe = next(g for g in doc["gates"] if g["gate"] == "canvas_persistence")
    assert "previous probe v" in probe["note"] and "intact" in probe["note"]


def test_a_failing_gate_exits_non_zero(mesh: FlowMesh) -> None:
    # A tampered probe (content no longer matches its own checksum) fails canvas_persistence.
    canvas = canvas_pb2_grpc.CanvasStub(mesh.channel())
    canvas.PutArtifact(
        canvas_pb2.PutArtifactRequest(
            name="gates/tampered", content_type="text/plain", content=b"flynn probe\nsha256 0000\n"
        ),
        metadata=mesh.md("operator"),
        timeout=10,
    )
    out = mesh.flynn("gates", "check", "--window", "0", "--probe-name", "gates/tampered")
    assert out.returncode == 1, out.stdout
    assert "canvas_persistence" in out.stdout and "FAIL" in out.stdout
    bad = mesh.flynn("gates", "check", "--window", "soon")
    assert bad.returncode == 2 and "--window" in bad.stderr


async def test_every_rollback_command_flips_its_behaviour_everywhere(mesh: FlowMesh) -> None:
    # Canary state first: interrupt for one session, a rollout, a node connected, speech on.
    await asyncio.to_thread(
        mesh.update,
        {
            "server.queue.mode": "followup",
            "server.queue.overrides": {"sessions": {"cli:canary": "interrupt"}},
            "server.queue.rollout": {"mode": "steer", "rollout": {"basis_points": 500}},
        },
    )
    sent = mesh.send("cli:canary", "canary", "rb-q-1")
    assert sent.effective_mode.mode == config_pb2.QUEUE_MODE_INTERRUPT
    nodes = nodes_pb2_grpc.NodesStub(mesh.channel())
    issued = nodes.IssueNodeToken(
        nodes_pb2.IssueNodeTokenRequest(node_id="desk-rb", role="desktop"),
        metadata=mesh.md("operator"),
        timeout=10,
    )
    node = CompanionNode(mesh.gateway, "desk-rb", issued.token, role="desktop")
    task = node.start()
    try:
        await asyncio.wait_for(node.registered.wait(), 20)

        # queue
        await asyncio.to_thread(rollback, mesh, "queue")
        t0 = time.monotonic()
        for i in range(100):
            resp = mesh.send("cli:canary", "after", f"rb-q-2-{i}")
            if resp.effective_mode.mode == config_pb2.QUEUE_MODE_COLLECT:
                break
            await asyncio.sleep(0.05)
        assert resp.effective_mode.mode == config_pb2.QUEUE_MODE_COLLECT
        assert time.monotonic() - t0 < FLIP_BOUND
        cfg = (
            mesh.config()
            .GetConfig(config_pb2.GetConfigRequest(), metadata=mesh.md("operator"), timeout=10)
            .config
        )
        assert not cfg.server.queue.overrides.sessions and not cfg.server.queue.HasField("rollout")

        # reactions: the rule set is empty in the reactions service, and a new message gets no ack.
        await asyncio.to_thread(rollback, mesh, "reactions")
        rx = reactions_pb2_grpc.ReactionsStub(mesh.channel())
        rules = rx.ListRules(reactions_pb2.ListRulesRequest(), metadata=mesh.md("operator"), timeout=10)
        assert len(rules.rules) == 0
        m1 = mesh.send("cli:noack", "no ack please", "rb-r-1")
        m2 = mesh.send("cli:noack2", "second", "rb-r-2")
        seen = await asyncio.to_thread(
            mesh.wait_replies, lambda rs: final_for(m1.run_id)(rs) and final_for(m2.run_id)(rs)
        )
        assert not [
            r
            for r in seen
            if r.kind == run_control_pb2.REPLY_KIND_ACK and r.reply_to_message_id == m1.message_id
        ]

        # canvas: puts are refused; voice notes keep a hash reference only.
        await asyncio.to_thread(rollback, mesh, "canvas")
        canvas = canvas_pb2_grpc.CanvasStub(mesh.channel())
        with pytest.raises(grpc.RpcError) as ei:
            canvas.PutArtifact(
                canvas_pb2.PutArtifactRequest(name="x/y", content_type="text/plain", content=b"x"),
                metadata=mesh.md("operator"),
                timeout=10,
            )
        assert as_call(ei.value).code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "canvas" in (as_call(ei.value).details() or "")
        gated = await asyncio.to_thread(
            lambda: poll(lambda: not node.gates.canvas or None, what="canvas gate pushed")
        )
        assert gated

        # voice: voice notes refused at the gateway; the speech channel gets text.
        await asyncio.to_thread(rollback, mesh, "voice")
        with pytest.raises(grpc.RpcError) as ei:
            mesh.send("cli:v", "", "rb-v-1", audio=common_pb2.Audio(content=silent_wav()))
        info, _ = status_details(ei.value)
        assert info is not None and info.reason == "AUDIO_DISABLED"
        spoken = mesh.send("voice-demo:1", "say it", "rb-v-2", channel="voice-demo")
        got = await asyncio.to_thread(mesh.wait_replies, final_for(spoken.run_id))
        final = next(r for r in got if r.kind == FINAL and r.run_id == spoken.run_id)
        assert final.delivery == run_control_pb2.DELIVERY_MODE_TEXT

        # nodes: the connected node is disconnected live.
        await asyncio.to_thread(rollback, mesh, "nodes")
        t0 = time.monotonic()
        for _ in range(int(FLIP_BOUND / 0.02)):
            if not node.registered.is_set():
                break
            await asyncio.sleep(0.02)
        assert not node.registered.is_set(), "node still registered after rollback nodes"
        listed = nodes.ListNodes(nodes_pb2.ListNodesRequest(), metadata=mesh.md("operator"), timeout=10)
        assert not [
            n for n in listed.nodes if n.node_id == "desk-rb" and n.status == nodes_pb2.NODE_STATUS_ONLINE
        ]
    finally:
        await node.stop()
        await asyncio.wait_for(task, 10)
