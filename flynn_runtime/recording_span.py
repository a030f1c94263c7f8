"""A recording span of Flynn's own, ended into the SDK's batch span processor as the SDK's ReadableSpan.

The SDK's `Tracer.start_span` makes a `_Span` with locks, bounded containers and per-attribute checks,
and copies it into a ReadableSpan when it ends: on run control's and the gateway's event loops that
was most of what a sampled message cost. `RecordingSpan` keeps the span's fields in plain slots and
hands the SDK's own `ReadableSpan` to the same BatchSpanProcessor and OTLP exporter when it ends.
Who decides stays the SDK's: `flynn_runtime.tracing.start_span` makes one for a child of a sampled
parent (what a `parentbased_*` sampler always records) and for a root its sampler records; the ids
come from the provider's id generator. Attribute values are Flynn's own (str, bool, int, lists of
str), not checked per call, and the SDK's span limits (OTEL_SPAN_*_COUNT_LIMIT) do not apply.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode

_UNSET = Status(StatusCode.UNSET)


class Sink:
    """Where ended spans go: the provider's resource, the tracer's scope, the batch processor."""

    __slots__ = ("resource", "scope", "processor")

    def __init__(self, resource: Any, scope: Any, processor: Any) -> None:
        self.resource = resource
        self.scope = scope
        self.processor = processor


class RecordingSpan(trace.Span):
    __slots__ = (
        "_sink",
        "_name",
        "_context",
        "_parent",
        "_kind",
        "_attributes",
        "_events",
        "_links",
        "_status",
        "_start",
        "_end",
    )

    def __init__(
        self,
        sink: Sink,
        name: str,
        context: SpanContext,
        parent: SpanContext | None,
        kind: SpanKind,
        attributes: Mapping[str, Any] | None,
        links: Sequence[Link],
        start_time: int | None,
    ) -> None:
        self._sink = sink
        self._name = name
        self._context = context
        self._parent = parent
        self._kind = kind
        self._attributes: dict[str, Any] = dict(attributes) if attributes else {}
        self._events: list[Event] = []
        self._links = tuple(links)
        self._status = _UNSET
        self._start = start_time if start_time is not None else time.time_ns()
        self._end: int | None = None

    def get_span_context(self) -> SpanContext:
        return self._context

    @property
    def parent(self) -> SpanContext | None:
        return self._parent

    @property
    def name(self) -> str:
        return self._name

    def is_recording(self) -> bool:
        return self._end is None

    def set_attribute(self, key: str, value: Any) -> None:
        if self._end is None:
            self._attributes[key] = value

    def set_attributes(self, attributes: Mapping[str, Any]) -> None:
        if self._end is None:
            self._attributes.update(attributes)

    def add_event(
        self, name: str, attributes: Mapping[str, Any] | None = None, timestamp: int | None = None
    ) -> None:
        if self._end is None:
            self._events.append(
                Event(name, attributes, timestamp if timestamp is not None else time.time_ns())
            )

    def update_name(self, name: str) -> None:
        if self._end is None:
            self._name = name

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        """As the SDK's span: OK is final, UNSET is ignored."""
        if self._end is not None or self._status.status_code is StatusCode.OK:
            return
        new = status if isinstance(status, Status) else Status(status, description)
        if new.status_code is not StatusCode.UNSET:
            self._status = new

    def record_exception(
        self,
        exception: BaseException,
        attributes: Mapping[str, Any] | None = None,
        timestamp: int | None = None,
        escaped: bool = False,
    ) -> None:
        attrs: dict[str, Any] = {
            "exception.type": type(exception).__qualname__,
            "exception.message": str(exception),
            "exception.escaped": str(escaped),
        }
        if attributes:
            attrs.update(attributes)
        self.add_event("exception", attrs, timestamp)

    def end(self, end_time: int | None = None) -> None:
        if self._end is not None:
            return
        self._end = end_time if end_time is not None else time.time_ns()
        sink = self._sink
        sink.processor.on_end(
            ReadableSpan(
                name=self._name,
                context=self._context,
                parent=self._parent,
                resource=sink.resource,
                attributes=self._attributes,
                events=tuple(self._events),
                links=self._links,
                kind=self._kind,
                status=self._status,
                start_time=self._start,
                end_time=self._end,
                instrumentation_scope=sink.scope,
            )
        )
