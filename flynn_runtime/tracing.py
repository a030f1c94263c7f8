"""OpenTelemetry traces for every Flynn process: configuration, W3C propagation, spans, exemplars.

Configuration is the standard OpenTelemetry environment (docs/operations/OBSERVABILITY.md, "Traces"):

    OTEL_TRACES_EXPORTER=otlp                       # unset or "none": tracing off (the default)
    OTEL_EXPORTER_OTLP_ENDPOINT=http://collector:4317   # OTLP/gRPC; http:// means plaintext
    OTEL_TRACES_SAMPLER=parentbased_traceidratio    # and OTEL_TRACES_SAMPLER_ARG=0.1
    OTEL_SERVICE_NAME=...                           # default flynn-<service>
    OTEL_RESOURCE_ATTRIBUTES, OTEL_BSP_*, OTEL_EXPORTER_OTLP_* (headers, timeout, ...) as usual
    OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=true   # record message and reply text (off)

Off costs nothing: the SDK is never imported, no client interceptor is installed, and every hook in
the services checks `ENABLED` (or a None tracer) first; the helpers below that are called
unconditionally return at their first line. On, the shared runtime does the work: the server
interceptor opens a SERVER span per RPC (parent: the caller's `traceparent` metadata) and makes it
current; `client_channel` injects the current context into every outgoing call; long-lived work
(runs, reactions, speech) carries its context in `Causation.traceparent` (persisted with messages,
runs and replies), so phases after a queue wait or a restart join the message's trace.

The SDK's provider, sampler, id generator, batch span processor and OTLP exporter do the rest, with
two hot steps of Flynn's own (OBSERVABILITY.md, "Cost"): a sampled span is a RecordingSpan
(flynn_runtime/recording_span.py) where the SDK's decision is known or made by its sampler, and the
exporter encodes with flynn_runtime/otlp_encoding.py. A call from an unsampled caller (parentbased_*
samplers) gets no span at all: the caller's context is made current as it came.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from flynn.v1 import common_pb2

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.trace import Link, Span, SpanContext, Tracer

log = logging.getLogger(__name__)

#: True once configure() set up an exporter; read on the hot path, so a plain module global.
ENABLED = False
#: The sampler follows the caller's decision (a parentbased_* sampler, the default): a call whose
#: traceparent is unsampled records nothing here, so its server span is skipped outright.
PARENT_DECIDES = False
#: Record message and reply text in span attributes (OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT).
CAPTURE_CONTENT = False
CAPTURE_ENV = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"
TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"

# Methods not worth a span each (probes, reflection).
_UNTRACED_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")

_tracer: Tracer | None = None
_provider: Any = None
_propagator: Any = None


class _Api:
    """The OpenTelemetry API, bound by configure() (never imported while tracing is off)."""

    trace: Any = None
    context: Any = None
    Link: Any = None
    SpanKind: Any = None
    SpanContext: Any = None
    Status: Any = None
    StatusCode: Any = None
    root: Any = None  # an empty context: the parent of a span that starts a trace
    RecordingSpan: Any = None  # flynn_runtime.recording_span
    sink: Any = None
    sampler: Any = None  # the provider's sampler and id generator
    ids: Any = None
    TraceFlags: Any = None
    NonRecordingSpan: Any = None
    get_current: Any = None  # opentelemetry.context.get_current
    span_key: Any = None  # the context key of the current span (opentelemetry.trace.propagation)
    invalid_span: Any = None  # what get_current_span() returns when no span is current


_api = _Api()


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def configure(service: str, environ: Mapping[str, str] | None = None) -> bool:
    """Set up tracing for this process from the OTEL_* environment; True when tracing is on."""
    global ENABLED, CAPTURE_CONTENT, PARENT_DECIDES, _tracer, _provider, _propagator
    env = os.environ if environ is None else environ
    exporter = env.get("OTEL_TRACES_EXPORTER", "none").strip().lower()
    if exporter in ("", "none") or _truthy(env.get("OTEL_SDK_DISABLED")):
        return False
    if exporter != "otlp":
        log.warning("OTEL_TRACES_EXPORTER=%s is not supported (only otlp); tracing stays off", exporter)
        return False
    from opentelemetry import context as otel_context
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    attrs: dict[str, str] = {"flynn.service": service}
    if not env.get("OTEL_SERVICE_NAME"):
        attrs["service.name"] = f"flynn-{service}"
    # The sampler comes from OTEL_TRACES_SAMPLER(_ARG); the exporter from OTEL_EXPORTER_OTLP_*.
    created = Resource.create(attrs)
    provider = TracerProvider(
        resource=_resource_hashed_once(Resource)(created.attributes, created.schema_url)
    )
    batches = BatchSpanProcessor(_exporter_class(OTLPSpanExporter)())
    provider.add_span_processor(batches)
    trace.set_tracer_provider(provider)
    _provider = provider
    _tracer = provider.get_tracer("flynn", "", "")
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope

    from flynn_runtime.recording_span import RecordingSpan, Sink

    _api.RecordingSpan = RecordingSpan
    _api.sink = Sink(provider.resource, InstrumentationScope("flynn", "", ""), batches)
    _api.sampler, _api.ids = provider.sampler, provider.id_generator
    _api.TraceFlags, _api.NonRecordingSpan = trace.TraceFlags, trace.NonRecordingSpan
    from opentelemetry.trace import propagation

    _api.get_current, _api.span_key = otel_context.get_current, propagation._SPAN_KEY
    _CHILD_FLAGS.update({bit: trace.TraceFlags(trace.TraceFlags.SAMPLED | bit) for bit in (0, 2)})
    _REMOTE_FLAGS.update({f"{n:02x}": trace.TraceFlags(n) for n in range(256)})
    _api.invalid_span = trace.INVALID_SPAN
    _propagator = TraceContextTextMapPropagator()
    _api.trace, _api.context = trace, otel_context
    _api.Link, _api.SpanKind, _api.SpanContext = trace.Link, trace.SpanKind, trace.SpanContext
    _api.Status, _api.StatusCode = trace.Status, trace.StatusCode
    _api.root = otel_context.Context()
    CAPTURE_CONTENT = _truthy(env.get(CAPTURE_ENV))
    # The SDK's parentbased_* samplers drop every span whose remote parent is unsampled.
    PARENT_DECIDES = (
        env.get("OTEL_TRACES_SAMPLER", "parentbased_always_on").strip().lower().startswith("parentbased_")
    )
    ENABLED = True
    log.info(
        "tracing on",
        extra={
            "endpoint": env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            or env.get("OTEL_EXPORTER_OTLP_ENDPOINT", ""),
            "sampler": env.get("OTEL_TRACES_SAMPLER", "parentbased_always_on"),
            "capture_content": CAPTURE_CONTENT,
        },
    )
    return True


def _resource_hashed_once(resource_class: Any) -> Any:
    """A Resource subclass whose hash is computed once. The OTLP encoder groups each exported span by
    its resource (a dict lookup per span) and Resource.__hash__ is a sorted JSON dump of all its
    attributes: a quarter of the cost of encoding a span. A resource is immutable, so its hash is too."""

    class HashedOnce(resource_class):  # type: ignore[misc]
        def __init__(self, attributes: Any, schema_url: str | None = None) -> None:
            super().__init__(attributes, schema_url)
            self._hash = super().__hash__()

        def __hash__(self) -> int:
            return self._hash  # type: ignore[no-any-return]

    return HashedOnce


def _exporter_class(otlp_span_exporter: Any) -> Any:
    """The official OTLP/gRPC span exporter, encoding with flynn_runtime.otlp_encoding: the same
    request, written as wire bytes instead of one protobuf object per span, attribute and value (the
    exporter's thread encodes under the service's GIL). The bytes are parsed back into the request
    the exporter sends (one parse in C per batch, a small part of what building it costs)."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    from flynn_runtime.otlp_encoding import encode_request

    class WireEncoded(otlp_span_exporter):  # type: ignore[misc]
        def _translate_data(self, data: Any) -> Any:
            return ExportTraceServiceRequest.FromString(encode_request(data))

    return WireEncoded


def shutdown() -> None:
    """Export what is buffered and stop (end of the process)."""
    global ENABLED
    if _provider is not None:
        ENABLED = False
        try:
            _provider.shutdown()
        except Exception:  # noqa: BLE001 - never fail a clean exit over telemetry
            log.warning("tracing shutdown failed", exc_info=True)


def tracer() -> Tracer:
    assert _tracer is not None, "tracing is not configured"
    return _tracer


# --- context ------------------------------------------------------------------------------------


def _span_in(context: Context | None) -> Span:
    """The span of `context` (None: the current context), as `trace.get_current_span(context)`
    returns it, in one step instead of four (get_value, get_current, the runtime context, the
    contextvar): it is asked several times per message (logs, audit records, attributes, the stamp)."""
    span: Any = (context if context is not None else _api.get_current()).get(_api.span_key)
    return span if span is not None else _api.invalid_span  # type: ignore[no-any-return]


def _current_span() -> Span:
    return _span_in(None)


def extract(carrier: Mapping[str, str]) -> Context:
    """The context a `traceparent`/`tracestate` carrier names (an empty context when none)."""
    ctx: Context = _propagator.extract(carrier)
    return ctx


# A version-00 traceparent exactly (W3C Trace Context): lowercase hex trace id, parent id and flags.
_TRACEPARENT_00 = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")


def _remote_span_context(traceparent: str) -> SpanContext | None:
    """The remote span context of a version-00 traceparent exactly (None for anything else, and for
    all-zero ids): what the SDK's TraceContextTextMapPropagator extracts, without its getter, regex
    and TraceState machinery. Parsed once per call on the hot path (server spans, run phases)."""
    m = _TRACEPARENT_00.fullmatch(traceparent)
    if m is None:
        return None
    trace_id, span_id = int(m[1], 16), int(m[2], 16)
    if not trace_id or not span_id:
        return None
    sc: SpanContext = _api.SpanContext(trace_id, span_id, True, _REMOTE_FLAGS[m[3]])
    return sc


def remote_context(traceparent: str, tracestate: str = "") -> Context:
    """The context a caller's traceparent names (an empty context when it is malformed).

    The common case, a version-00 traceparent without tracestate, is parsed by _remote_span_context;
    the propagator takes every other case (tracestate, other versions, invalid ids)."""
    sc = None if tracestate else _remote_span_context(traceparent)
    if sc is None:
        carrier = {TRACEPARENT: traceparent}
        if tracestate:
            carrier[TRACESTATE] = tracestate
        return extract(carrier)
    ctx: Context = _api.trace.set_span_in_context(_api.NonRecordingSpan(sc), _api.root)
    return ctx


# The trace flags of a version-00 traceparent, as written -> the remote parent's TraceFlags.
_REMOTE_FLAGS: dict[str, Any] = {}


def _traceparent(sc: SpanContext) -> str:
    """The traceparent of a valid span context (what the propagator's inject writes)."""
    return f"00-{sc.trace_id:032x}-{sc.span_id:016x}-{sc.trace_flags:02x}"


# traceparent, tracestate -> the context they name: a run's phases (and its exemplars) use the context
# of the message's traceparent several times; stamp() puts the ones it writes here (no parsing at all).
_CONTEXTS_MAX = 4096
_contexts: dict[tuple[str, str], Context] = {}


def context_of(traceparent: str, tracestate: str = "") -> Context | None:
    """The context a traceparent names (None for ""). Cached: a run's phases parse the same one."""
    if not traceparent:
        return None
    key = (traceparent, tracestate)
    ctx = _contexts.get(key)
    if ctx is None:
        ctx = _remember_context(key, remote_context(traceparent, tracestate))
    return ctx


def _remember_context(key: tuple[str, str], ctx: Context) -> Context:
    if len(_contexts) >= _CONTEXTS_MAX:
        del _contexts[next(iter(_contexts))]  # the oldest: its run's phases are long recorded
    _contexts[key] = ctx
    return ctx


def sampled(traceparent: str) -> bool:
    """Whether a traceparent's sampled flag is set (an unsampled run records nothing)."""
    if len(traceparent) != 55:
        return False
    try:
        return bool(int(traceparent[53:], 16) & 1)  # trace-flags: bit 0 sampled (bit 1: random id)
    except ValueError:
        return False


def carrier(context: Context | None = None) -> dict[str, str]:
    """`traceparent` (and `tracestate`) of the current (or given) context; empty when none."""
    sc = _span_in(context).get_span_context()
    if not sc.is_valid:
        return {}
    if sc.trace_state:
        return {TRACEPARENT: _traceparent(sc), TRACESTATE: sc.trace_state.to_header()}
    return {TRACEPARENT: _traceparent(sc)}


def current_ids() -> tuple[str, str] | None:
    """(trace_id, span_id) in hex of the current span, for logs and audit records."""
    if not ENABLED:
        return None
    sc = _current_span().get_span_context()
    if not sc.is_valid:
        return None
    return f"{sc.trace_id:032x}", f"{sc.span_id:016x}"  # format_trace_id / format_span_id


def span_context_of(traceparent: str) -> SpanContext | None:

    ctx = context_of(traceparent)
    if ctx is None:
        return None
    sc = _span_in(ctx).get_span_context()
    return sc if sc.is_valid else None


def link_current(**attributes: Any) -> list[Link]:
    """A span link to the current span (none when there is no valid one)."""

    sc = _current_span().get_span_context()
    return [_api.Link(sc, attributes or None)] if sc.is_valid else []


def link_to(traceparent: str, **attributes: Any) -> list[Link]:
    """A span link to the span a traceparent names (none when empty or invalid)."""

    sc = span_context_of(traceparent)
    return [_api.Link(sc, attributes or None)] if sc is not None else []


def stamp(causation: common_pb2.Causation | None) -> common_pb2.Causation | None:
    """`causation` carrying the current span's context (a new Causation if None); unchanged when off.

    Run control stamps each accepted message this way: the context is then stored with the message,
    its run and its replies, and the run's phases are spans of the message's trace."""
    if not ENABLED:
        return causation
    sc = _current_span().get_span_context()
    if not sc.is_valid:
        return causation
    out = common_pb2.Causation()
    if causation is not None:
        out.CopyFrom(causation)
    tp = out.traceparent = _traceparent(sc)
    ts = out.tracestate = sc.trace_state.to_header() if sc.trace_state else ""
    # The run's phases will want this context: the one extract() would give, without parsing it.
    remote = _api.SpanContext(sc.trace_id, sc.span_id, True, sc.trace_flags, sc.trace_state)
    _remember_context((tp, ts), _api.trace.set_span_in_context(_api.NonRecordingSpan(remote), _api.root))
    return out


def traceparent_of(causation_bytes: bytes) -> str:
    """The traceparent stored in a serialized Causation ("" when off or absent)."""
    if not ENABLED or not causation_bytes:
        return ""
    tp: str = common_pb2.Causation.FromString(causation_bytes).traceparent
    return tp


# --- spans --------------------------------------------------------------------------------------


# The trace flags of a recorded child: sampled (bit 0), and the random-trace-id bit (1) of its parent.
_CHILD_FLAGS: dict[int, Any] = {}


def start_span(
    name: str,
    *,
    parent: str | Context | None = None,
    attributes: Mapping[str, Any] | None = None,
    links: Sequence[Link] = (),
    start_time: float | None = None,
    server: bool = False,
) -> Span:
    """Start (not activate) a span; `parent` is a traceparent or a context (None: the current one).
    `start_time` is time.time() seconds (for phases recorded when they end)."""

    ctx = context_of(parent) if isinstance(parent, str) else parent
    kind = _api.SpanKind.SERVER if server else _api.SpanKind.INTERNAL
    start_ns = int(start_time * 1e9) if start_time is not None else None
    psc = _span_in(ctx).get_span_context()
    if PARENT_DECIDES and psc.is_valid and psc.trace_flags & 1:  # a sampled parent
        # A parentbased sampler records a child of a sampled parent, with the parent's trace id,
        # random-trace-id bit and trace state: the SDK's span would only repeat that decision.
        return _recorded_child(name, psc, kind, attributes, links, start_ns)
    if not psc.is_valid:
        return _root_span(name, ctx, kind, attributes, links, start_ns)
    return tracer().start_span(
        name,
        context=ctx,
        kind=kind,
        attributes=attributes or None,
        links=list(links) or None,
        start_time=start_ns,
    )


def _recorded_child(
    name: str, psc: SpanContext, kind: Any, attributes: Mapping[str, Any] | None, links: Sequence[Link],
    start_ns: int | None,
) -> Span:  # fmt: skip
    """A child of the sampled span context `psc`, recorded (a parentbased sampler's decision)."""
    flags = _CHILD_FLAGS[psc.trace_flags & 2]  # sampled, and the parent's random-trace-id bit
    sc = _api.SpanContext(psc.trace_id, _api.ids.generate_span_id(), False, flags, psc.trace_state)
    span: Span = _api.RecordingSpan(_api.sink, name, sc, psc, kind, attributes, links, start_ns)
    return span


def _root_span(
    name: str, ctx: Context | None, kind: Any, attributes: Mapping[str, Any] | None, links: Sequence[Link],
    start_ns: int | None,
) -> Span:  # fmt: skip
    """A span starting a trace, as the SDK's Tracer makes it: a new trace id from the provider's id
    generator and the provider's sampler deciding; recorded as a RecordingSpan."""
    trace_id = _api.ids.generate_trace_id()
    result = _api.sampler.should_sample(ctx, trace_id, name, kind, attributes, links)
    flags = _api.TraceFlags.SAMPLED if result.decision.is_sampled() else _api.TraceFlags.DEFAULT
    if _api.ids.is_trace_id_random():
        flags |= _api.TraceFlags.RANDOM_TRACE_ID
    sc = _api.SpanContext(
        trace_id, _api.ids.generate_span_id(), False, _api.TraceFlags(flags), result.trace_state
    )
    if not result.decision.is_recording():
        span: Span = _api.NonRecordingSpan(sc)
        return span
    span = _api.RecordingSpan(_api.sink, name, sc, None, kind, result.attributes, links, start_ns)
    return span


def mark_error(span: Span, description: str) -> None:

    span.set_status(_api.Status(_api.StatusCode.ERROR, description))


def end_span(span: Span, end_time: float | None = None, error: str = "") -> None:
    if error:
        mark_error(span, error)
    span.end(end_time=int(end_time * 1e9) if end_time is not None else None)


class _Current:
    """A context current for a `with` block (None: nothing changes). A class, not a generator-based
    contextmanager: it is entered on every run's hot path, and costs a third of one."""

    __slots__ = ("_context", "_token")

    def __init__(self, context: Context | None) -> None:
        self._context = context
        self._token: Any = None

    def __enter__(self) -> None:
        if self._context is not None:
            self._token = _api.context.attach(self._context)

    def __exit__(self, *exc: object) -> None:
        if self._token is not None:
            _api.context.detach(self._token)
            self._token = None


def activated(span: Span | None) -> AbstractContextManager[None]:
    """Make `span` current for the block (no-op for None): use_span() without its extras."""
    return _Current(None if span is None else _api.trace.set_span_in_context(span))


def joined(traceparent: str) -> AbstractContextManager[None]:
    """The context a traceparent names current for the block (sampled or not; an empty context for
    ""), so calls made inside carry it instead of whatever context the running task inherited."""
    return _Current(context_of(traceparent) or _api.root)


@contextlib.contextmanager
def span(
    name: str,
    *,
    parent: str | Context | None = None,
    attributes: Mapping[str, Any] | None = None,
    links: Sequence[Link] = (),
) -> Iterator[Span | None]:
    """A span around a block, current inside it; yields None (and does nothing) when tracing is off."""
    if not ENABLED:
        yield None
        return
    s = start_span(name, parent=parent, attributes=attributes, links=links)
    try:
        with activated(s):
            yield s
    except BaseException as e:
        end_span(s, error=type(e).__name__)
        raise
    end_span(s)


def recording() -> bool:
    """Whether the current span records (tracing on and sampled): check it before building attributes."""
    return ENABLED and bool(_current_span().is_recording())


def set_attributes(attributes: Mapping[str, Any]) -> None:
    """Set attributes on the current span (None values skipped); no-op when off."""
    if not ENABLED:
        return
    s = _current_span()
    if s.is_recording():
        s.set_attributes({k: v for k, v in attributes.items() if v is not None})


def content(key: str, text: str) -> dict[str, str]:
    """{key: text} when content capture is on, else {} (message text is never recorded by default)."""
    return {key: text} if CAPTURE_CONTENT and text else {}


# --- gRPC ---------------------------------------------------------------------------------------

# Status codes that mark a server span as failed (OpenTelemetry gRPC conventions).
_SERVER_ERRORS = frozenset(
    {"UNKNOWN", "DEADLINE_EXCEEDED", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS"}
)


def server_span(method: str, metadata: Iterable[tuple[str, Any]]) -> Span | None:
    """Open the SERVER span of an RPC (child of the caller's traceparent) and make it current for the
    handler's task. None for untraced methods and for a caller whose trace is not sampled (its
    context is made current without a span). Called only when ENABLED."""
    if method.startswith(_UNTRACED_PREFIXES):
        return None

    tp = ts = ""
    for k, v in metadata:
        if k == TRACEPARENT and isinstance(v, str):
            tp = v
        elif k == TRACESTATE and isinstance(v, str):
            ts = v
    name, attrs = _method_span(method)
    # The caller's context is parsed, not cached: each call has its own (the cache is for run phases).
    psc = _remote_span_context(tp) if tp and not ts else None
    if psc is None:
        parent = remote_context(tp, ts) if tp else _api.root
    elif PARENT_DECIDES and psc.trace_flags & 1:
        # A sampled caller, the common case: its span context straight to the recorded child
        # (what start_span would make of its context, without building that context).
        s = _recorded_child(name, psc, _api.SpanKind.SERVER, attrs, (), None)
        _api.context.attach(_api.trace.set_span_in_context(s))
        return s
    else:
        parent = _api.trace.set_span_in_context(_api.NonRecordingSpan(psc), _api.root)
    if PARENT_DECIDES and tp and not sampled(tp):
        if _span_in(parent).get_span_context().is_valid:
            # An unsampled caller: the sampler would only make a non-recording span. The caller's
            # context is current instead, so the calls made from here carry the same decision.
            _api.context.attach(parent)
            return None
    s = start_span(name, parent=parent, attributes=attrs, server=True)
    # Each RPC runs in its own task (its own contextvars copy): no detach needed.
    _api.context.attach(_api.trace.set_span_in_context(s))
    return s


@functools.lru_cache(maxsize=512)
def _method_span(method: str) -> tuple[str, dict[str, str]]:
    """The span name and attributes of an RPC, after OpenTelemetry's current RPC conventions:
    `rpc.system.name` and the fully-qualified `rpc.method` (the span's name, `<service>/<method>`)."""
    _, service, name = method.split("/", 2) if method.count("/") >= 2 else ("", "unknown", method)
    full = f"{service}/{name}"
    return full, {"rpc.system.name": "grpc", "rpc.method": full}


def end_server_span(s: Span, code_name: str) -> None:
    """End an RPC's span with `rpc.response.status_code` (the status code's name, e.g. "OK")."""
    s.set_attribute("rpc.response.status_code", code_name)
    end_span(s, error=code_name if code_name in _SERVER_ERRORS else "")


def inject_metadata(metadata: Sequence[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """`metadata` with the current context's traceparent/tracestate (replacing any it had)."""
    md = [(k, v) for k, v in metadata if k not in (TRACEPARENT, TRACESTATE)]
    md.extend(carrier().items())
    return md


_TRACEPARENT_IDS = re.compile(r"[0-9a-f]{2}-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}")
_ZERO_TRACE, _ZERO_SPAN = "0" * 32, "0" * 16


def exemplar(traceparent: str = "") -> dict[str, str] | None:
    """Exemplar labels {trace_id, span_id} for a histogram observation: of `traceparent` if given,
    else of the current span; None when off or unsampled (prometheus_client: observe(v, exemplar))."""
    if not ENABLED:
        return None

    if traceparent:
        if not sampled(traceparent):  # the flag says it: no context to look up
            return None
        # The ids are the traceparent's own fields (lowercase hex, as format_trace_id writes them).
        m = _TRACEPARENT_IDS.fullmatch(traceparent)
        if m is None or m[1] == _ZERO_TRACE or m[2] == _ZERO_SPAN:
            return None
        return {"trace_id": m[1], "span_id": m[2]}
    sc = _current_span().get_span_context()
    if not sc.is_valid or not sc.trace_flags.sampled:
        return None
    return {
        "trace_id": _api.trace.format_trace_id(sc.trace_id),
        "span_id": _api.trace.format_span_id(sc.span_id),
    }
