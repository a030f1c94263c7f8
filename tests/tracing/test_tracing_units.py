"""flynn_runtime.tracing without a mesh: off costs nothing (no OpenTelemetry import), configuration
from the OTEL_* environment, the sampled flag."""

from __future__ import annotations

import os
import subprocess
import sys

from flynn_runtime import tracing
from tests.support.mesh import ROOT

OFF_PROBE = """
import sys
from flynn_runtime import tracing, server, channels, logs, audit
import queue_svc.app, gateway.app, reactions_svc.app, nodes_svc.app
assert tracing.configure("probe") is False
assert tracing.stamp(None) is None and tracing.exemplar() is None and tracing.current_ids() is None
ch = channels.client_channel("127.0.0.1:1")  # no token, tracing off: no interceptor at all
assert not getattr(ch, "_unary_unary_interceptors", None), "an interceptor was installed"
loaded = sorted(m for m in sys.modules if m.startswith("opentelemetry"))
assert not loaded, loaded
print("ok")
"""


def _python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    clean.update(env, PYTHONPATH=f"{ROOT}:{ROOT / 'gen'}")
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=clean, cwd=ROOT, timeout=60
    )


def _traced_probe(code: str, **env: str) -> None:
    """Run `code` in a process with tracing on (an exporter that is never reached); it prints "ok"."""
    done = _python(code, OTEL_TRACES_EXPORTER="otlp", OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:9", **env)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_tracing_off_imports_no_opentelemetry_and_installs_nothing() -> None:
    out = _python(OFF_PROBE)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
    out = _python(OFF_PROBE, OTEL_TRACES_EXPORTER="none")
    assert out.returncode == 0, out.stderr


def test_only_the_otlp_exporter_turns_tracing_on() -> None:
    out = _python(
        "from flynn_runtime import tracing; print(tracing.configure('x'))", OTEL_TRACES_EXPORTER="zipkin"
    )
    assert out.stdout.strip() == "False"
    probe = (
        "from flynn_runtime import tracing; on = tracing.configure('x');"
        "print(on, tracing.CAPTURE_CONTENT, tracing._provider.resource.attributes['service.name'])"
    )
    out = _python(
        probe,
        OTEL_TRACES_EXPORTER="otlp",
        OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:9",
        OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT="true",
    )
    assert out.stdout.split() == ["True", "True", "flynn-x"], out.stderr
    out = _python(
        probe,
        OTEL_TRACES_EXPORTER="otlp",
        OTEL_SERVICE_NAME="edge-gw",
        OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:9",
    )
    assert out.stdout.split() == ["True", "False", "edge-gw"], out.stderr


def test_sampled_reads_the_flags_bit() -> None:
    tid, sid = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
    assert tracing.sampled(f"00-{tid}-{sid}-01")
    assert tracing.sampled(f"00-{tid}-{sid}-03")  # sampled, random trace id
    assert not tracing.sampled(f"00-{tid}-{sid}-00")
    assert not tracing.sampled(f"00-{tid}-{sid}-02")
    assert not tracing.sampled("") and not tracing.sampled("garbage")


EXEMPLAR_PROBE = """
from flynn_runtime import tracing
assert tracing.configure("probe")
tid, sid = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
assert tracing.exemplar(f"00-{tid}-{sid}-01") == {"trace_id": tid, "span_id": sid}
assert tracing.exemplar(f"00-{tid}-{sid}-00") is None  # unsampled
assert tracing.exemplar(f"00-{'0' * 32}-{sid}-01") is None and tracing.exemplar(f"00-{tid}-{'0' * 16}-01") is None
assert tracing.exemplar(f"00-{tid.upper()}-{sid}-01") is None and tracing.exemplar("garbage") is None
ctx = tracing.context_of(f"00-{tid}-{sid}-01")
with tracing.span("probe", parent=ctx) as s:  # of the current span when no traceparent is given
    sc = s.get_span_context()
    assert tracing.exemplar() == {"trace_id": tid, "span_id": format(sc.span_id, "016x")}
print("ok")
"""


def test_an_exemplar_names_the_traceparent_or_the_current_span() -> None:
    _traced_probe(EXEMPLAR_PROBE)


UNSAMPLED_CALLER_PROBE = """
import os
from flynn_runtime import tracing
assert tracing.configure("probe")
tid, sid = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
method = "/flynn.v1.RunControl/SubmitMessage"
span = tracing.server_span(method, [("traceparent", f"00-{tid}-{sid}-00")])
if os.environ.get("OTEL_TRACES_SAMPLER", "").startswith("parentbased_"):
    assert span is None
    assert tracing.carrier()["traceparent"] == f"00-{tid}-{sid}-00"  # the caller's decision travels on
    assert not tracing.recording() and tracing.current_ids() == (tid, sid)
else:  # a sampler that ignores the parent's flag (traceidratio at 1.0) records the call anyway
    assert span is not None and span.is_recording()
s = tracing.server_span(method, [("traceparent", f"00-{tid}-{sid}-01")])
assert s is not None and s.is_recording() and s.parent.span_id == int(sid, 16)
g = tracing.server_span(method, [("traceparent", "00-garbage-01")])  # no valid parent: a trace of its own
assert g is not None and g.is_recording() and g.parent is None
print("ok")
"""


def test_an_unsampled_caller_gets_no_server_span_and_keeps_its_decision() -> None:
    env = {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"}
    for sampler in ("parentbased_always_on", "parentbased_traceidratio", "traceidratio"):
        done = _python(
            UNSAMPLED_CALLER_PROBE, OTEL_TRACES_SAMPLER=sampler, OTEL_TRACES_SAMPLER_ARG="1.0", **env
        )
        assert done.returncode == 0 and done.stdout.strip() == "ok", (sampler, done.stderr)


CHILD_SPAN_PROBE = """
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from flynn_runtime import tracing
from flynn_runtime.recording_span import RecordingSpan, Sink
from flynn_runtime.otlp_encoding import encode_request
assert tracing.configure("probe")
memory = InMemorySpanExporter()
processor = SimpleSpanProcessor(memory)  # what SDK spans and child spans end into, read back here
tracing._provider.add_span_processor(processor)
sink = tracing._api.sink
tracing._api.sink = Sink(sink.resource, sink.scope, processor)
tid, sid = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"

root = tracing.start_span("root", server=True)  # no parent: the provider's sampler decides
assert isinstance(root, RecordingSpan) and root.is_recording() and root.parent is None
assert root.get_span_context().trace_flags == 0x03  # sampled, random trace id (as the SDK's)
with tracing.activated(root):
    child = tracing.start_span("child", attributes={"a": "x"})
assert isinstance(child, RecordingSpan) and child.is_recording()
rc, cc = root.get_span_context(), child.get_span_context()
assert cc.trace_id == rc.trace_id and cc.span_id not in (0, rc.span_id) and cc.trace_flags.sampled
child.set_attributes({"b": 2})
child.add_event("e", {"k": "v"}, timestamp=5)
child.set_status(StatusCode.ERROR, "bad")
child.end(end_time=child._start + 7)
child.set_attribute("late", 1)  # ignored: ended
child.end()  # ignored: ended once
tracing.end_span(root)
remote = tracing.start_span("remote", parent=tracing.context_of(f"00-{tid}-{sid}-01", "vendor=x"))
assert isinstance(remote, RecordingSpan) and remote.parent.is_remote
assert remote.get_span_context().trace_state.get("vendor") == "x"
tracing.end_span(remote, error="DEADLINE_EXCEEDED")
unsampled = tracing.start_span("u", parent=f"00-{tid}-{sid}-00")  # the SDK's: it records nothing
assert not isinstance(unsampled, RecordingSpan) and not unsampled.is_recording()
assert unsampled.get_span_context().trace_id == int(tid, 16)

spans = memory.get_finished_spans()
assert [s.name for s in spans] == ["child", "root", "remote"], [s.name for s in spans]
c = spans[0]
assert c.parent.span_id == rc.span_id and not c.parent.is_remote
assert dict(c.attributes) == {"a": "x", "b": 2} and c.end_time - c.start_time == 7
assert c.status.status_code is StatusCode.ERROR and c.status.description == "bad"
assert [(e.name, dict(e.attributes), e.timestamp) for e in c.events] == [("e", {"k": "v"}, 5)]
assert spans[2].status.status_code is StatusCode.ERROR and spans[2].parent.span_id == int(sid, 16)
request = ExportTraceServiceRequest.FromString(encode_request(spans))
assert request == encode_spans(spans)
assert len(request.resource_spans) == 1 and len(request.resource_spans[0].scope_spans) == 1  # one scope
print("ok")
"""


def test_recording_spans_carry_the_sdk_decisions_and_export_alike() -> None:
    _traced_probe(CHILD_SPAN_PROBE)


PROPAGATION_PROBE = """
from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from flynn_runtime import tracing
assert tracing.configure("probe")
official = TraceContextTextMapPropagator()
tid, sid = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
cases = [
    (f"00-{tid}-{sid}-01", ""), (f"00-{tid}-{sid}-00", ""), (f"00-{tid}-{sid}-03", ""),
    (f"00-{tid}-{sid}-01", "vendor=x,other=y"), (f"00-{'0' * 32}-{sid}-01", ""), (f"00-{tid}-{'0' * 16}-01", ""),
    (f"00-{tid.upper()}-{sid}-01", ""), (f"00-{tid}-{sid}-01-extra", ""), (f"01-{tid}-{sid}-01-future", ""),
    (f"ff-{tid}-{sid}-01", ""), (f"00-{tid}-{sid}-1", ""), (f"00-{tid[:-1]}_-{sid}-01", ""), ("garbage", ""), ("", ""),
]
for tp, ts in cases:
    carrier = {"traceparent": tp, **({"tracestate": ts} if ts else {})}
    want = trace.get_current_span(official.extract(carrier)).get_span_context()
    got = trace.get_current_span(tracing.remote_context(tp, ts)).get_span_context()
    assert (got.trace_id, got.span_id, got.trace_flags, got.is_remote, got.is_valid, dict(got.trace_state)) == (
        want.trace_id, want.span_id, want.trace_flags, want.is_remote, want.is_valid, dict(want.trace_state)
    ), (tp, ts, got, want)
    if want.is_valid:  # and what goes out again is what the propagator writes
        ctx = tracing.remote_context(tp, ts)
        injected = {}
        official.inject(injected, context=ctx)
        assert tracing.carrier(ctx) == injected, (tp, ts)
assert tracing.carrier(tracing.remote_context("garbage")) == {}
print("ok")
"""


def test_the_traceparent_parsed_and_written_is_the_propagators() -> None:
    """The hot path reads and writes version-00 traceparents itself: it must agree with the SDK's
    TraceContextTextMapPropagator on every input, valid or not (tracestate and other versions are
    the propagator's own)."""
    _traced_probe(PROPAGATION_PROBE)


CURRENT_SPAN_PROBE = """
import json, logging
from opentelemetry import context, trace
from flynn_runtime import tracing
from flynn_runtime.logs import JsonFormatter
assert tracing.configure("probe")
tid, sid = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
remote = tracing.context_of(f"00-{tid}-{sid}-01")
for ctx in (None, context.Context(), remote, context.set_value("other", 1)):
    assert tracing._span_in(ctx) is trace.get_current_span(ctx), ctx
assert tracing.current_ids() is None and tracing.carrier() == {}  # no span current
fmt = JsonFormatter("probe")

def line(msg, **extra):
    rec = logging.LogRecord("audit", logging.INFO, "", 0, msg, None, None)
    rec.__dict__.update(extra)
    return json.loads(fmt.format(rec))

with tracing.span("probe", parent=remote) as s:
    sc = s.get_span_context()
    want = (trace.format_trace_id(sc.trace_id), trace.format_span_id(sc.span_id))
    assert tracing._span_in(None) is trace.get_current_span() is s
    assert tracing.current_ids() == want and want[0] == tid
    plain = line("plain")
    assert (plain["trace_id"], plain["span_id"]) == want
    # An audit record's line carries the ids the record has (made where the record was made).
    other = {"event": "runState", "trace_id": "1" * 32, "span_id": "2" * 16}
    logged = line("runState", audit=other)
    assert (logged["trace_id"], logged["span_id"]) == ("1" * 32, "2" * 16)
    assert line("runState", audit={"event": "x"})["trace_id"] == tid  # without ids: the current ones
print("ok")
"""


def test_the_current_span_and_its_ids_are_the_apis() -> None:
    _traced_probe(CURRENT_SPAN_PROBE)


PACING_PROBE = """
import time
from flynn_runtime import tracing
from flynn_runtime.exemplar_pacing import ExemplarPacing
pacing = ExemplarPacing((0.01, 0.1), interval=0.5)
made = []
def make(n):
    def f():
        made.append(n)
        return {"trace_id": str(n)} if n else None  # 0: an unsampled observation
    return f
assert pacing.exemplar(0.05, make(1)) is None and made == []  # tracing off: nothing made
assert tracing.configure("probe")
assert pacing.exemplar(0.05, make(0)) is None  # unsampled: the bucket stays due
assert pacing.exemplar(0.05, make(2)) == {"trace_id": "2"}
assert pacing.exemplar(0.06, make(3)) is None  # same bucket (<= 0.1) within the interval: not made
assert pacing.exemplar(0.1, make(4)) is None  # the bound belongs to its bucket
assert pacing.exemplar(0.01, make(5)) == {"trace_id": "5"}  # another bucket
assert pacing.exemplar(7.0, make(6)) == {"trace_id": "6"}  # +Inf
time.sleep(0.55)
assert pacing.exemplar(0.05, make(7)) == {"trace_id": "7"}  # due again
assert made == [0, 2, 5, 6, 7], made
print("ok")
"""


def test_a_paced_histogram_takes_one_exemplar_per_bucket_per_interval() -> None:
    _traced_probe(PACING_PROBE)
