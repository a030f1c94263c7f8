"""One trace per message across real processes, exported over OTLP/gRPC to a real receiver.

The whole mesh (config, queue, reactions, nodes, voice, gateway) and the example external agent run as
their own processes with OTEL_TRACES_EXPORTER=otlp pointed at tests/support/otlp.py (opentelemetry
proto's TraceService served by grpc in this test process). The test itself is a channel: it sends a
voice note on the spoken channel `voice-demo` through the gateway, once with a `traceparent` of its
own (exported by an OpenTelemetry SDK here, so the channel is a process of the trace too) and once
without one (the gateway starts the trace).
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from flynn.v1 import (
    common_pb2,
    config_pb2,
    gateway_pb2,
    nodes_pb2,
    nodes_pb2_grpc,
    run_control_pb2,
    run_control_pb2_grpc,
)

from tests.support.flow import FLOW_SEED, FlowMesh, poll
from tests.support.mesh import ROOT, ServiceProcess, free_port, make_tokens
from tests.support.otlp import OtlpReceiver, Span, otel_env

FINAL = run_control_pb2.REPLY_KIND_FINAL
CHANNEL = "voice-demo"  # spoken replies (FLOW_SEED's tts.enabled_channels)
AGENT_CHUNKS, AGENT_INTERVAL = 3, 0.4  # ~0.8 s per run: time to cancel or kill one mid-run


class Traced:
    def __init__(self, mesh: FlowMesh, receiver: OtlpReceiver, agent: ServiceProcess) -> None:
        self.mesh = mesh
        self.receiver = receiver
        self.agent = agent

    def spans_where(self, pred: Callable[[Span], bool]) -> list[Span]:
        return [s for s in self.receiver.spans() if pred(s)]

    def trace(self, trace_id: str) -> list[Span]:
        return self.spans_where(lambda s: s.trace_id == trace_id)

    def wait_trace(self, trace_id: str, names: set[str], timeout: float = 30.0) -> list[Span]:
        """The spans of `trace_id` once every name in `names` arrived (and a moment for stragglers)."""

        def complete() -> list[Span] | None:
            got = self.trace(trace_id)
            return got if names <= {s.name for s in got} else None

        try:
            poll(complete, timeout=timeout, interval=0.1, what=f"spans {sorted(names)}")
        except TimeoutError:
            have = sorted({s.name for s in self.trace(trace_id)})
            raise AssertionError(f"trace {trace_id} lacks {sorted(names - set(have))}; has {have}") from None
        time.sleep(0.6)  # two export intervals: spans ended together with the last awaited one
        return self.trace(trace_id)

    def one(self, pred: Callable[[Span], bool], what: str, timeout: float = 30.0) -> Span:
        found = poll(lambda: self.spans_where(pred), timeout=timeout, interval=0.1, what=what)
        return found[0]


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Traced]:
    root = tmp_path_factory.mktemp("traces")
    tokens = make_tokens(root)
    receiver = OtlpReceiver().start()
    env = otel_env(receiver, delay_ms=100)
    agent = ServiceProcess(
        "agent",
        "examples.external_agent",
        root / "agent",
        tokens,
        port=free_port(),
        extra=["--agent-chunks", str(AGENT_CHUNKS), "--agent-interval", str(AGENT_INTERVAL)],
        env=env,
    )
    seed = copy.deepcopy(FLOW_SEED)
    seed["server"]["agent"]["address"] = f"127.0.0.1:{agent.port}"
    mesh = FlowMesh(root, tokens, seed=seed, env=env)
    try:
        agent.start(timeout=60)
        mesh.start()
        yield Traced(mesh, receiver, agent)
    finally:
        mesh.stop()
        agent.stop()
        receiver.stop()


def spoken_wav(text: str, tmp: Path) -> bytes:
    out = tmp / "note.wav"
    subprocess.run(["espeak-ng", "-s", "140", "-w", str(out), text], check=True, timeout=30)
    return out.read_bytes()


def final_for(run_id: str) -> Callable[[list[run_control_pb2.Reply]], bool]:
    return lambda rs: any(r.kind == FINAL and r.run_id == run_id for r in rs)


def run_of(t: Traced, message_id: str) -> str:
    """The run a message went into (collect mode answers without a run id)."""

    def holds(s: Span) -> bool:
        a = s.attributes
        return s.name == "flynn.run.running" and message_id in (
            a.get("flynn.run.message_ids") or [a.get("flynn.message.id")]
        )

    s = t.one(holds, f"the run of {message_id}")
    return str(s.attributes["flynn.run.id"])


def check_one_trace(spans: list[Span], root_parent: str = "") -> None:
    """Every span's parent is in the trace; exactly one span has a parent outside it (`root_parent`)."""
    ids = {s.span_id for s in spans}
    roots = [s for s in spans if s.parent_span_id not in ids]
    assert len(roots) == 1, [(r.service, r.name, r.parent_span_id) for r in roots]
    assert roots[0].parent_span_id == root_parent, (roots[0].name, roots[0].parent_span_id)


def send_voice_note(
    t: Traced, tmp: Path, session: str, key: str, marker: str, md: tuple[tuple[str, str], ...] = ()
) -> gateway_pb2.SendMessageResponse:
    audio = spoken_wav("hello world", tmp)
    req = gateway_pb2.SendMessageRequest(
        channel=CHANNEL,
        session_key=session,
        sender="tester",
        text=marker,
        idempotency_key=key,
        audio=common_pb2.Audio(encoding=common_pb2.AUDIO_ENCODING_LINEAR16, content=audio),
    )
    resp: gateway_pb2.SendMessageResponse = t.mesh.gw().SendMessage(
        req, metadata=(*t.mesh.md(), *md), timeout=60
    )
    return resp


# Spans a spoken message's trace must hold, and the services they come from.
MESSAGE_SPANS = {
    "flynn.v1.Gateway/SendMessage",
    "flynn.v1.Voice/Transcribe",
    "flynn.v1.Canvas/PutArtifact",
    "flynn.v1.RunControl/SubmitMessage",
    "flynn.run.collected",
    "flynn.run.running",
    "flynn.v1.Agent/Run",
    "flynn.reply.speech",
    "flynn.v1.Voice/Synthesize",
    "flynn.reply.delivered",
    "flynn.reaction.action",
    "flynn.v1.RunControl/PostReply",
}


def test_a_voice_message_without_traceparent_is_one_trace_started_by_the_gateway(
    traced: Traced, tmp_path: Path
) -> None:
    t = traced
    marker = f"zq{uuid.uuid4().hex[:10]}"
    sent = send_voice_note(t, tmp_path, "voice-demo:trace-1", "trace-1", marker)
    gw_span = t.one(
        lambda s: (
            s.name == "flynn.v1.Gateway/SendMessage"
            and s.attributes.get("flynn.message.id") == sent.message_id
        ),
        "the gateway's SendMessage span",
    )
    run_id = run_of(t, sent.message_id)
    replies = t.mesh.wait_replies(final_for(run_id), channels=(CHANNEL,), timeout=60)
    final = next(r for r in replies if r.kind == FINAL and r.run_id == run_id)
    assert final.delivery == run_control_pb2.DELIVERY_MODE_AUDIO, final.tts_fallback_reason

    spans = t.wait_trace(gw_span.trace_id, MESSAGE_SPANS)
    check_one_trace(spans)  # the gateway's span is the root: no parent at all
    assert gw_span.parent_span_id == ""
    assert "flynn.traceparent_from_channel" not in gw_span.attributes  # set only when true
    assert gw_span.attributes["flynn.voice_note"] is True
    services = {s.service for s in spans}
    assert {
        "flynn-gateway",
        "flynn-voice",
        "flynn-nodes",
        "flynn-queue",
        "flynn-agent",
        "flynn-reactions",
    } <= services
    assert len(services) >= 5

    # Exactly one trace: everything that names this message, its run or its session is in it.
    def about(s: Span) -> bool:
        a = s.attributes
        return (
            a.get("flynn.message.id") == sent.message_id
            or a.get("flynn.run.id") == run_id
            or a.get("flynn.session") == "voice-demo:trace-1"
        )

    assert {s.trace_id for s in t.spans_where(about)} == {gw_span.trace_id}

    # The hops: each RPC's server span is a child of a span of the calling process.
    by_id = {s.span_id: s for s in spans}

    def parent(name: str) -> Span:
        s = next(s for s in spans if s.name == name)
        return by_id[s.parent_span_id]

    assert parent("flynn.v1.RunControl/SubmitMessage").name == "flynn.v1.Gateway/SendMessage"
    assert parent("flynn.v1.Voice/Transcribe").name == "flynn.v1.Gateway/SendMessage"
    assert parent("flynn.v1.Agent/Run").name == "flynn.run.running"
    assert parent("flynn.v1.Voice/Synthesize").name == "flynn.reply.speech"
    running = next(s for s in spans if s.name == "flynn.run.running")
    assert running.attributes["flynn.queue.mode"] == "collect"
    assert running.attributes["flynn.session"] == "voice-demo:trace-1"
    assert running.attributes["flynn.run.state"] == "completed"
    final_event = [e for e in running.events if e["name"] == "flynn.run.final"]  # the final reply written
    assert len(final_event) == 1 and final_event[0]["flynn.reply.id"] == final.reply_id
    delivered = [
        s for s in spans if s.name == "flynn.reply.delivered" and s.attributes["flynn.reply.kind"] == "final"
    ]
    assert delivered and delivered[0].attributes["flynn.reply.delivery"] == "audio"

    # A reaction's action is linked to the message that caused it (and sits in its trace).
    submit = next(s for s in spans if s.name == "flynn.v1.RunControl/SubmitMessage")
    action = next(s for s in spans if s.name == "flynn.reaction.action")
    assert action.attributes["flynn.reaction.rule_id"] == "ack-received"
    assert action.attributes["flynn.message.id"] == sent.message_id
    assert action.parent_span_id == submit.span_id
    assert any(link.span_id == submit.span_id and link.trace_id == submit.trace_id for link in action.links)
    assert parent("flynn.v1.RunControl/PostReply").span_id == action.span_id

    # Content capture is off: the message text is in no span or attribute of any process.
    leaks = [
        (s.service, s.name) for s in t.receiver.spans() if marker in s.text() or sent.transcript in s.text()
    ]
    assert not leaks, leaks

    # JSON logs and audit records carry the trace.
    audit = t.mesh.root / "queue" / "audit" / "queue.jsonl"
    records = [json.loads(line) for line in audit.read_text().splitlines()]
    mine = [r for r in records if r.get("run_id") == run_id]
    assert mine and all(
        r.get("trace_id") == gw_span.trace_id and len(r.get("span_id", "")) == 16 for r in mine
    )
    log = t.mesh.procs["queue"].log_path
    assert log is not None
    logged = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    assert any(
        r.get("trace_id") == gw_span.trace_id and r.get("audit", {}).get("run_id") == run_id for r in logged
    )


def test_a_channel_traceparent_puts_the_whole_message_under_the_channel_trace(
    traced: Traced, tmp_path: Path
) -> None:
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    t = traced
    provider = TracerProvider(resource=Resource.create({"service.name": "test-channel"}))
    provider.add_span_processor(
        SimpleSpanProcessor(OTLPSpanExporter(endpoint=t.receiver.endpoint, insecure=True))
    )
    tracer = provider.get_tracer("test-channel")
    carrier: dict[str, str] = {}
    with tracer.start_as_current_span("channel.voice_note") as channel_span:
        TraceContextTextMapPropagator().inject(carrier)
        sent = send_voice_note(
            t, tmp_path, "voice-demo:trace-2", "trace-2", "channel-made", tuple(carrier.items())
        )
    provider.shutdown()
    trace_id = format(channel_span.get_span_context().trace_id, "032x")
    run_id = run_of(t, sent.message_id)
    t.mesh.wait_replies(final_for(run_id), channels=(CHANNEL,), timeout=60)
    spans = t.wait_trace(trace_id, MESSAGE_SPANS | {"channel.voice_note"})
    check_one_trace(spans)  # the channel's own span is the root now
    gw = next(s for s in spans if s.name == "flynn.v1.Gateway/SendMessage")
    assert gw.parent_span_id == format(channel_span.get_span_context().span_id, "016x")
    assert gw.attributes["flynn.traceparent_from_channel"] is True
    assert len({s.service for s in spans}) >= 7  # the channel, gateway, voice, nodes, queue, agent, reactions


def test_a_cancel_is_in_the_trace_of_the_run_it_cancelled_with_exemplars(traced: Traced) -> None:
    t = traced
    sent = t.mesh.send(
        "cli:trace-cancel", "please stop me", "trace-cancel", mode_override=config_pb2.QUEUE_MODE_FOLLOWUP
    )
    assert sent.disposition == run_control_pb2.DISPOSITION_STARTED
    waiting = t.mesh.send(
        "cli:trace-cancel", "then me", "trace-cancel-2", mode_override=config_pb2.QUEUE_MODE_FOLLOWUP
    )
    assert waiting.disposition == run_control_pb2.DISPOSITION_QUEUED
    resp = t.mesh.gw().CancelRun(
        gateway_pb2.GatewayCancelRunRequest(run_id=sent.run_id, reason="user_stop"),
        metadata=t.mesh.md(),
        timeout=10,
    )
    assert resp.outcome == run_control_pb2.CANCEL_OUTCOME_CANCEL_REQUESTED
    submit = t.one(
        lambda s: (
            s.name == "flynn.v1.RunControl/SubmitMessage" and s.attributes.get("flynn.run.id") == sent.run_id
        ),
        "the SubmitMessage span",
    )
    spans = t.wait_trace(
        submit.trace_id, {"flynn.run.cancel_requested", "flynn.run.cancelled", "flynn.run.running"}
    )
    check_one_trace(spans)
    requested = next(s for s in spans if s.name == "flynn.run.cancel_requested")
    cancelled = next(s for s in spans if s.name == "flynn.run.cancelled")
    running = next(s for s in spans if s.name == "flynn.run.running")
    assert requested.attributes["flynn.run.id"] == cancelled.attributes["flynn.run.id"] == sent.run_id
    assert requested.attributes["flynn.reason"] == "user_stop"
    assert requested.parent_span_id == cancelled.parent_span_id == running.span_id
    assert running.attributes["flynn.run.state"] == "cancelled"
    # The CancelRun call had no traceparent (a trace of its own): the cancel links to it.
    cancel_rpc = t.one(
        lambda s: (
            s.name == "flynn.v1.RunControl/CancelRun" and s.attributes.get("flynn.run.id") == sent.run_id
        ),
        "the CancelRun span",
    )
    assert cancel_rpc.trace_id != submit.trace_id
    assert any(link.span_id == cancel_rpc.span_id for link in requested.links)

    # Exemplars: /metrics in OpenMetrics names the traces of the cancel-latency and run-duration buckets.
    port = t.mesh.metrics_ports["queue"]
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.headers["Content-Type"].startswith("application/openmetrics-text")
        body = r.read().decode()
    exemplars = re.findall(r"^(flynn_\w+)_bucket\{[^}]*\} \S+ # \{([^}]*)\}", body, re.M)
    assert any(m == "flynn_cancel_to_cancelled_seconds" and submit.trace_id in ex for m, ex in exemplars), (
        exemplars
    )
    assert any(m == "flynn_cancel_to_ack_seconds" and cancel_rpc.trace_id in ex for m, ex in exemplars), (
        exemplars
    )
    assert any(m == "flynn_submit_to_final_seconds" and 'trace_id="' in ex for m, ex in exemplars), exemplars

    # The followup that waited behind the cancelled run: its queued phase, in its own message's trace.
    queued = t.one(
        lambda s: s.name == "flynn.run.queued" and s.attributes.get("flynn.run.id") == waiting.run_id,
        "the queued span of the waiting run",
    )
    second = t.one(
        lambda s: (
            s.name == "flynn.v1.RunControl/SubmitMessage"
            and s.attributes.get("flynn.run.id") == waiting.run_id
        ),
        "the second SubmitMessage span",
    )
    assert queued.trace_id == second.trace_id != submit.trace_id
    assert queued.attributes["flynn.queue.mode"] == "followup" and queued.end_ns > queued.start_ns


def test_phases_after_a_restart_join_the_message_trace(traced: Traced) -> None:
    t = traced
    sent = t.mesh.send(
        "cli:trace-restart", "survive me", "trace-restart", mode_override=config_pb2.QUEUE_MODE_FOLLOWUP
    )
    assert sent.disposition == run_control_pb2.DISPOSITION_STARTED
    submit = t.one(
        lambda s: (
            s.name == "flynn.v1.RunControl/SubmitMessage" and s.attributes.get("flynn.run.id") == sent.run_id
        ),
        "the SubmitMessage span",
    )
    t.mesh.kill9("queue")  # mid-run (a run takes ~0.8 s): the open running span dies with the process
    t.mesh.start_again("queue")
    # restart_policy fail: the run ends in error at the restart, recorded in the message's trace.
    after = t.one(
        lambda s: s.name == "flynn.run.running" and s.attributes.get("flynn.run.id") == sent.run_id,
        "the run's running span, recorded after the restart",
    )
    assert after.trace_id == submit.trace_id and after.parent_span_id == submit.span_id
    assert after.attributes["flynn.run.state"] == "error" and after.attributes.get(
        "flynn.run.recorded_after_restart"
    )


def test_invoke_node_carries_the_trace_down_the_node_stream(traced: Traced, tmp_path: Path) -> None:
    t = traced
    op = t.mesh.md("operator")
    issued = nodes_pb2_grpc.NodesStub(t.mesh.channel()).IssueNodeToken(
        nodes_pb2.IssueNodeTokenRequest(node_id="trace-desk", role="desktop"), metadata=op, timeout=10
    )
    env = dict(os.environ, PYTHONPATH=f"{ROOT}:{ROOT / 'gen'}", **otel_env(t.receiver, delay_ms=100))
    log = (tmp_path / "node.log").open("wb")
    node = subprocess.Popen(
        [sys.executable, "-m", "examples.companion_node", "--addr", t.mesh.gateway, "--node-id", "trace-desk",
         "--token", issued.token, "--role", "desktop"],
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
    )  # fmt: skip
    try:

        def invoke() -> nodes_pb2.InvokeResult | None:
            call = nodes_pb2_grpc.NodesStub(t.mesh.channel()).InvokeNode(
                nodes_pb2.InvokeNodeRequest(node_id="trace-desk", command="device.info", timeout_ms=5000),
                metadata=op,
                timeout=10,
            )
            for msg in call:
                if msg.WhichOneof("message") == "result":
                    return msg.result
            return None

        result = poll(invoke, timeout=30, interval=0.2, what="an answered invoke")
        assert result.ok, result.error
        on_node = t.one(
            lambda s: (
                s.name == "flynn.node.invoke" and s.attributes.get("flynn.invoke.id") == result.invoke_id
            ),
            "the node's invoke span",
        )
    finally:
        node.terminate()
        node.wait(15)
        log.close()
    spans = t.wait_trace(on_node.trace_id, {"flynn.v1.Nodes/InvokeNode", "flynn.node.invoke"})
    by_id = {s.span_id: s for s in spans}
    server = by_id[on_node.parent_span_id]  # the trace crossed the node's stream in the invoke message
    assert (server.name, server.service, on_node.service) == (
        "flynn.v1.Nodes/InvokeNode",
        "flynn-nodes",
        "flynn-companion-node",
    )
    assert by_id[server.parent_span_id].service == "flynn-gateway"  # the gateway's hop, root of the trace
    check_one_trace(spans)


def test_content_capture_on_records_the_text(traced: Traced) -> None:
    t = traced
    for name in ("queue", "gateway"):  # run control records the message, the gateway the delivery
        proc = t.mesh.procs[name]
        proc.env = {**proc.env, "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT": "true"}
        t.mesh.restart(name)
    marker = f"cap{uuid.uuid4().hex[:10]}"
    sent = t.mesh.send(
        "cli:trace-capture", marker, "trace-capture", mode_override=config_pb2.QUEUE_MODE_FOLLOWUP
    )
    t.mesh.wait_replies(final_for(sent.run_id), channels=("cli",), timeout=60)
    submit = t.one(
        lambda s: (
            s.name == "flynn.v1.RunControl/SubmitMessage" and s.attributes.get("flynn.run.id") == sent.run_id
        ),
        "the SubmitMessage span",
    )
    assert submit.attributes["flynn.message.text"] == marker
    running = t.one(
        lambda s: s.name == "flynn.run.running" and s.attributes.get("flynn.run.id") == sent.run_id,
        "the running span",
    )
    final = next(e for e in running.events if e["name"] == "flynn.run.final")
    assert marker in final["flynn.reply.text"]
    delivered = t.one(
        lambda s: s.name == "flynn.reply.delivered" and s.attributes.get("flynn.run.id") == sent.run_id,
        "the delivered span",
    )
    assert marker in delivered.attributes["flynn.reply.text"]


def test_a_tts_fallback_is_a_span_of_the_message_trace(traced: Traced) -> None:
    t = traced
    t.mesh.update({"tts.deadline": "1ms"}, reason="trace test: speech cannot make it")
    try:
        sent = t.mesh.send("voice-demo:trace-fallback", "say this", "trace-fallback", channel=CHANNEL,
                           mode_override=config_pb2.QUEUE_MODE_FOLLOWUP)  # fmt: skip
        replies = t.mesh.wait_replies(final_for(sent.run_id), channels=(CHANNEL,), timeout=60)
        final = next(r for r in replies if r.kind == FINAL and r.run_id == sent.run_id)
        assert final.delivery == run_control_pb2.DELIVERY_MODE_TEXT_AFTER_FALLBACK
        submit = t.one(
            lambda s: (
                s.name == "flynn.v1.RunControl/SubmitMessage"
                and s.attributes.get("flynn.run.id") == sent.run_id
            ),
            "the SubmitMessage span",
        )
        spans = t.wait_trace(
            submit.trace_id, {"flynn.reply.speech", "flynn.reply.tts_fallback", "flynn.reply.delivered"}
        )
        by_id = {s.span_id: s for s in spans}
        fallback = next(s for s in spans if s.name == "flynn.reply.tts_fallback")
        assert by_id[fallback.parent_span_id].name == "flynn.reply.speech"
        assert fallback.attributes["flynn.tts.fallback_reason"] == final.tts_fallback_reason
        delivered = next(
            s
            for s in spans
            if s.name == "flynn.reply.delivered" and s.attributes.get("flynn.run.id") == sent.run_id
        )
        assert delivered.attributes["flynn.reply.delivery"] == "text_after_fallback"
    finally:
        t.mesh.update({"tts.deadline": "10s"}, reason="trace test: speech back")


def test_an_unsampled_channel_traceparent_records_nothing_in_any_process(traced: Traced) -> None:
    """A channel's traceparent with the sampled flag off: no process records a span of that message
    (the decision travels with it: the gateway, run control, the agent and reactions follow it), while
    a sampled message sent after it is recorded by the same processes."""
    t = traced
    unsampled_tid, sampled_tid = uuid.uuid4().hex, uuid.uuid4().hex

    def send(text: str, trace_id: str, flags: str) -> gateway_pb2.SendMessageResponse:
        sent = t.mesh.gw().SendMessage(
            gateway_pb2.SendMessageRequest(
                channel="cli", session_key="cli:trace-unsampled", sender="tester", text=text,
                idempotency_key=f"trace-{text}", mode_override=config_pb2.QUEUE_MODE_FOLLOWUP,
            ),
            metadata=(*t.mesh.md(), ("traceparent", f"00-{trace_id}-{uuid.uuid4().hex[:16]}-{flags}")),
            timeout=30,
        )  # fmt: skip
        t.mesh.wait_replies(final_for(sent.run_id), channels=("cli",), timeout=60)
        return sent

    quiet = send("quiet", unsampled_tid, "00")
    send("loud", sampled_tid, "01")
    names = {
        "flynn.v1.Gateway/SendMessage",
        "flynn.v1.RunControl/SubmitMessage",
        "flynn.run.running",
        "flynn.v1.Agent/Run",
        "flynn.reply.delivered",
    }
    recorded = t.wait_trace(sampled_tid, names)
    assert {s.service for s in recorded} >= {"flynn-gateway", "flynn-queue"}
    # Every process exported the later message's spans: none of the earlier one's exist anywhere.
    assert t.trace(unsampled_tid) == []
    ids = {quiet.message_id, quiet.run_id}
    leaked = t.spans_where(lambda s: bool(ids & {str(v) for v in s.attributes.values()}))
    assert leaked == [], [(s.service, s.name, s.trace_id) for s in leaked]


def test_a_delivery_is_recorded_where_the_reply_leaves_the_mesh(traced: Traced) -> None:
    """flynn.reply.delivered: the gateway records it for a channel's stream (run control, asked by the
    gateway's header, does not record that stream's again); run control records it for a stream
    opened on it directly."""
    t = traced
    sent = t.mesh.send(
        "cli:trace-delivery", "deliver me", "trace-delivery", mode_override=config_pb2.QUEUE_MODE_FOLLOWUP
    )
    t.mesh.wait_replies(final_for(sent.run_id), channels=("cli",), timeout=60)  # through the gateway

    def delivered(service: str) -> list[Span]:
        return t.spans_where(
            lambda s: (
                s.name == "flynn.reply.delivered"
                and s.attributes.get("flynn.run.id") == sent.run_id
                and s.service == service
            )
        )

    poll(lambda: delivered("flynn-gateway"), timeout=30, interval=0.1, what="the gateway's delivered span")
    with grpc.insecure_channel(t.mesh.procs["queue"].address) as ch:  # straight to run control
        call = run_control_pb2_grpc.RunControlStub(ch).StreamReplies(
            run_control_pb2.StreamRepliesRequest(channels=["cli"]), metadata=t.mesh.md("operator"), timeout=30
        )
        for msg in call:
            if msg.reply.run_id == sent.run_id and msg.reply.kind == FINAL:
                call.cancel()  # type: ignore[no-untyped-call]
                break
    poll(lambda: delivered("flynn-queue"), timeout=30, interval=0.1, what="run control's delivered span")
    time.sleep(0.5)  # the exports of both processes (100 ms batches) have arrived
    # One span per stream that sent the final: the gateway's for the channel, run control's for the
    # direct stream; none from run control for the gateway's stream.
    assert len(delivered("flynn-queue")) == 1
    finals = delivered("flynn-gateway")
    assert finals and {s.attributes["flynn.reply.kind"] for s in finals} == {"final"}
    assert {s.trace_id for s in finals + delivered("flynn-queue")} == {finals[0].trace_id}
