"""flynn_runtime.otlp_encoding writes exactly the ExportTraceServiceRequest that the official
OpenTelemetry encoder (`encode_spans`) builds, for spans of every shape the SDK records."""

from __future__ import annotations

from typing import Any

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanLimits, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState

from flynn_runtime.otlp_encoding import encode_request

REMOTE = SpanContext(
    0x0AF7651916CD43DD8448EB211C80319C,
    0xB7AD6B7169203331,
    is_remote=True,
    trace_flags=TraceFlags(TraceFlags.SAMPLED),
    trace_state=TraceState([("vendor", "x1"), ("other", "y")]),
)
LOCAL_LINK = SpanContext(0x1, 0x2, is_remote=False, trace_flags=TraceFlags(TraceFlags.SAMPLED))


def _provider(resource: Resource, exporter: InMemorySpanExporter, limits: SpanLimits | None = None) -> Any:
    provider = TracerProvider(resource=resource, span_limits=limits)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider


def _record() -> tuple[ReadableSpan, ...]:
    exporter = InMemorySpanExporter()
    first = _provider(Resource.create({"service.name": "a", "flynn.service": "queue"}), exporter)
    second = _provider(
        Resource({"service.name": "b", "n": 3}, schema_url="https://opentelemetry.io/schemas/1.21.0"),
        exporter,
        SpanLimits(max_attributes=2, max_events=1, max_links=1, max_event_attributes=1),
    )
    plain = first.get_tracer("flynn")
    versioned = first.get_tracer(
        "flynn.other", "1.2.3", schema_url="https://example.test/schema", attributes={"scope.attr": "s"}
    )
    with plain.start_as_current_span("root", kind=SpanKind.SERVER) as root:
        root.set_attributes(
            {
                "s": "text é ✓",
                "empty": "",
                "t": True,
                "f": False,
                "i": 42,
                "zero": 0,
                "neg": -7,
                "big": 2**62,
                "x": 1.5,
                "nx": -0.0,
                "raw": b"\x00\xff",
                "strs": ["a", "", "c"],
                "ints": [1, -2, 3],
                "bools": [True, False],
                "floats": [0.25],
                "nested": {"k": "v", "n": [1, 2], "m": {"deep": True}},
                "long": "z" * 300,
            }
        )
        root.add_event("an event", {"flynn.reply.id": "rep_1", "n": 2}, timestamp=1_700_000_000_000_000_000)
        root.add_event("bare")
        with plain.start_as_current_span("child", kind=SpanKind.CLIENT) as child:
            child.set_status(Status(StatusCode.ERROR, "it broke"))
        with plain.start_as_current_span("ok", kind=SpanKind.PRODUCER) as ok:
            ok.set_status(Status(StatusCode.OK))
    remote_parent = trace.set_span_in_context(trace.NonRecordingSpan(REMOTE))
    linked = versioned.start_span(
        "linked",
        context=remote_parent,
        kind=SpanKind.CONSUMER,
        links=[Link(REMOTE, {"flynn.link": "caused_by"}), Link(LOCAL_LINK)],
        start_time=1,
    )
    linked.end(end_time=2)
    limited = second.get_tracer("flynn").start_span(
        "limited",
        attributes={"a": 1, "b": 2, "c": 3},
        links=[Link(REMOTE), Link(LOCAL_LINK, {"x": 1, "y": 2})],
    )
    limited.add_event("e1", {"p": 1, "q": 2})
    limited.add_event("e2")
    limited.end()
    return exporter.get_finished_spans()


def test_the_wire_bytes_are_the_official_encoders_request() -> None:
    spans = _record()
    assert len(spans) == 5
    ours = ExportTraceServiceRequest.FromString(encode_request(spans))
    official = encode_spans(spans)
    assert ours == official
    # Equal after a parse, and byte for byte once both are serialized the same way.
    assert ours.SerializeToString(deterministic=True) == official.SerializeToString(deterministic=True)
    # The cases are really there (dropped counts, remote flags, events, links, two resources, scopes).
    assert len(official.resource_spans) == 2
    assert sum(len(rs.scope_spans) for rs in official.resource_spans) == 3
    limited = official.resource_spans[1].scope_spans[0].spans[0]
    assert limited.dropped_attributes_count == 1 and limited.dropped_events_count == 1
    assert limited.dropped_links_count == 1


def test_each_span_alone_and_an_empty_batch() -> None:
    spans = _record()
    for s in spans:
        assert ExportTraceServiceRequest.FromString(encode_request([s])) == encode_spans([s])
    assert encode_request([]) == b"" == encode_spans([]).SerializeToString()
