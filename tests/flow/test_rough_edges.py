"""Rough edges of the run, reply and config surface (issue 18), through the gateway of a real mesh:
"from now" starts, one event id everywhere, user messages labelled ORIGIN_USER, bulk ExplainConfig,
and a closed pipe ending a `flynn` command quietly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import grpc
from flynn.v1 import (
    common_pb2,
    config_pb2,
    gateway_pb2,
    reactions_pb2,
    reactions_pb2_grpc,
    run_control_pb2,
    run_control_pb2_grpc,
)

from tests.support.flow import FlowMesh, poll
from tests.support.mesh import ROOT, as_call

T = TypeVar("T")


def _first(call: grpc.Call) -> object:
    return next(iter(call))  # type: ignore[call-overload]


def _read_until(stream: Iterator[T], last: Callable[[T], bool]) -> list[T]:
    """The items of `stream` up to and including the first for which `last` holds."""
    out: list[T] = []
    for item in stream:
        out.append(item)
        if last(item):
            break
    return out


def test_from_now_streams_skip_history_and_say_their_cursor(mesh: FlowMesh) -> None:
    mesh.send("edges:history", "an old message", key="edges-old-1")
    history = mesh.wait_replies(
        lambda rs: any(
            r.session_key == "edges:history" and r.kind == run_control_pb2.REPLY_KIND_FINAL for r in rs
        )
    )
    rc = run_control_pb2_grpc.RunControlStub(mesh.channel())
    op = mesh.md("operator")

    events = rc.WatchRunEvents(
        run_control_pb2.WatchRunEventsRequest(from_now=True, exclude_output=True), metadata=op, timeout=30
    )
    replies = mesh.gw().StreamReplies(
        gateway_pb2.GatewayStreamRepliesRequest(from_now=True), metadata=mesh.md(), timeout=30
    )
    try:
        ev_iter, rep_iter = iter(events), iter(replies)
        start_ev = next(ev_iter)
        start_rep = next(rep_iter)
        # The first answer is the start cursor only: the durable end of the log, not 0.
        assert not start_ev.HasField("event") and start_ev.start_after_seq > 0
        assert not start_rep.HasField("reply") and start_rep.start_after_cursor > 0
        sent = mesh.send("edges:now", "hello from now", key="edges-now-1")
        # Everything delivered was committed after the call (a history run may still be finishing);
        # nothing of the history before it comes.
        seen = [i.event for i in _read_until(ev_iter, lambda i: i.event.session_key == "edges:now")]
        assert all(e.global_seq > start_ev.start_after_seq for e in seen), seen
        ev = seen[-1]
        assert ev.type == run_control_pb2.RUN_EVENT_TYPE_MESSAGE_RECEIVED
        assert ev.message_id == sent.message_id
        # A user's message is labelled as one.
        assert ev.causation.origin == common_pb2.ORIGIN_USER
        got = [i.reply for i in _read_until(rep_iter, lambda i: i.reply.session_key == "edges:now")]
        assert all(r.cursor > start_rep.start_after_cursor for r in got), got
        assert not {r.reply_id for r in got} & {r.reply_id for r in history}
    finally:
        events.cancel()  # type: ignore[attr-defined]
        replies.cancel()  # type: ignore[attr-defined]

    # The returned cursor is a real one: resuming after it replays exactly what came since.
    again = rc.WatchRunEvents(
        run_control_pb2.WatchRunEventsRequest(after_seq=start_ev.start_after_seq, exclude_output=True),
        metadata=op,
        timeout=30,
    )
    try:
        assert next(iter(again)).event.global_seq == seen[0].global_seq
    finally:
        again.cancel()  # type: ignore[attr-defined]

    # from_now with a cursor is a contradiction: INVALID_ARGUMENT naming the field.
    bad = rc.WatchRunEvents(
        run_control_pb2.WatchRunEventsRequest(from_now=True, after_seq=3), metadata=op, timeout=10
    )
    try:
        next(iter(bad))
        raise AssertionError("accepted from_now with after_seq")
    except grpc.RpcError as err:
        assert as_call(err).code() == grpc.StatusCode.INVALID_ARGUMENT

    # One event id everywhere: ListTraces takes the id the RunEvent carries (and the old form).
    reactions = reactions_pb2_grpc.ReactionsStub(mesh.channel())

    def traces(event_id: str) -> list[reactions_pb2.ReactionTrace]:
        return list(
            reactions.ListTraces(
                reactions_pb2.ListTracesRequest(event_id=event_id), metadata=op, timeout=10
            ).traces
        )

    by_run_event_id = poll(lambda: traces(ev.event_id), what=f"traces of {ev.event_id}")
    assert ev.event_id == f"evt_{ev.global_seq}"
    assert any(t.rule_id == "ack-received" and t.matched for t in by_run_event_id)
    assert [t.trace_id for t in traces(f"run:{ev.global_seq}")] == [t.trace_id for t in by_run_event_id]


def test_explain_config_answers_many_sessions_in_one_call(mesh: FlowMesh, tmp_path: Path) -> None:
    mesh.update({"tts.enabled": False, "tts.rollout": {"basis_points": 3000}}, reason="edges: a rollout")
    sessions = [f"tg:{i}" for i in range(2000)]
    resp = mesh.config().ExplainConfig(
        config_pb2.ExplainConfigRequest(key="tts.enabled", channel="voice-demo", session_keys=sessions),
        metadata=mesh.md("operator"),
        timeout=30,
    )
    assert [e.session_key for e in resp.sessions] == sessions
    inside = [e.session_key for e in resp.sessions if e.source == config_pb2.VALUE_SOURCE_ROLLOUT]
    assert 0 < len(inside) < len(sessions)
    # Each answer is exactly what the one-session form says.
    for e in resp.sessions[:: len(sessions) // 20]:
        one = mesh.config().ExplainConfig(
            config_pb2.ExplainConfigRequest(
                key="tts.enabled", channel="voice-demo", session_key=e.session_key
            ),
            metadata=mesh.md("operator"),
            timeout=10,
        )
        assert (one.value, one.source, one.bucket) == (e.value, e.source, e.bucket)
        assert one.session_key == e.session_key

    # The CLI: one call, one row per session.
    listing = tmp_path / "sessions.txt"
    listing.write_text("\n".join(sessions) + "\n")
    out = mesh.flynn(
        "config",
        "explain",
        "tts.enabled",
        "--channel",
        "voice-demo",
        "--sessions-file",
        str(listing),
        "--json",
    )
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["session"] for r in rows] == sessions
    assert sorted(r["session"] for r in rows if r["source"] == "rollout") == sorted(inside)

    # Too many sessions: INVALID_ARGUMENT naming the field.
    try:
        mesh.config().ExplainConfig(
            config_pb2.ExplainConfigRequest(key="tts.enabled", session_keys=["s"] * 5001),
            metadata=mesh.md("operator"),
            timeout=10,
        )
        raise AssertionError("5001 sessions accepted")
    except grpc.RpcError as err:
        assert as_call(err).code() == grpc.StatusCode.INVALID_ARGUMENT

    # A closed pipe (`| head`) ends any flynn command quietly: no traceback, SIGPIPE's exit status.
    env = dict(
        os.environ,
        FLYNN_ADDR=mesh.gateway,
        FLYNN_TOKEN=mesh.tokens.operator,
        PYTHONPATH=f"{ROOT}:{ROOT / 'gen'}",
    )
    flynn = f"{sys.executable} -m flynn_cli.main"
    for cmd in (
        f"{flynn} config explain tts.enabled --sessions-file {listing} --json | head -n 1",
        f"{flynn} gates check --window 0 --json | head -c 1",
    ):
        run = subprocess.run(
            ["bash", "-o", "pipefail", "-c", cmd],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
            cwd=ROOT,
        )
        assert "Traceback" not in run.stderr and "BrokenPipeError" not in run.stderr, run.stderr
        assert run.stdout, cmd
        assert run.returncode in (0, 1, 3, 141), (cmd, run.returncode, run.stderr)
