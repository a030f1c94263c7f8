"""A real OTLP/gRPC trace receiver for tests and benchmarks: opentelemetry.proto's TraceService as a gRPC
server on a loopback port, keeping every span it is sent (what a collector would receive)."""

from __future__ import annotations

import threading
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2


def _value(v: common_pb2.AnyValue) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in v.kvlist_value.values}
    return getattr(v, kind) if kind else None


def _attrs(kvs: Any) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in kvs}


@dataclass(frozen=True)
class Link:
    trace_id: str
    span_id: str
    attributes: dict[str, Any]


@dataclass(frozen=True)
class Span:
    service: str
    trace_id: str
    span_id: str
    parent_span_id: str
    name: str
    kind: int
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    links: tuple[Link, ...]
    status_code: int
    resource: dict[str, Any] = field(default_factory=dict)
    events: tuple[dict[str, Any], ...] = ()

    def text(self) -> str:
        """Every string this span carries (name, attributes, links, events, resource), for leak checks."""
        parts = [self.name, repr(self.attributes), repr(self.resource), repr(self.events)]
        parts += [repr(link.attributes) for link in self.links]
        return "\n".join(parts)


class _Servicer(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, sink: OtlpReceiver) -> None:
        self._sink = sink

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        if not self._sink.keep:  # counting only (benchmarks): no conversion to Python objects
            n = sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)
            self._sink.count(n, request.ByteSize())
            return trace_service_pb2.ExportTraceServiceResponse()
        got: list[Span] = []
        for rs in request.resource_spans:
            resource = _attrs(rs.resource.attributes)
            service = str(resource.get("service.name", ""))
            for ss in rs.scope_spans:
                for s in ss.spans:
                    got.append(
                        Span(
                            service=service,
                            trace_id=s.trace_id.hex(),
                            span_id=s.span_id.hex(),
                            parent_span_id=s.parent_span_id.hex(),
                            name=s.name,
                            kind=s.kind,
                            start_ns=s.start_time_unix_nano,
                            end_ns=s.end_time_unix_nano,
                            attributes=_attrs(s.attributes),
                            links=tuple(
                                Link(x.trace_id.hex(), x.span_id.hex(), _attrs(x.attributes)) for x in s.links
                            ),
                            status_code=s.status.code,
                            resource=resource,
                            events=tuple({"name": e.name, **_attrs(e.attributes)} for e in s.events),
                        )
                    )
        self._sink.add(got, request.ByteSize())
        return trace_service_pb2.ExportTraceServiceResponse()


class OtlpReceiver:
    """`with OtlpReceiver() as r:` serves on r.endpoint (http://127.0.0.1:port) until the block ends."""

    def __init__(self, keep: bool = True, port: int = 0) -> None:
        self.keep = keep  # False: count spans and bytes only
        self._lock = threading.Lock()
        self._spans: list[Span] = []
        self.received = 0
        self.requests = 0
        self.bytes = 0
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_Servicer(self), self._server)  # type: ignore[no-untyped-call]
        self.port = self._server.add_insecure_port(f"127.0.0.1:{port}")

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def add(self, spans: list[Span], size: int) -> None:
        with self._lock:
            self._spans.extend(spans)
        self.count(len(spans), size)

    def count(self, spans: int, size: int) -> None:
        with self._lock:
            self.received += spans
            self.requests += 1
            self.bytes += size

    def spans(self) -> list[Span]:
        with self._lock:
            return list(self._spans)

    def clear(self) -> None:
        with self._lock:
            self._spans.clear()

    def start(self) -> OtlpReceiver:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop(1).wait(5)

    def __enter__(self) -> OtlpReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def otel_env(
    receiver: OtlpReceiver | Any, *, ratio: float = 1.0, capture_content: bool = False, delay_ms: int = 200
) -> dict[str, str]:
    """The OTEL_* environment that points a Flynn process at `receiver`."""
    env = {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_TRACES_SAMPLER": "parentbased_traceidratio" if ratio < 1.0 else "parentbased_always_on",
        "OTEL_BSP_SCHEDULE_DELAY": str(delay_ms),
    }
    if ratio < 1.0:
        env["OTEL_TRACES_SAMPLER_ARG"] = str(ratio)
    if capture_content:
        env["OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"] = "true"
    return env


def main() -> None:
    """A counting receiver as its own process (benchmarks): `python -m tests.support.otlp PORT`;
    prints its address, then `<spans> <requests> <bytes>` on each line read from stdin, until EOF."""
    import sys

    receiver = OtlpReceiver(keep=False, port=int(sys.argv[1]) if len(sys.argv) > 1 else 0).start()
    print(receiver.endpoint, flush=True)
    for _ in sys.stdin:
        print(receiver.received, receiver.requests, receiver.bytes, flush=True)
    receiver.stop()


if __name__ == "__main__":
    main()
