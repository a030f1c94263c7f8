"""Channel in, reply out, through the gateway only: text, voice notes, resumable replies, /stop,
system.metrics with real grpcurl, and the chat channel example."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import wave
from pathlib import Path

import grpc
import pytest
from flynn.v1 import canvas_pb2, canvas_pb2_grpc, common_pb2, gateway_pb2, run_control_pb2

from tests.support.flow import FlowMesh, final_for, poll
from tests.support.mesh import ROOT, as_call, grpcurl
from tests.support.voice import status_details

FINAL = run_control_pb2.REPLY_KIND_FINAL


def spoken_wav(text: str, tmp: Path) -> bytes:
    out = tmp / "note.wav"
    subprocess.run(["espeak-ng", "-s", "140", "-w", str(out), text], check=True, timeout=30)
    return out.read_bytes()


def silent_wav(seconds: float = 1.0) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(b"\x00\x00" * int(16000 * seconds))
    return buf.getvalue()


def test_text_message_ack_reaction_and_final_reply(mesh: FlowMesh) -> None:
    sent = mesh.send("cli:flow-1", "hello there", "flow-1")
    assert sent.disposition == run_control_pb2.DISPOSITION_STARTED
    replies = mesh.wait_replies(
        lambda rs: (
            final_for(sent.run_id)(rs)
            and any(
                r.kind == run_control_pb2.REPLY_KIND_ACK and r.reply_to_message_id == sent.message_id
                for r in rs
            )
        )
    )
    final = next(r for r in replies if r.kind == FINAL and r.run_id == sent.run_id)
    assert "hello there" in final.text and final.delivery == run_control_pb2.DELIVERY_MODE_TEXT
    ack = next(
        r
        for r in replies
        if r.kind == run_control_pb2.REPLY_KIND_ACK and r.reply_to_message_id == sent.message_id
    )
    assert ack.emoji == "👀"
    # The same idempotency key again is a duplicate, never a second run.
    again = mesh.send("cli:flow-1", "hello there", "flow-1")
    assert again.disposition == run_control_pb2.DISPOSITION_DUPLICATE and again.run_id == sent.run_id


def test_reply_stream_resumes_after_a_cursor_with_stable_ids(mesh: FlowMesh) -> None:
    a = mesh.send("cli:flow-2", "first", "flow-2a")
    first = mesh.wait_replies(final_for(a.run_id))
    cursor = max(r.cursor for r in first)
    b = mesh.send("cli:flow-2", "second", "flow-2b")
    later = mesh.wait_replies(final_for(b.run_id), after=cursor)
    assert all(r.cursor > cursor for r in later)
    assert not {r.reply_id for r in later} & {r.reply_id for r in first}
    # Reading again from the start gives the same ids for the same cursors (an adapter can deduplicate).
    again = mesh.wait_replies(final_for(b.run_id))
    by_cursor = {r.cursor: r.reply_id for r in again}
    assert all(by_cursor[r.cursor] == r.reply_id for r in first + later)
    # The channels filter.
    other = mesh.send("cli:flow-2x", "elsewhere", "flow-2x", channel="other")
    only_other = mesh.wait_replies(final_for(other.run_id), channels=("other",))
    assert {r.channel for r in only_other} == {"other"}


def test_voice_note_is_transcribed_and_its_audio_kept_in_the_canvas(mesh: FlowMesh, tmp_path: Path) -> None:
    audio = spoken_wav("hello world", tmp_path)
    sent = mesh.send(
        "cli:voice-1",
        "",
        "voice-1",
        audio=common_pb2.Audio(encoding=common_pb2.AUDIO_ENCODING_LINEAR16, content=audio),
    )
    assert sent.transcript.strip()
    replies = mesh.wait_replies(final_for(sent.run_id), timeout=60)
    final = next(r for r in replies if r.kind == FINAL and r.run_id == sent.run_id)
    assert sent.transcript.strip() in final.text
    canvas = canvas_pb2_grpc.CanvasStub(mesh.channel())
    art = canvas.GetArtifact(
        canvas_pb2.GetArtifactRequest(
            name="inbound/cli_voice-1-" + hashlib.sha256(b"cli:voice-1").hexdigest()[:12] + "/voice-1"
        ),
        metadata=mesh.md("operator"),
        timeout=10,
    ).artifact
    assert art.content == audio and art.sha256 == hashlib.sha256(audio).hexdigest()


def test_voice_note_that_cannot_be_understood_tells_the_user(mesh: FlowMesh) -> None:
    for key, content in (
        ("voice-bad-1", b"definitely not audio"),
        ("voice-bad-2", b"RIFF\x10\x00\x00\x00WAVEfmt broken header"),
    ):
        with pytest.raises(grpc.RpcError) as ei:
            mesh.send("cli:voice-bad", "", key, audio=common_pb2.Audio(content=content))
        err = ei.value
        assert as_call(err).code() != grpc.StatusCode.INTERNAL
        info, _ = status_details(err)
        assert info is not None and info.reason == "TRANSCRIPTION_FAILED", err
        notice_id = info.metadata["notice_reply_id"]
        assert notice_id
        nid: str = notice_id
        replies = mesh.wait_replies(lambda rs: any(r.reply_id == nid for r in rs))  # noqa: B023
        notice = next(r for r in replies if r.reply_id == notice_id)
        assert notice.kind == run_control_pb2.REPLY_KIND_NOTICE and "voice note" in notice.text


def test_voice_notes_refused_when_audio_disabled_and_audited(mesh: FlowMesh) -> None:
    mesh.update({"audio.enabled": False}, reason="flow test: audio off")
    try:
        with pytest.raises(grpc.RpcError) as ei:
            mesh.send("cli:voice-off", "", "voice-off-1", audio=common_pb2.Audio(content=silent_wav()))
        assert as_call(ei.value).code() == grpc.StatusCode.FAILED_PRECONDITION
        info, _ = status_details(ei.value)
        assert info is not None and info.reason == "AUDIO_DISABLED"
        audit = mesh.root / "gateway" / "audit" / "gateway.jsonl"
        lines = poll(
            lambda: [
                json.loads(line) for line in audit.read_text().splitlines() if "voice_note_refused" in line
            ],
            what=f"a voice_note_refused line in {audit}",
        )
        assert lines[-1]["session_key"] == "cli:voice-off" and lines[-1]["reason"] == "AUDIO_DISABLED"
    finally:
        mesh.update({"audio.enabled": True}, reason="flow test: audio back on")


def test_stop_cancels_the_running_run(mesh: FlowMesh) -> None:
    mesh.update({"server.agent.think_time": "5s"}, reason="flow test: slow agent")
    try:
        sent = mesh.send("cli:stop-1", "take your time", "stop-1")
        cancel = mesh.gw().CancelRun(
            gateway_pb2.GatewayCancelRunRequest(session_key="cli:stop-1", reason="user /stop"),
            metadata=mesh.md(),
            timeout=10,
        )
        assert (
            cancel.outcome == run_control_pb2.CANCEL_OUTCOME_CANCEL_REQUESTED and cancel.run_id == sent.run_id
        )
        again = mesh.gw().CancelRun(
            gateway_pb2.GatewayCancelRunRequest(run_id=sent.run_id), metadata=mesh.md(), timeout=10
        )
        assert again.outcome in (
            run_control_pb2.CANCEL_OUTCOME_ALREADY_CANCEL_REQUESTED,
            run_control_pb2.CANCEL_OUTCOME_ALREADY_CANCELLED,
        )
    finally:
        mesh.update({"server.agent.think_time": "20ms"}, reason="flow test: fast agent")


def test_system_metrics_with_grpcurl(mesh: FlowMesh) -> None:
    sent = mesh.send("cli:metrics", "count me", "metrics-1")
    mesh.wait_replies(final_for(sent.run_id))
    out = grpcurl("-d", "{}", mesh.gateway, "flynn.v1.System/GetMetrics", token=mesh.tokens.operator)
    assert out.returncode == 0, out.stderr
    m = json.loads(out.stdout)
    # grpcurl prints the proto field names.
    assert "unavailable_services" not in m, m.get("unavailable_details")
    states = {n["name"]: n.get("value", 0) for n in m["runs"]["run_states"]}  # zeros are omitted
    assert states["completed"] >= 1
    assert m["reactions"]["matches"] >= 1
    assert {r["service"] for r in m["config_revisions"]} >= {
        "queue",
        "reactions",
        "nodes",
        "voice",
        "config",
        "gateway",
    }
    assert all(int(r.get("applied_revision", 0)) >= 1 for r in m["config_revisions"])
    assert int(m["runs"]["submit_to_final"]["count"]) >= 1
    # A channel token may not read the figures; an unknown service is named.
    denied = grpcurl("-d", "{}", mesh.gateway, "flynn.v1.System/GetMetrics", token=mesh.tokens.channel)
    assert denied.returncode != 0 and "PermissionDenied" in denied.stderr
    bad = grpcurl(
        "-d",
        '{"services": ["bogus"]}',
        mesh.gateway,
        "flynn.v1.System/GetMetrics",
        token=mesh.tokens.operator,
    )
    assert bad.returncode != 0 and "services[0]" in bad.stderr


def test_chat_channel_example_sends_and_prints_the_reply(mesh: FlowMesh, tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=f"{ROOT}:{ROOT / 'gen'}")
    note = tmp_path / "note.wav"
    note.write_bytes(spoken_wav("good morning", tmp_path))
    proc = subprocess.run(
        [
            sys.executable, "-m", "examples.chat_channel",
            "--addr", mesh.gateway, "--token", mesh.tokens.channel,
            "--channel", "chat-example", "--session", "chat-example:me", "--linger", "3",
        ],
        input=f"hello from the example\n/voice {note}\n/voice {tmp_path / 'missing.wav'}\n/stop\n",
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "[sent] DISPOSITION_STARTED" in proc.stdout, proc.stdout
    assert "[reply] " in proc.stdout and "hello from the example" in proc.stdout, proc.stdout
    assert "[ack] 👀" in proc.stdout, proc.stdout
    assert "(heard: " in proc.stdout, proc.stdout  # the voice note went through transcription
    assert "[error] cannot read" in proc.stdout and "[stop] CANCEL_OUTCOME_" in proc.stdout, proc.stdout
